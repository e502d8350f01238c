"""Triton top-k of pooled block scores (radix select on the float bits, one program per row).

Tie rule (docs/sparse.md): among equal scores at the cut-off the lowest block indices are kept, as in the
reference `topk_block_indices`. Rows wider than the kernel takes (long contexts: 16K blocks at 1M tokens) take two
rounds: the top-k of every tile of columns, then the top-k of those candidates (`_topk_wide`). Measured on an H100
(experiments/profiling/topk_wide.py, bench/results/topk_wide_h100.json; k 96, 8,192 rows of 8,192 / 16,384 /
32,768 columns): 0.84 / 1.58 / 3.05 ms against 8.23 / 16.67 / 33.75 ms for the reference (chunked torch.topk),
9.8-11.1x faster, the same indices.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sala.ops.infllmv2.params import DEFAULT_KERNEL_CONFIG
from sala.ops.infllmv2.reference import topk_block_indices
from sala.ops.infllmv2.triton_utils import pow2

_NEG_INF_KEY = tl.constexpr(-2139095041)   # order-preserving int32 image of -inf (0xFF800000 ^ 0x7FFFFFFF)


@triton.jit
def _topk_row_keys(x_ptr, lim_ptr, r, n_cols, H, T, sxr, slb, slt, NC: tl.constexpr, HAS_LIM: tl.constexpr,
                   TILE: tl.constexpr):
    """Order-preserving int32 images [NC] of row r's values (float bits, magnitude bits flipped for negatives);
    columns past the row's limit (or n_cols) read as -inf. With TILE > 0, row r is tile r % H (TILE columns, the
    last one shorter) of row r // H of x: H is the tiles per row then."""
    cols = tl.arange(0, NC)
    n = n_cols
    base = r.to(tl.int64) * sxr
    if TILE > 0:
        tile = r % H
        base = (r // H).to(tl.int64) * sxr + tile.to(tl.int64) * TILE
        n = tl.minimum(n_cols - tile * TILE, TILE)
    if HAS_LIM:
        b = r // (H * T)
        t = r % T
        n = tl.minimum(tl.load(lim_ptr + b.to(tl.int64) * slb + t.to(tl.int64) * slt), n_cols)
    x = tl.load(x_ptr + base + cols, mask=cols < n, other=float("-inf"))
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _topk_store(out_ptr, r, sel, K: tl.constexpr, KP: tl.constexpr, NC: tl.constexpr):
    """Write the columns where sel [NC] is set, ascending, then -1 up to K, at out + r * K."""
    cols = tl.arange(0, NC)
    slot = tl.cumsum(sel.to(tl.int32), axis=0) - 1
    obase = out_ptr + r.to(tl.int64) * K
    tl.store(obase + slot, cols, mask=sel)
    kk = tl.arange(0, KP)
    n_sel = tl.sum(sel.to(tl.int32), axis=0)
    tl.store(obase + kk, tl.full([KP], -1, tl.int32), mask=(kk >= n_sel) & (kk < K))


@triton.jit
def _topk_bisect_row(x_ptr, out_ptr, lim_ptr, r, n_cols, H, T, sxr, slb, slt,
                     K: tl.constexpr, KP: tl.constexpr, NC: tl.constexpr, HAS_LIM: tl.constexpr,
                     TILE: tl.constexpr):
    """Top-K of row r by bisection: the K-th largest image is found bit by bit (up to 31 counting passes over the
    row, held in registers); ties at the cut-off go to the lowest columns (docs/sparse.md, "Tie rule"). The
    bisection stops at the first candidate cut-off that exactly K images reach (then "image >= cut-off" is the
    answer; on distinct values that happens once the bits of the K-th and (K+1)-th largest part)."""
    key = _topk_row_keys(x_ptr, lim_ptr, r, n_cols, H, T, sxr, slb, slt, NC, HAS_LIM, TILE)
    valid = key > _NEG_INF_KEY
    n_valid = tl.sum(valid.to(tl.int32), axis=0)
    # the K-th largest image: sign first, then bits 30..0 (setting a bit raises a two's-complement value)
    n_nonneg = tl.sum((key >= 0).to(tl.int32), axis=0)
    thr = tl.where(n_nonneg >= K, 0, -2147483647 - 1)
    bit = 30
    exact = (n_nonneg == K) | (n_valid <= K)          # at most K candidates: every one, no bisection
    while (bit >= 0) & (exact == 0):
        cand = thr | (1 << bit)
        cnt = tl.sum((key >= cand).to(tl.int32), axis=0)
        thr = tl.where(cnt >= K, cand, thr)
        exact = cnt == K
        bit -= 1
    above = key > thr
    need = K - tl.sum(above.to(tl.int32), axis=0)
    tie = key == thr
    sel = above | (tie & (tl.cumsum(tie.to(tl.int32), axis=0) <= need))
    sel = tl.where(n_valid <= K, valid, sel)
    _topk_store(out_ptr, r, sel, K, KP, NC)


@triton.jit(do_not_specialize=["n_cols", "H", "T", "sxr", "slb", "slt"])
def _topk_blocks_kernel(x_ptr, out_ptr, lim_ptr, n_cols, H, T, sxr, slb, slt,
                        K: tl.constexpr, KP: tl.constexpr, NC: tl.constexpr, HAS_LIM: tl.constexpr,
                        TILE: tl.constexpr):
    """Row r of x [R, n_cols] fp32 -> the column indices of its K largest values other than -inf, ascending,
    -1 padded, at out + r * K (`_topk_bisect_row`). With HAS_LIM, row r = (b, h, t) of [B, H, T] reads only
    its first lim[b, t] columns. With TILE > 0, program r takes tile r % H of row r // H (columns within the
    tile)."""
    _topk_bisect_row(x_ptr, out_ptr, lim_ptr, tl.program_id(0), n_cols, H, T, sxr, slb, slt, K, KP, NC, HAS_LIM,
                     TILE)


def _launch(x: torch.Tensor, out: torch.Tensor, programs: int, n: int, K: int, *, lim: torch.Tensor | None = None,
            H: int = 1, T: int = 1, slb: int = 0, slt: int = 0, tile: int = 0) -> None:
    """`_topk_blocks_kernel` over `programs` rows of x [R, n] (unit column stride) into out [programs, K]: rows
    of n columns (with `lim` [B, T] and H heads: limits per (b, t)), or with `tile` > 0 every tile of `tile`
    columns of each row (programs = R x tiles); NC, the columns a program holds, and its warps follow."""
    NC = max(16, pow2(tile or n))
    _topk_blocks_kernel[(programs,)](x, out, x if lim is None else lim, n, H, T, x.stride(0), slb, slt, K=K,
                                     KP=max(16, pow2(K)), NC=NC, HAS_LIM=lim is not None, TILE=tile,
                                     num_warps=4 if NC <= 2048 else (8 if NC <= 8192 else 16))


def topk_blocks_triton(pooled: torch.Tensor, total_blocks: int, *, limits: torch.Tensor | None = None,
                       max_cols: int = DEFAULT_KERNEL_CONFIG.topk_max_cols) -> torch.Tensor:
    """`topk_block_indices` in one kernel: pooled fp32 [..., n] -> int32 [..., total_blocks], ascending, -1 padded.

    limits: int32 [B, T] for pooled [B, H, T, n]: row (b, h, t) considers only its first limits[b, t] columns
    (the rest may be garbage). Rows wider than `max_cols` (SparseKernelConfig.topk_max_cols) run as tiles of
    `max_cols` columns and a second round over their candidates (`_topk_wide`; no limits there), or take the
    reference `topk_block_indices` when max_cols < total_blocks; other dtypes take the reference. Same tie rule
    everywhere.
    """
    n = pooled.shape[-1]
    if n > max_cols or pooled.dtype != torch.float32:
        if limits is not None:
            raise ValueError(f"topk_blocks_triton: limits need fp32 rows of <= {max_cols} columns, got "
                             f"{n} columns of {pooled.dtype}")
        if pooled.dtype != torch.float32 or max_cols < total_blocks:
            return topk_block_indices(pooled, total_blocks)
        x = pooled.reshape(-1, n)
        return _topk_wide(x if x.stride(-1) == 1 else x.contiguous(), total_blocks, max_cols).reshape(
            *pooled.shape[:-1], total_blocks)
    lead = pooled.shape[:-1]
    out = torch.empty(*lead, total_blocks, dtype=torch.int32, device=pooled.device)
    x = pooled.reshape(-1, n)
    if x.stride(-1) != 1:
        x = x.contiguous()
    R = x.shape[0]
    if R == 0:
        return out
    if limits is None:
        _launch(x, out, R, n, total_blocks)
        return out
    if pooled.dim() != 4 or limits.shape != (pooled.shape[0], pooled.shape[2]):
        raise ValueError(f"topk_blocks_triton: limits {tuple(limits.shape)} must be [B, T] of pooled "
                         f"[B, H, T, n] {tuple(pooled.shape)}")
    lim = limits.to(torch.int32)
    _launch(x, out, R, n, total_blocks, lim=lim, H=pooled.shape[1], T=pooled.shape[2], slb=lim.stride(0),
            slt=lim.stride(1))
    return out


def _topk_wide(x: torch.Tensor, K: int, tile: int) -> torch.Tensor:
    """`topk_block_indices` of wide rows x fp32 [R, n] (n > tile >= K, unit column stride) -> int32 [R, K]: the top
    K of every tile of `tile` columns (one kernel over R x tiles programs, the last tile shorter), then the top K
    of those R x (tiles * K) candidates.

    Exact, ties included: under the order (value descending, column ascending) that the tie rule follows, a
    column among its row's top K is among its tile's top K too (whatever ranks above it in the tile ranks above
    it in the row). The candidates stay in column order (tile by tile, ascending in each, -inf where a tile had
    fewer than K), so the second round's lowest positions among equal values are the lowest columns."""
    R, n = x.shape
    nt = -(-n // tile)
    if nt * K >= n or R == 0:        # no fewer candidates than columns (K near the tile width): the reference
        return topk_block_indices(x, K)
    # first round: one program per (row, tile), reading the tile in place (the last tile is shorter: no copy)
    local = torch.empty(R * nt, K, dtype=torch.int32, device=x.device)
    _launch(x, local, R * nt, n, K, H=nt, tile=tile)
    local = local.view(R, nt, K)
    offsets = torch.arange(0, nt * tile, tile, device=x.device, dtype=torch.int32)[None, :, None]
    cand = torch.where(local >= 0, local + offsets, -1).view(R, nt * K)             # ascending columns, -1 gaps
    vals = torch.where(cand >= 0, x.gather(1, cand.clamp(min=0).long()), float("-inf"))
    pos = topk_blocks_triton(vals, K, max_cols=tile)                                # recurses while > tile
    return torch.where(pos >= 0, cand.gather(1, pos.clamp(min=0).long()), -1)
