"""InfLLM-V2 attention over packed documents (one row, document bounds `cu_seqlens`).

`infllmv2_varlen_attention` (default): the dense-exact prefixes of all documents in one packed dense call, then
compression and selection per document and one block-sparse call over all sparse queries of the row.
`infllmv2_varlen_fused` (SALA_SPARSE_VARLEN=fused, Triton only) runs without a host loop over documents:
1. per-document tables built by vectorised torch ops (CPU for the tiny per-document ones, device
   `repeat_interleave(..., output_size=...)` for the per-token ones: no device sync);
2. K1 and K2 of every document by one flat compression launch each (window starts as a tensor);
3. stage-1 selection of all sparse queries (position >= dense_positions in their document) by one launch per
   query chunk of `_varlen_block_scores_kernel` (tiles of one document's consecutive sparse queries);
4. one block-sparse attention call over all T tokens: sparse queries attend to their selected blocks, the
   dense-exact ones (position < dense_positions) to every block up to their own (= dense causal attention),
   so no per-document SDPA. Rows whose documents are all dense and short use one masked SDPA instead.
"""
from __future__ import annotations

import bisect

import torch

from sala.ops.dense import _MASKED_VARLEN_MAX_T, dense_causal_attention, flash_varlen_fn
from sala.ops.dispatch import triton_available, use_triton
from sala.ops.infllmv2.compression import compress_keys
from sala.ops.infllmv2.params import SparseParams, kernel_variant, n_windows
from sala.ops.infllmv2.selection import select_blocks
from sala.ops.infllmv2.sparse_attention import sparse_attention_flat

if triton_available():
    from sala.ops.infllmv2 import triton_compression, triton_selection
    from sala.ops.infllmv2.triton_topk import topk_blocks_triton
    from sala.ops.infllmv2.triton_utils import TUNING
else:  # pragma: no cover - without triton every call takes the reference path
    triton_compression = triton_selection = topk_blocks_triton = TUNING = None


