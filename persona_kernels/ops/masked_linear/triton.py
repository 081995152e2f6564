"""Triton kernels for masked_linear: bitmap, shared_bitmask and block formats.

Every kernel computes a [BLOCK_N, BLOCK_O] tile of y = x (W ⊙ M)ᵀ + b in fp32 and writes it
once in x's dtype. The batch is decode-sized (1..16 rows) in the common case, where the work is
memory-bound: what matters is the bytes of weight (and mask) a kernel reads, so each program
loads a weight tile once and applies it to every row of its batch tile.

Tile products go through ``_tile_mma``: ``tl.dot`` when the batch tile has 16+ rows (with
``input_precision="ieee"`` for fp32, so fp32 stays exact: no TF32), a broadcast multiply-sum
in fp32 for a single row (GEMV: no padding of one row up to 16). Bitmaps are expanded in
registers: a [rows, words] tile of int32 words is loaded once, broadcast against the 32 bit
positions and reshaped to [rows, 32·words] columns.

Multi-persona formats (shared_bitmask, block) take a persona per row of x. A program walks the
distinct personas of its batch tile in increasing order (a scalar ``while`` loop: one pass when
the tile holds one persona) and masks the x rows of the other personas to zero. Above one batch
tile the launcher sorts rows by persona on the device (no host sync) so that tiles hold few
personas; kernels read x and write y through that permutation (no copies).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..registry import new_output, register_kernel

# Tiles per kernel and regime: (weight rows per program (block: at most), input columns per
# step, warps; 8 warps at 64 batch rows). "gemv": one x row, multiply-sum; few weight rows per
# program so that a decode layer spreads over many programs (memory parallelism). "mma16" /
# "mma32": tl.dot on 16-bit / fp32 inputs (fp32 ieee dots run on FMA units: smaller tiles).
# Register use checked on sm_90 builds (no spills); not yet timed: benchmarks may retune them.
CONFIGS = {
    "bitmap": {"gemv": (8, 512, 4), "mma16": (32, 128, 4), "mma32": (16, 32, 4)},
    "shared_bitmask": {"gemv": (8, 512, 4), "mma16": (64, 64, 4), "mma32": (32, 32, 4)},
    "block": {"gemv": (16, 128, 4), "mma16": (64, 128, 4), "mma32": (32, 64, 4)},
}


def _config(kind: str, block_n: int, dtype: torch.dtype) -> tuple:
    regime = "gemv" if block_n == 1 else "mma32" if dtype == torch.float32 else "mma16"
    rows, cols, warps = CONFIGS[kind][regime]
    return rows, cols, (8 if block_n == 64 and regime != "gemv" else warps), regime


# ----------------------------------------------------------------------------- shared helpers

@triton.jit
def _tile_mma(acc, xt, wt, USE_DOT: tl.constexpr, PRECISION: tl.constexpr):
    """acc [BN, BO] += xt [BN, BK] @ wt [BO, BK]ᵀ, fp32 accumulation."""
    if USE_DOT:
        acc = tl.dot(xt, tl.trans(wt), acc, input_precision=PRECISION)
    else:
        acc += tl.sum(xt.to(tl.float32)[:, None, :] * wt.to(tl.float32)[None, :, :], axis=2)
    return acc


@triton.jit
def _popcount(v):
    """Set bits of each 32-bit word (SWAR), as int32."""
    v = v.to(tl.uint32, bitcast=True)
    v = v - ((v >> 1) & 0x55555555)
    v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
    v = (v + (v >> 4)) & 0x0F0F0F0F
    return ((v * 0x01010101) >> 24).to(tl.int32)


@triton.jit
def _expand_bits(words, ROWS: tl.constexpr, KW: tl.constexpr):
    """int32 words [ROWS, KW] -> bool [ROWS, 32·KW]: column 32·w + j is bit j of word w."""
    j = tl.arange(0, 32)
    bits = (words[:, :, None] >> j[None, None, :]) & 1
    return tl.reshape(bits, (ROWS, KW * 32)) != 0


@triton.jit
def _next_persona(pers, p, P):
    """Smallest persona of the tile above p (P when none is left)."""
    return tl.min(tl.where(pers > p, pers, P), axis=0)


@triton.jit
def _batch_rows(prow_ptr, order_ptr, N, P, BLOCK_N: tl.constexpr, HAS_ORDER: tl.constexpr):
    """Rows of x in this program's batch tile, their mask and personas (P for padding rows)."""
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    if HAS_ORDER:
        rows_n = tl.load(order_ptr + offs_n, mask=nmask, other=0)
    else:
        rows_n = offs_n
    return rows_n, nmask, tl.load(prow_ptr + rows_n, mask=nmask, other=P)


