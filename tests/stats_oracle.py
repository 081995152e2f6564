"""An independent float64 NumPy oracle for every statistic of accumulate_stats."""
import numpy as np


def oracle(x, valid, seg, P, edges=None):
    """x [B, T, C] float64 ndarray, valid [B, T] bool, seg [B] int -> dict of per-persona arrays."""
    B, T, C = x.shape
    out = {k: [] for k in ("count", "sum", "mean", "m2", "sumsq", "sumabs", "pos", "min", "max", "absmax",
                           "samples", "norm_mean", "norm_m2", "hist")}
    for p in range(P):
        rows = [x[b][valid[b]] for b in range(B) if seg[b] == p]
        tok = np.concatenate(rows, 0) if rows else np.zeros((0, C))
        n = tok.shape[0]
        out["count"].append(n)
        out["sum"].append(tok.sum(0))
        mean = tok.mean(0) if n else np.zeros(C)
        out["mean"].append(mean)
        out["m2"].append(((tok - mean) ** 2).sum(0))
        out["sumsq"].append((tok ** 2).sum(0))
        out["sumabs"].append(np.abs(tok).sum(0))
        out["pos"].append((tok > 0).sum(0))
        out["min"].append(tok.min(0) if n else np.full(C, np.inf))
        out["max"].append(tok.max(0) if n else np.full(C, -np.inf))
        out["absmax"].append(np.abs(tok).max(0) if n else np.zeros(C))
        norms = np.array([np.sqrt((r ** 2).sum(0)) for r in rows if r.shape[0] > 0]).reshape(-1, C)
        out["samples"].append(norms.shape[0])
        nm = norms.mean(0) if norms.shape[0] else np.zeros(C)
        out["norm_mean"].append(nm)
        out["norm_m2"].append(((norms - nm) ** 2).sum(0))
        if edges is not None:
            e32 = np.asarray(edges, dtype=np.float32)
            h = np.zeros((C, len(e32) - 1), dtype=np.int64)
            for c in range(C):
                v = tok[:, c].astype(np.float32)
                # bin i holds e[i] < v <= e[i+1]: count of edges strictly below v, minus one
                b = np.clip((e32[None, :] < v[:, None]).sum(1) - 1, 0, len(e32) - 2)
                np.add.at(h[c], b, 1)
            out["hist"].append(h)
    return {k: np.array(v) for k, v in out.items() if v}