def infllmv2_varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: SparseParams, scale: float,
                              cu_seqlens: torch.Tensor) -> torch.Tensor:
    """InfLLM-V2 attention of one packed row q [1, T, Hq, D], k, v [1, T, Hkv, D] whose documents (bounds
    cu_seqlens [n_docs + 1]) each start at position 0. Returns [1, T, Hq, D]."""
    B, T, Hq, D = q.shape
    if B != 1 or k.shape[1] != T:
        raise ValueError(f"infllmv2_attention: cu_seqlens needs B == 1 and Tq == Tk; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    bounds = [int(x) for x in cu_seqlens.tolist()]
    if not bounds or bounds[0] != 0 or bounds[-1] != T or any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
        raise ValueError(f"infllmv2_attention: cu_seqlens {bounds} must rise from 0 to T = {T}")
    if kernel_variant("SALA_SPARSE_VARLEN") == "fused" and use_triton(q, k, v):
        return infllmv2_varlen_fused(q, k, v, params, scale, bounds)
    dp, bs, dev = params.dense_positions, params.block_size, q.device
    if all(e - s <= dp for s, e in zip(bounds[:-1], bounds[1:])):   # every document short: dense only
        return dense_causal_attention(q, k, v, scale=scale, cu_seqlens=torch.tensor(bounds))
    # The dense-exact prefixes of all documents in one packed call (FlashAttention varlen on CUDA): one SDPA
    # call per document would meet a new shape, and with cuDNN a new execution plan, almost every step.
    docs = [(s, e) for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
    dense_tok = torch.cat([torch.arange(s, s + min(e - s, dp)) for s, e in docs]).to(dev, non_blocking=True)
    prefix_cu = [0]
    for s, e in docs:
        prefix_cu.append(prefix_cu[-1] + min(e - s, dp))
    o_dense = dense_causal_attention(q[:, dense_tok], k[:, dense_tok], v[:, dense_tok], scale=scale,
                                     cu_seqlens=torch.tensor(prefix_cu))[0]
    dense_parts, idx_parts, tok, pos, kbase, gbase, gks, gblk = [], [], [], [], [], [], [], []
    n_gid = 0
    for (s, e), p0, p1 in zip(docs, prefix_cu[:-1], prefix_cu[1:]):
        L = e - s
        dense_parts.append(o_dense[p0:p1])
        if L > dp:
            kd = k[:, s:e].detach()
            k1 = compress_keys(kd, params.kernel_size, params.kernel_stride)
            k2 = compress_keys(kd, params.k2_kernel, params.k2_stride)
            idx_parts.append(select_blocks(q[:, s + dp:e].detach(), k1, k2, params, q_offset=dp, scale=scale))
            nb = -(-L // bs)
            ar = torch.arange(dp, L, device=dev)
            tok.append(s + ar)
            pos.append(ar)
            kbase.append(torch.full_like(ar, s))
            gbase.append(torch.full_like(ar, n_gid))
            gb = torch.arange(nb, device=dev)
            gks.append(s + gb * bs)
            gblk.append(gb)
            n_gid += nb
        else:
            idx_parts.append(None)
    tok_all = torch.cat(tok)
    o_s = sparse_attention_flat(q[0, tok_all], k[0], v[0], torch.cat([p for p in idx_parts if p is not None], dim=2),
                       torch.cat(pos), torch.cat(kbase), torch.cat(gbase), torch.cat(gks), torch.cat(gblk), n_gid,
                       params, scale, forced_blocks=True)
    out, used = [], 0
    for dense, idx in zip(dense_parts, idx_parts):
        out.append(dense)
        if idx is not None:
            out.append(o_s[used:used + idx.shape[2]])
            used += idx.shape[2]
    return torch.cat(out, dim=0)[None]


def _excl_cumsum(x: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(x, 0) - x


def infllmv2_varlen_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params, scale: float,
                          bounds: list[int]) -> torch.Tensor:
    """q [1, T, Hq, D], k, v [1, T, Hkv, D]; bounds: validated cu_seqlens as host ints. Returns [1, T, Hq, D]."""
    _, T, Hq, D = q.shape
    Hkv = k.shape[2]
    dev = q.device
    dp, bs, K = params.dense_positions, params.block_size, params.total_blocks
    cu = torch.tensor(bounds, dtype=torch.int64)
    starts, lens = cu[:-1], cu[1:] - cu[:-1]
    keep = lens > 0
    starts, lens = starts[keep], lens[keep]
    Nd = int(lens.numel())
    if Nd == 0:
        return q.clone()
    n_sparse = (lens - dp).clamp(min=0)
    Ns = int(n_sparse.sum())
    route, dense_fn = _dense_route(q, lens, params)
    if route == "row_masked_sdpa":
        return dense_causal_attention(q, k, v, scale=scale, cu_seqlens=cu)

    # per-document tables (host), then one copy to the device
    n1 = n_windows(lens, params.kernel_size, params.kernel_stride)
    n2 = n_windows(lens, params.k2_kernel, params.k2_stride)
    nb = torch.div(lens + bs - 1, bs, rounding_mode="floor")
    BQ = triton_selection.varlen_select_tokens(Hq // Hkv)
    n_tiles = torch.div(n_sparse + BQ - 1, BQ, rounding_mode="floor")
    k1off, k2off, goff, soff, toff = (_excl_cumsum(x) for x in (n1, n2, nb, n_sparse, n_tiles))
    W1, W2, n_gid, NT = int(n1.sum()), int(n2.sum()), int(nb.sum()), int(n_tiles.sum())
    docs = torch.stack([starts, lens, k1off, k2off, goff, soff, n1, n2, nb, n_sparse]).to(dev)
    d_start, d_len, d_k1off, d_k2off, d_goff, d_soff, d_n1, d_n2, d_nb, d_ns = docs
    doc_ids = torch.arange(Nd, device=dev)

    # per-token and per-global-block tables (device, no sync)
    tok_doc = torch.repeat_interleave(doc_ids, d_len, output_size=T)
    tok = torch.arange(T, device=dev)
    pos = tok - d_start[tok_doc]
    kbase = d_start[tok_doc]
    gbase = d_goff[tok_doc]
    gid_doc = torch.repeat_interleave(doc_ids, d_nb, output_size=n_gid)
    gid_blk = torch.arange(n_gid, device=dev) - d_goff[gid_doc]
    gid_kstart = d_start[gid_doc] + gid_blk * bs

    if dense_fn is None:
        # dense-exact queries attend to every block up to their own; sparse rows are overwritten below
        slots = torch.arange(K, device=dev, dtype=torch.int32)
        qblk = torch.div(pos, bs, rounding_mode="floor").to(torch.int32)
        block_idx = torch.where(slots[None, :] <= qblk[:, None], slots[None, :], torch.full_like(slots, -1)[None, :])
        block_idx = block_idx[None, None].expand(1, Hkv, T, K).contiguous()
    else:
        block_idx = torch.empty(1, Hkv, Ns, K, dtype=torch.int32, device=dev)

    if Ns:
        kd = k[0].detach()
        w1_doc = torch.repeat_interleave(doc_ids, d_n1, output_size=W1)
        w2_doc = torch.repeat_interleave(doc_ids, d_n2, output_size=W2)
        st1 = d_start[w1_doc] + (torch.arange(W1, device=dev) - d_k1off[w1_doc]) * params.kernel_stride
        st2 = d_start[w2_doc] + (torch.arange(W2, device=dev) - d_k2off[w2_doc]) * params.k2_stride
        k1 = triton_compression.compress_flat(kd, st1, params.kernel_size)
        k2 = triton_compression.compress_flat(kd, st2, params.k2_kernel)
        sq_doc = torch.repeat_interleave(doc_ids, d_ns, output_size=Ns)
        sq_tok = d_start[sq_doc] + dp + (torch.arange(Ns, device=dev) - d_soff[sq_doc])
        sq_pos = (sq_tok - d_start[sq_doc]).to(torch.int32)
        t_doc = torch.repeat_interleave(torch.arange(Nd), n_tiles)
        t_first = soff[t_doc] + (torch.arange(NT) - toff[t_doc]) * BQ
        t_count = torch.minimum(torch.full_like(t_first, BQ), soff[t_doc] + n_sparse[t_doc] - t_first)
        tiles = torch.stack([t_first, t_count, k1off[t_doc], k2off[t_doc]], dim=1).to(dev)
        first_host = t_first.tolist()
        n_blocks = int(nb[n_sparse > 0].max())
        chunk = max(1, TUNING["select_chunk_bytes"] // (4 * Hkv * n_blocks))
        qd = q[0].detach()
        with torch.no_grad():
            for a in range(0, Ns, chunk):
                b = min(Ns, a + chunk)
                t_lo = bisect.bisect_right(first_host, a) - 1
                t_hi = bisect.bisect_left(first_host, b)
                pooled = triton_selection.varlen_pooled_block_scores(qd, k1, k2, sq_tok, sq_pos, tiles, t_lo, t_hi, a, b,
                                                        params, scale, n_blocks)
                if dense_fn is None:
                    block_idx[0][:, sq_tok[a:b]] = topk_blocks_triton(pooled, K)
                else:
                    block_idx[0, :, a:b] = topk_blocks_triton(pooled, K)
                del pooled
    if dense_fn is None:
        o = sparse_attention_flat(q[0], k[0], v[0], block_idx, pos, kbase, gbase, gid_kstart, gid_blk, n_gid, params, scale,
                         forced_blocks=True)
        return o[None]
    # dense prefixes of all documents by one FlashAttention varlen call; sparse queries by one block-sparse call
    n_dense = torch.clamp(lens, max=dp)
    Nq = int(n_dense.sum())
    cu_dense = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(n_dense, 0)])
    dn_doc = torch.repeat_interleave(doc_ids, n_dense.to(dev), output_size=Nq)
    dense_tok = d_start[dn_doc] + torch.arange(Nq, device=dev) - cu_dense.to(dev)[dn_doc]
    o_d = dense_fn(q[0, dense_tok], k[0, dense_tok], v[0, dense_tok], cu_dense.to(dev, torch.int32),
                   cu_dense.tolist(), int(n_dense.max()), scale)
    if not Ns:
        order = dense_tok
        o_all = o_d
    else:
        o_s = sparse_attention_flat(q[0, sq_tok], k[0], v[0], block_idx, sq_pos, d_start[sq_doc], d_goff[sq_doc], gid_kstart,
                           gid_blk, n_gid, params, scale, forced_blocks=True)
        order = torch.cat([dense_tok, sq_tok])
        o_all = torch.cat([o_d, o_s])
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(T, device=dev))
    return o_all[inverse][None]


def dense_route(q: torch.Tensor, lens: torch.Tensor, params) -> str:
    """How the fused path runs the dense-exact positions of a packed row with document lengths `lens` (host):
    'row_masked_sdpa' (every document dense, row <= 8192 tokens: one masked SDPA for the whole row),
    'flash_varlen' (one FlashAttention varlen call), 'masked_sdpa' (one masked SDPA over the gathered dense
    prefixes, <= 8192 of them) or 'sparse_kernel' (inside the block-sparse call, every block up to their own)."""
    return _dense_route(q, lens, params)[0]


def _dense_route(q, lens, params):
    dp = params.dense_positions
    n_dense = int(torch.clamp(lens, max=dp).sum())
    all_dense = bool((lens <= dp).all())
    fn = _dense_prefix_fn(q, n_dense)
    if all_dense and int(lens.sum()) <= _MASKED_VARLEN_MAX_T and (fn is None or fn[0] != "flash_varlen"):
        return "row_masked_sdpa", None
    return ("sparse_kernel", None) if fn is None else fn


def _dense_prefix_fn(q: torch.Tensor, n_dense: int):
    """(name, fn) for the dense prefixes: FlashAttention varlen on CUDA in fp16/bf16 where it works, else one
    masked SDPA when there are <= 8192 dense positions; None: they run in the block-sparse kernel.
    fn(q, k, v [n_dense, H, D], cu int32 device, cu host list, max_len, scale) -> [n_dense, Hq, D]."""
    fn = flash_varlen_fn(q)
    if fn is not None:
        return "flash_varlen", fn
    if n_dense <= _MASKED_VARLEN_MAX_T:
        return "masked_sdpa", _masked_sdpa_prefixes
    return None


def _masked_sdpa_prefixes(q, k, v, cu, cu_host, max_len, scale):
    """Dense causal attention of packed prefixes by one SDPA call with a block-diagonal mask (<= 8192 rows)."""
    return dense_causal_attention(q[None], k[None], v[None], scale=scale, cu_seqlens=torch.tensor(cu_host))[0]