@triton.jit
def _store_tile(y_ptr, b_ptr, acc, rows_n, nmask, offs_o, omask, stride_y, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_o, mask=omask, other=0.0).to(tl.float32)[None, :]
    out = y_ptr + rows_n.to(tl.int64)[:, None] * stride_y + offs_o[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=nmask[:, None] & omask[None, :])


def _block_n(n: int) -> int:
    """Batch rows per program: 1 (GEMV, no dot), else 16/32/64 (tl.dot needs 16+)."""
    return 1 if n == 1 else 16 if n <= 16 else 32 if n <= 32 else 64


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # the latter is ignored for 16-bit inputs


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _nonempty(t: torch.Tensor) -> torch.Tensor:
    """An empty tensor may have a null data pointer; every load from it is masked off anyway."""
    return t if t.numel() else torch.zeros(1, dtype=t.dtype, device=t.device)


def _persona_args(persona_rows: Optional[torch.Tensor], n: int, block_n: int, device):
    """(persona int32 [N], row order int32 [N], has_order): rows grouped by persona above one tile."""
    if persona_rows is None:
        persona_rows = torch.zeros(n, dtype=torch.int64, device=device)
    prow = persona_rows.to(device=device, dtype=torch.int32).contiguous()
    if n > block_n:
        return prow, torch.argsort(prow, stable=True).to(torch.int32), True
    return prow, prow, False


def _launch(kind: str, x2d, fmt, bias):
    """What every launcher starts with: the output y and (x2d, bias or y, batch tile, tile
    config), or None for the second when there is nothing to compute (y is returned as it is)."""
    y = new_output((x2d.shape[0], fmt.shape[0]), x2d.dtype, x2d.device)
    x2d, b = _last_dim_contiguous(x2d), (bias.contiguous() if bias is not None else y)
    if x2d.shape[0] == 0 or fmt.shape[0] == 0:
        return y, None
    bn = _block_n(x2d.shape[0])
    return y, (x2d, b, bn, *_config(kind, bn, x2d.dtype))


# ----------------------------------------------------------------------------- bitmap

@triton.jit
def _bitmap_kernel(
    x_ptr, val_ptr, bm_ptr, rp_ptr, b_ptr, y_ptr,
    N, OUT, IN, W, stride_x, stride_y,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    KW: tl.constexpr = BLOCK_K // 32
    row0 = tl.program_id(0) * BLOCK_O
    offs_o = row0 + tl.arange(0, BLOCK_O)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    omask = offs_o < OUT
    nmask = offs_n < N
    offs_w = tl.arange(0, KW)
    below = (tl.full((32,), 1, tl.uint32) << tl.arange(0, 32).to(tl.uint32)) - 1  # bits under bit j

    first = tl.load(rp_ptr + row0)  # the program's values start here; per-row offsets fit int32
    v_base = val_ptr + first
    nxt = (tl.load(rp_ptr + offs_o, mask=omask, other=0) - first).to(tl.int32)  # next value per row
    bm_rows = bm_ptr + offs_o.to(tl.int64)[:, None] * W
    x_rows = x_ptr + offs_n.to(tl.int64)[:, None] * stride_x
    acc = tl.zeros((BLOCK_N, BLOCK_O), dtype=tl.float32)
    for w0 in range(0, W, KW):
        words = tl.load(bm_rows + (w0 + offs_w)[None, :], mask=omask[:, None] & (w0 + offs_w < W)[None, :], other=0)
        count = _popcount(words)
        start = nxt[:, None] + tl.cumsum(count, axis=1) - count  # first value of each word
        nxt += tl.sum(count, axis=1)
        # value of bit j of a word: start + set bits below j
        w3 = words.to(tl.uint32, bitcast=True)[:, :, None]
        rank = start[:, :, None] + _popcount(w3 & below[None, None, :])
        addr = tl.reshape(rank, (BLOCK_O, BLOCK_K))
        keep = _expand_bits(words, BLOCK_O, KW)
        vals = tl.load(v_base + addr, mask=keep, other=0.0)
        cols = w0 * 32 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_rows + cols[None, :], mask=nmask[:, None] & (cols < IN)[None, :], other=0.0)
        acc = _tile_mma(acc, xt, vals, USE_DOT, PRECISION)
    _store_tile(y_ptr, b_ptr, acc, offs_n, nmask, offs_o, omask, stride_y, HAS_BIAS)


