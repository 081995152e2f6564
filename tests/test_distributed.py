"""all_reduce_state across 2 processes on the gloo backend equals one pass over all data."""
import os
import socket

import torch
import torch.multiprocessing as mp

import persona_kernels as pk
from persona_kernels import StatsConfig


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 9, 13, generator=g)
    valid = torch.rand(6, 9, generator=g) > 0.3
    valid[:, 0] = True
    seg = torch.tensor([0, 1, 1, 0, 1, 0])
    return x, valid, seg


def _worker(rank, world, port, out_dir):
    import torch.distributed as dist

    from persona_kernels.distributed import all_reduce_state

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x, valid, seg = _data()
        sl = slice(rank * 3, rank * 3 + 3)
        local = pk.accumulate_stats(x[sl], valid=valid[sl], segment_ids=seg[sl],
                                    config=StatsConfig(num_personas=2, histogram=True), backend="reference")
        merged = all_reduce_state(local)
        torch.save(merged.tensors(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_all_reduce_state_two_gloo_processes(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    x, valid, seg = _data()
    whole = pk.accumulate_stats(x, valid=valid, segment_ids=seg, config=StatsConfig(num_personas=2, histogram=True),
                                backend="reference")
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for k, v in whole.tensors().items():
            if v.dtype.is_floating_point and k != "edges":
                torch.testing.assert_close(got[k], v, rtol=1e-12, atol=1e-12, msg=k)
            else:
                assert torch.equal(got[k], v), k


def test_all_reduce_requires_init():
    import pytest

    from persona_kernels.distributed import all_reduce_state

    with pytest.raises(RuntimeError, match="not initialised"):
        all_reduce_state(pk.StatsState.empty(4))
