"""Paged K/V for the sparse layers' inference: a shared pool of pages [P, BS, Hkv, D] (BS = params.block_size: one
page per key block) and int32 block tables [R, NB] mapping row r's logical block j (keys j*BS .. j*BS + BS - 1) to
a physical page. Entries of blocks a row has not allocated are 0: page 0 is a scratch page never handed to a
sequence, so nothing may read it unmasked.

Every paged op is defined by gathering: `gather_paged(pages, table, length)` [R, length, Hkv, D] is row r's keys
0..length-1, and the paged op equals the contiguous op on that. The references (CPU, SALA_KERNELS=reference) do
exactly that; the Triton paths read K/V through the table (kernels with PAGED=True). Inference only: no autograd
through pages.
"""
from __future__ import annotations

import functools

import torch

from sala.ops.dense import dense_causal_attention
from sala.ops.dispatch import triton_available, use_triton
from sala.ops.infllmv2.attention import infllmv2_attention
from sala.ops.infllmv2.params import (
    SparseKernelConfig,
    SparseParams,
    check_block_table,
    check_no_grad,
    check_page_pair,
    check_pages,
    flat_pages,
    kernel_config_or_default,
    softmax_scale,
)
from sala.ops.infllmv2.selection import select_blocks

if triton_available():
    from sala.ops.infllmv2 import triton_attention as tri
else:  # pragma: no cover - without triton every call takes the reference path
    tri = None

# Sparse queries per selection + attention step (bounds block-index memory), as infllmv2_attention's no-grad chunk.
_NO_GRAD_QUERY_CHUNK = 16384