@register_kernel("masked_linear", "triton", "bitmap")
def masked_linear_bitmap_triton(x2d: torch.Tensor, fmt, bias: Optional[torch.Tensor],
                                persona_rows=None) -> torch.Tensor:
    """Bitmap GEMV / small GEMM: reads each kept value once and each bitmap word once per program.

    Grid (out / BLOCK_O, N / BLOCK_N). A program owns BLOCK_O output rows and walks the input
    BLOCK_K / 32 words at a time: popcount each word, an exclusive scan of the counts along the
    row gives where each word's values start, and a kept bit's rank inside its word (popcount of
    the bits below it) gives its value: values[row_ptr[r] + start + rank]. Values are gathered
    straight from the packed array, so bytes read ≈ nnz·elt + out·W·4 (+ x), which is what makes
    the format beat dense at low density. All rows of the batch tile share the decoded values.
    """
    n, (out, inp) = x2d.shape[0], fmt.shape
    y, setup = _launch("bitmap", x2d, fmt, bias)
    if setup is None:
        return y
    x2d, b, bn, bo, bk, warps, regime = setup
    grid = (triton.cdiv(out, bo), triton.cdiv(n, bn))
    _bitmap_kernel[grid](
        x2d, _nonempty(fmt.values), _nonempty(fmt.bitmap), fmt.row_ptr, b, y,
        n, out, inp, fmt.bitmap.shape[1], x2d.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=bn, BLOCK_O=bo, BLOCK_K=bk,
        USE_DOT=regime != "gemv", PRECISION=_precision(x2d.dtype), num_warps=warps,
    )
    return y


# ----------------------------------------------------------------------------- shared_bitmask

@triton.jit
def _shared_bitmask_kernel(
    x_ptr, w_ptr, bits_ptr, prow_ptr, order_ptr, b_ptr, y_ptr,
    N, OUT, IN, W, P, stride_x, stride_w, stride_y,
    HAS_ORDER: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr,
    BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    KW: tl.constexpr = BLOCK_K // 32
    offs_o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    omask = offs_o < OUT
    rows_n, nmask, pers = _batch_rows(prow_ptr, order_ptr, N, P, BLOCK_N, HAS_ORDER)
    first = tl.min(pers, axis=0)
    offs_k = tl.arange(0, BLOCK_K)
    offs_w = tl.arange(0, KW)

    w_rows = w_ptr + offs_o.to(tl.int64)[:, None] * stride_w
    x_rows = x_ptr + rows_n.to(tl.int64)[:, None] * stride_x
    acc = tl.zeros((BLOCK_N, BLOCK_O), dtype=tl.float32)
    for k0 in range(0, IN, BLOCK_K):
        cols = k0 + offs_k
        cmask = cols < IN
        wt = tl.load(w_rows + cols[None, :], mask=omask[:, None] & cmask[None, :], other=0.0)  # once for all personas
        xt = tl.load(x_rows + cols[None, :], mask=nmask[:, None] & cmask[None, :], other=0.0)
        words_at = k0 // 32 + offs_w
        wmask = omask[:, None] & (words_at < W)[None, :]
        p = first
        while p < P:
            bits_rows = bits_ptr + (p * OUT + offs_o).to(tl.int64)[:, None] * W
            words = tl.load(bits_rows + words_at[None, :], mask=wmask, other=0)
            wm = tl.where(_expand_bits(words, BLOCK_O, KW), wt, 0.0)
            xp = tl.where((pers == p)[:, None], xt, 0.0)
            acc = _tile_mma(acc, xp, wm, USE_DOT, PRECISION)
            p = _next_persona(pers, p, P)
    _store_tile(y_ptr, b_ptr, acc, rows_n, nmask, offs_o, omask, stride_y, HAS_BIAS)


@register_kernel("masked_linear", "triton", "shared_bitmask")
def masked_linear_shared_bitmask_triton(x2d: torch.Tensor, fmt, bias: Optional[torch.Tensor],
                                        persona_rows: Optional[torch.Tensor]) -> torch.Tensor:
    """Dense weight masked on the fly by the bits of each row's persona.

    Grid (out / BLOCK_O, N / BLOCK_N). A program loads each [BLOCK_O, BLOCK_K] weight tile once
    and then, for each distinct persona of its batch tile, that persona's bits for the tile
    (BLOCK_K / 32 words per row), masks the weight in registers and accumulates the persona's x
    rows. Bytes read ≈ dense weight + bits × (distinct personas per tile): one weight copy serves
    a mixed batch, which is the point of the format (it never reads fewer bytes than dense).
    """
    n, (out, inp) = x2d.shape[0], fmt.shape
    y, setup = _launch("shared_bitmask", x2d, fmt, bias)
    if setup is None:
        return y
    x2d, b, bn, bo, bk, warps, regime = setup
    prow, order, has_order = _persona_args(persona_rows, n, bn, x2d.device)
    w = _last_dim_contiguous(fmt.weight)
    grid = (triton.cdiv(out, bo), triton.cdiv(n, bn))
    _shared_bitmask_kernel[grid](
        x2d, w, _nonempty(fmt.bits), prow, order, b, y,
        n, out, inp, fmt.bits.shape[-1], fmt.num_personas, x2d.stride(0), w.stride(0), y.stride(0),
        HAS_ORDER=has_order, HAS_BIAS=bias is not None, BLOCK_N=bn, BLOCK_O=bo, BLOCK_K=bk,
        USE_DOT=regime != "gemv", PRECISION=_precision(x2d.dtype), num_warps=warps,
    )
    return y


# ----------------------------------------------------------------------------- block

@triton.jit
def _block_kernel(
    x_ptr, w_ptr, ptr_ptr, kcol_ptr, prow_ptr, order_ptr, b_ptr, y_ptr,
    N, OUT, P, NBR, stride_x, stride_w, stride_y,
    BR: tl.constexpr, BC: tl.constexpr, G: tl.constexpr, SAME_COLS: tl.constexpr,
    HAS_ORDER: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    offs_o = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    omask = offs_o < OUT
    rows_n, nmask, pers = _batch_rows(prow_ptr, order_ptr, N, P, BLOCK_N, HAS_ORDER)
    # a step covers G kept blocks of a row: column q of the step is column q % BC of block q // BC
    offs_q = tl.arange(0, BLOCK_K)
    g_of_q = offs_q // BC
    j_of_q = offs_q % BC
    qmask = g_of_q < G

    w_rows = w_ptr + offs_o.to(tl.int64)[:, None] * stride_w
    x_rows = x_ptr + rows_n.to(tl.int64)[:, None] * stride_x
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    p = tl.min(pers, axis=0)
    while p < P:
        xsel = nmask & (pers == p)
        if SAME_COLS:  # all BLOCK_R rows lie in one block-row: one list, x tile shared by the rows
            lst = ptr_ptr + p * NBR + (tl.program_id(0) * BLOCK_R) // BR
            start = tl.load(lst)
            end = tl.load(lst + 1)
            for i in range(start, end, G):
                kept = qmask & (i + g_of_q < end)
                cols = tl.load(kcol_ptr + i + g_of_q, mask=kept, other=0) * BC + j_of_q
                wt = tl.load(w_rows + cols[None, :], mask=omask[:, None] & kept[None, :], other=0.0)
                xt = tl.load(x_rows + cols[None, :], mask=xsel[:, None] & kept[None, :], other=0.0)
                acc = _tile_mma(acc, xt, wt, USE_DOT, PRECISION)
        else:  # short blocks: the rows span several block-rows, each with its own list
            lst = ptr_ptr + p * NBR + offs_o // BR
            start = tl.load(lst, mask=omask, other=0)
            count = tl.load(lst + 1, mask=omask, other=0) - start
            for i in range(0, tl.max(count, axis=0), G):
                kept = qmask[None, :] & ((i + g_of_q)[None, :] < count[:, None])  # [R, K]
                cols = tl.load(kcol_ptr + start[:, None] + i + g_of_q[None, :], mask=kept, other=0) * BC + j_of_q[None, :]
                wt = tl.load(w_rows + cols, mask=kept, other=0.0)
                xt = tl.load(x_rows[:, :, None] + cols[None, :, :], mask=xsel[:, None, None] & kept[None, :, :], other=0.0)
                acc += tl.sum(xt.to(tl.float32) * wt.to(tl.float32)[None, :, :], axis=2)
        p = _next_persona(pers, p, P)
    _store_tile(y_ptr, b_ptr, acc, rows_n, nmask, offs_o, omask, stride_y, HAS_BIAS)


def _kept_block_lists(fmt):
    """CSR of kept block columns: ptr int64 [P · nbr + 1], cols int32 (block-column indices).

    Entry (p, block-row r) is blocks[p, r].nonzero(). Cached on the format object, keyed on the
    blocks tensor (pointer and version counter) so that an in-place edit rebuilds it.
    """
    blocks = fmt.blocks
    key = (blocks.data_ptr(), blocks._version, str(blocks.device), tuple(blocks.shape))
    cache = getattr(fmt, "_triton_cache", None)
    if cache is not None and cache[0] == key:
        return cache[1], cache[2]
    flat = blocks.reshape(-1, blocks.shape[-1])
    ptr = torch.zeros(flat.shape[0] + 1, dtype=torch.int64, device=blocks.device)
    torch.cumsum(flat.sum(1), 0, out=ptr[1:])
    cols = _nonempty(flat.nonzero()[:, 1].to(torch.int32).contiguous())  # nonzero is row-major
    fmt._triton_cache = (key, ptr, cols)
    return ptr, cols


def _pow2_divisor(n: int, cap: int) -> int:
    d = 1
    while d * 2 <= cap and n % (d * 2) == 0:
        d *= 2
    return d


@register_kernel("masked_linear", "triton", "block")
def masked_linear_block_triton(x2d: torch.Tensor, fmt, bias: Optional[torch.Tensor],
                               persona_rows: Optional[torch.Tensor]) -> torch.Tensor:
    """Block-sparse weight: loops over kept blocks only, so a dropped block costs no bytes.

    Per persona the kept block columns of each block-row are listed once (CSR, cached on the
    format). Grid (out / BLOCK_R, N / BLOCK_N); per distinct persona of its batch tile a program
    walks the lists of its rows, G = BLOCK_K / bc kept blocks per step (a [BLOCK_R, G·bc] gather
    of weight rows, bc contiguous elements per block row, against the matching x columns).
    Blocks 16+ rows tall: BLOCK_R rows of one block-row share a list and an x tile (tl.dot at
    16+ batch rows). Shorter blocks (1x16): BLOCK_R rows from several block-rows, each walking
    its own list (block_mask keeps the same count per block-row, so the rows stay in step), with
    x gathered per row. Bytes read ≈ density × dense weight + the lists (+ x).
    """
    n, out = x2d.shape[0], fmt.shape[0]
    y, setup = _launch("block", x2d, fmt, bias)
    if setup is None:
        return y
    x2d, b, bn, max_rows, step_cols, warps, regime = setup
    br, bc = fmt.block
    ptr, kcols = _kept_block_lists(fmt)
    same_cols = br >= 16
    if same_cols:
        block_r = _pow2_divisor(br, max_rows)  # divides br: a program stays inside one block-row
    else:  # keep the [BLOCK_N, BLOCK_R, BLOCK_K] x gather of a step near 2K elements
        step_cols = max(16, min(step_cols, 2048 // bn))
        block_r = max(1, min(16, 2048 // (bn * step_cols)))
    g = max(1, step_cols // bc)
    block_k = max(16, triton.next_power_of_2(g * bc))
    prow, order, has_order = _persona_args(persona_rows, n, bn, x2d.device)
    w = _last_dim_contiguous(fmt.weight)
    grid = (triton.cdiv(out, block_r), triton.cdiv(n, bn))
    _block_kernel[grid](
        x2d, w, ptr, kcols, prow, order, b, y,
        n, out, fmt.num_personas, out // br, x2d.stride(0), w.stride(0), y.stride(0),
        BR=br, BC=bc, G=g, SAME_COLS=same_cols, HAS_ORDER=has_order, HAS_BIAS=bias is not None,
        BLOCK_N=bn, BLOCK_R=block_r, BLOCK_K=block_k, USE_DOT=same_cols and bn >= 16 and block_r >= 16,
        PRECISION=_precision(x2d.dtype), num_warps=warps,
    )
    return y