def _check_keys(fn: str, x: torch.Tensor, pages: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{fn}: x {tuple(x.shape)} must be {what} = {tuple(shape)} for pages {tuple(pages.shape)}")
    if x.dtype != pages.dtype or x.device != pages.device:
        raise ValueError(f"{fn}: x ({x.dtype}, {x.device}) must match the pages ({pages.dtype}, {pages.device})")


# --------------------------------------------------------------------------------------- gather / write
def gather_paged(pages: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """Keys 0..length-1 of every row: pages [P, BS, Hkv, D], block_table int32 [R, NB] (or [NB]: one row) ->
    [R, length, Hkv, D] (R = 1 for one row), key t of row r = pages[block_table[r, t // BS], t % BS]. The
    definition of every paged op (a copy of the pages the rows use)."""
    fn = "gather_paged"
    check_pages(fn, pages)
    check_block_table(fn, block_table, (1, 2), pages=pages)
    table = block_table[None] if block_table.dim() == 1 else block_table
    R, NB = table.shape
    BS = pages.shape[1]
    length = int(length)
    if not 0 <= length <= NB * BS:
        raise ValueError(f"{fn}: length {length} must be in 0..{NB * BS} (block_table {tuple(block_table.shape)} "
                         f"x pages of {BS} keys)")
    nb = -(-length // BS)
    g = pages[table[:, :nb].long()]                                        # [R, nb, BS, Hkv, D]
    return g.reshape(R, nb * BS, *pages.shape[2:])[:, :length]


def gather_paged_range(pages: torch.Tensor, table_row: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Keys start..end-1 of one row: pages [P, BS, Hkv, D], table_row int32 [NB] -> [1, end - start, Hkv, D]
    (reads only the pages of those keys: feeds `compress_window_range` and dense attention)."""
    fn = "gather_paged_range"
    check_pages(fn, pages)
    check_block_table(fn, table_row, (1,), "table_row", pages)
    BS = pages.shape[1]
    start, end = int(start), int(end)
    if not 0 <= start <= end <= table_row.shape[0] * BS:
        raise ValueError(f"{fn}: keys {start}..{end} must satisfy 0 <= start <= end <= {table_row.shape[0] * BS} "
                         f"(table_row {tuple(table_row.shape)} x pages of {BS} keys)")
    b0, b1 = start // BS, -(-end // BS)
    g = pages[table_row[b0:b1].long()].reshape(1, (b1 - b0) * BS, *pages.shape[2:])
    return g[:, start - b0 * BS:end - b0 * BS]


def write_paged(pages: torch.Tensor, table_row: torch.Tensor, start: int, x: torch.Tensor) -> None:
    """Write one row's keys start..start+T-1 in place: pages [P, BS, Hkv, D], table_row int32 [NB], x [T, Hkv, D]
    (one index_copy_ into the flat pages; no host sync)."""
    fn = "write_paged"
    check_pages(fn, pages)
    check_block_table(fn, table_row, (1,), "table_row", pages)
    if x.dim() != 3:
        raise ValueError(f"{fn}: x must be [T, Hkv, D], got {tuple(x.shape)} (pages {tuple(pages.shape)})")
    T = x.shape[0]
    _check_keys(fn, x, pages, (T, *pages.shape[2:]), "[T, Hkv, D]")
    BS = pages.shape[1]
    start = int(start)
    if not 0 <= start <= start + T <= table_row.shape[0] * BS:
        raise ValueError(f"{fn}: keys {start}..{start + T} do not fit the row's {table_row.shape[0] * BS} slots "
                         f"(table_row {tuple(table_row.shape)} x pages of {BS} keys)")
    if T == 0:
        return
    positions = torch.arange(start, start + T, device=pages.device)[None]
    flat_pages(fn, pages).index_copy_(0, paged_rows(table_row[None], positions, BS), x)


def write_paged_positions(pages: torch.Tensor, block_table: torch.Tensor, positions: torch.Tensor,
                          x: torch.Tensor) -> None:
    """Scatter the keys of a decode / verify step in place: pages [P, BS, Hkv, D], block_table int32 [R, NB],
    positions int [R, T], x [R, T, Hkv, D]; x[r, j] goes to row r's key positions[r, j]. Positions past the
    capacity NB*BS are clamped to NB*BS - 1 (as the contiguous decode clamps to the last slot). No host sync,
    static shapes (CUDA-graph capturable)."""
    fn = "write_paged_positions"
    check_pages(fn, pages)
    check_block_table(fn, block_table, (2,), pages=pages)
    rows = paged_rows(block_table, positions, pages.shape[1])            # checks positions
    _check_keys(fn, x, pages, (*positions.shape, *pages.shape[2:]), "[R, T, Hkv, D]")
    flat_pages(fn, pages).index_copy_(0, rows, x.reshape(-1, *pages.shape[2:]))


def paged_rows(block_table: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flat page rows int64 [R * T] of key positions int [R, T] of rows with block_table int32 [R, NB] (positions
    clamped to 0 .. NB * block_size - 1): where `write_paged_positions` writes. The same for every sparse layer of
    one step (they share positions and table), so a decode step computes it once."""
    fn = "paged_rows"
    check_block_table(fn, block_table, (2,))
    R, NB = block_table.shape
    if positions.dim() != 2 or positions.shape[0] != R or positions.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{fn}: positions must be int64 [R, T] with R = {R} (block_table "
                         f"{tuple(block_table.shape)}), got {positions.dtype} {tuple(positions.shape)}")
    BS = int(block_size)
    pos = positions.to(torch.int64).clamp(0, NB * BS - 1)
    page = torch.gather(block_table, 1, torch.div(pos, BS, rounding_mode="floor")).long()
    return (page * BS + pos % BS).reshape(-1)


def write_paged_rows(pages: torch.Tensor, rows: torch.Tensor, x: torch.Tensor) -> None:
    """Write x [N, Hkv, D] (or [R, T, Hkv, D]) at flat page rows int64 [N] (`paged_rows`) of pages
    [P, BS, Hkv, D], in place."""
    fn = "write_paged_rows"
    check_pages(fn, pages)
    xf = x.reshape(-1, *pages.shape[2:]) if x.dim() >= 3 and tuple(x.shape[-2:]) == tuple(pages.shape[2:]) else None
    if xf is None or rows.dim() != 1 or rows.shape[0] != xf.shape[0] or rows.dtype != torch.int64:
        raise ValueError(f"{fn}: rows int64 [N] {rows.dtype} {tuple(rows.shape)} and x [N, Hkv, D] "
                         f"{tuple(x.shape)} must match the pages {tuple(pages.shape)}")
    flat_pages(fn, pages).index_copy_(0, rows, xf)


# -------------------------------------------------------------------------------------------- attention
def infllmv2_attention_paged(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, table_row: torch.Tensor,
                             length: int, k1: torch.Tensor, k2: torch.Tensor, params: SparseParams, *,
                             scale: float | None = None, kernel_config: SparseKernelConfig | None = None
                             ) -> torch.Tensor:
    """InfLLM-V2 attention of q [1, Tq, Hq, D] at the last Tq of `length` keys of one paged row: k_pages, v_pages
    [P, BS, Hkv, D] (BS = params.block_size), table_row int32 [NB]; k1 [1, n1, Hkv, D], k2 [1, n2, Hkv, D] the
    row's compressed keys. Exactly `infllmv2_attention(q, gather_paged(k_pages, table_row, length), gather_paged(
    v_pages, ...), params, scale=scale, k1=k1, k2=k2)`. Inference only. Returns [1, Tq, Hq, D].

    With the Triton kernels it never gathers the context: the dense queries (positions < dense_positions) gather
    the at most dense_positions keys they see, the sparse ones select blocks with k1/k2 and run the block-sparse
    forward kernels reading K/V through the table, in query chunks.
    """
    fn = "infllmv2_attention_paged"
    check_no_grad(fn, q, k_pages, v_pages, k1, k2)
    check_page_pair(fn, k_pages, v_pages, params.block_size)
    check_block_table(fn, table_row, (1,), "table_row", k_pages)
    if q.dim() != 4 or q.shape[0] != 1:
        raise ValueError(f"{fn}: q must be [1, Tq, Hq, D], got {tuple(q.shape)}")
    Hkv, D = k_pages.shape[2:]
    if q.shape[3] != D or q.shape[2] % Hkv:
        raise ValueError(f"{fn}: q {tuple(q.shape)} does not fit k_pages {tuple(k_pages.shape)} (head_dim must "
                         f"match, query heads a multiple of KV heads)")
    Tq, BS = q.shape[1], params.block_size
    length = int(length)
    if not Tq <= length <= table_row.shape[0] * BS:
        raise ValueError(f"{fn}: length {length} must be in Tq = {Tq} .. {table_row.shape[0] * BS} (table_row "
                         f"{tuple(table_row.shape)} x pages of {BS} keys)")
    s = softmax_scale(q, scale)
    if not use_triton(q, k_pages, v_pages):
        k, v = gather_paged(k_pages, table_row, length), gather_paged(v_pages, table_row, length)
        return infllmv2_attention(q, k, v, params, scale=s, k1=k1, k2=k2, kernel_config=kernel_config)
    kf, vf = flat_pages(fn, k_pages), flat_pages(fn, v_pages)
    q_off = length - Tq
    n_dense = min(max(params.dense_positions - q_off, 0), Tq)
    out = torch.empty_like(q)
    with torch.no_grad():
        if n_dense > 0:
            kd = gather_paged_range(k_pages, table_row, 0, q_off + n_dense)
            vd = gather_paged_range(v_pages, table_row, 0, q_off + n_dense)
            out[:, :n_dense] = dense_causal_attention(q[:, :n_dense], kd, vd, scale=s)
            del kd, vd
        config = kernel_config_or_default(kernel_config)
        table = table_row.contiguous()
        band = (params.init_blocks, params.local_blocks)
        for a in range(n_dense, Tq, _NO_GRAD_QUERY_CHUNK):
            b = min(Tq, a + _NO_GRAD_QUERY_CHUNK)
            qc = q[:, a:b]
            idx = select_blocks(qc, k1, k2, params, q_offset=q_off + a, scale=s, kernel_config=kernel_config)
            pos, kbase = _paged_indices(b - a, q_off + a, q.device, torch.is_inference_mode_enabled())
            o_s, _ = tri.sparse_attention_fwd(qc[0].contiguous(), kf, vf, idx, pos, kbase, BS, s, band, config,
                                              block_table=table)
            out[0, a:b] = o_s
            del idx, o_s
    return out


@functools.lru_cache(maxsize=8)
def _paged_indices(Tq: int, q_offset: int, dev: torch.device, inference: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """pos int32 [Tq] (q_offset ..) and kbase int64 [Tq] (zeros: row 0 of a one-row table) of a paged chunk, kept
    per shape (read-only) so the sparse layers of one call share them."""
    pos = (q_offset + torch.arange(Tq, device=dev)).to(torch.int32)
    return pos, torch.zeros(Tq, dtype=torch.int64, device=dev)
