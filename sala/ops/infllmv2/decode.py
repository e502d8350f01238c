"""InfLLM-V2 decode: one new token per sequence against fixed-size caches (CUDA-graph friendly: no host sync,
shapes fixed by the caches). On the GPU both stages are split over many programs (split-N selection over the
compressed keys, split-K attention over the selected blocks), as flash-decoding does for dense attention."""
from __future__ import annotations

import torch

from sala.ops.dispatch import triton_available, use_triton
from sala.ops.infllmv2 import reference as ref
from sala.ops.infllmv2.params import (
    SparseKernelConfig,
    SparseParams,
    check_block_table,
    check_no_grad,
    check_page_pair,
    check_qkv,
    flat_pages,
    kernel_config_or_default,
    softmax_scale,
)

if triton_available():
    from sala.ops.infllmv2 import triton_decode
    from sala.ops.infllmv2.triton_topk import topk_blocks_triton
else:  # pragma: no cover - without triton every call takes the reference path
    triton_decode = topk_blocks_triton = None


def decode_select_blocks(q: torch.Tensor, k1_cache: torch.Tensor, k2_cache: torch.Tensor,
                         cache_seqlens: torch.Tensor, params: SparseParams, n_blocks: int, *,
                         scale: float | None = None, kernel_config: SparseKernelConfig | None = None,
                         queries_per_row: int = 1) -> torch.Tensor:
    """Blocks selected by each query: int32 [B, Hkv, 1, total_blocks], ascending, -1 padded, ties at the cut-off to
    the lowest block index. q [B, Hq, D]; k1_cache / k2_cache [B / queries_per_row, S1|S2, Hkv, D] (query row b
    belongs to cache row b // queries_per_row); cache_seqlens int [B] (the query is at cache_seqlens - 1);
    n_blocks: blocks of the cache capacity."""
    s = softmax_scale(q, scale)
    pos = cache_seqlens.to(torch.int64) - 1
    with torch.no_grad():
        if use_triton(q, k1_cache, k2_cache):
            config = kernel_config_or_default(kernel_config)
            pooled = triton_decode.pooled_block_scores_decode_split(q, k1_cache, k2_cache, pos.to(torch.int32), params,
                                                                    s, n_blocks, config, queries_per_row)
            return topk_blocks_triton(pooled, params.total_blocks, max_cols=config.topk_max_cols)
        T = queries_per_row
        R = q.shape[0] // T
        pooled = ref.pooled_block_scores_ref(q.reshape(R, T, *q.shape[1:]), k1_cache, k2_cache, pos.reshape(R, T),
                                             params, s, n_blocks)                     # [R, Hkv, T, n_blocks]
        pooled = pooled.permute(0, 2, 1, 3).reshape(q.shape[0], pooled.shape[1], 1, n_blocks)
        return ref.topk_block_indices(pooled, params.total_blocks)


def infllmv2_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k1_cache: torch.Tensor,
                    k2_cache: torch.Tensor, cache_seqlens: torch.Tensor, params: SparseParams, *,
                    scale: float | None = None, out: torch.Tensor | None = None,
                    kernel_config: SparseKernelConfig | None = None, queries_per_row: int = 1,
                    block_table: torch.Tensor | None = None) -> torch.Tensor:
    """New tokens against fixed-size caches (CUDA-graph friendly: no host sync, shapes fixed by the caches).

    q [B, Hq, D]: one query per row, or `queries_per_row` (T) consecutive queries of each cache row (query row b
    belongs to cache row b // T: a verify step's T tokens); k_cache, v_cache [B / T, S, Hkv, D]; k1_cache
    [B / T, S1, Hkv, D], k2_cache [B / T, S2, Hkv, D] kept up to date (update_compressed_keys); cache_seqlens int
    [B]: keys each query sees, itself included (it is at position cache_seqlens - 1). Returns o [B, Hq, D] (written
    into `out` if given). kernel_config: Triton launch settings (None: the defaults).

    block_table int32 [B / T, NB] (paged K/V, inference only): k_cache, v_cache are pages [P, block_size, Hkv, D]
    and cache row r's key t is k_cache[block_table[r, t // block_size], t % block_size] (capacity NB *
    block_size); the same result as the contiguous caches `gather_paged(k_cache, block_table, NB * block_size)`.
    """
    if q.dim() != 3:
        raise ValueError(f"infllmv2_decode: q must be [B, Hq, D], got {tuple(q.shape)}")
    T = int(queries_per_row)
    bs = params.block_size
    if block_table is not None:
        check_no_grad("infllmv2_decode", q, k_cache, v_cache, k1_cache, k2_cache)
        check_block_table("infllmv2_decode", block_table, (2,), pages=k_cache)
        check_page_pair("infllmv2_decode", k_cache, v_cache, bs)
        R, NB = block_table.shape
        S = NB * bs
    else:
        R, S = k_cache.shape[0], k_cache.shape[1]
        NB = -(-S // bs)
    if T < 1 or q.shape[0] != R * T:
        raise ValueError(f"infllmv2_decode: q has {q.shape[0]} rows; with queries_per_row={queries_per_row} it "
                         f"must have {T} x {R} (the cache rows)")
    Hkv = k_cache.shape[2]
    if block_table is None:
        check_qkv("infllmv2_decode", q.reshape(R, T, *q.shape[1:]), k_cache, v_cache)
    elif q.shape[2] != k_cache.shape[3] or q.shape[1] % Hkv:
        raise ValueError(f"infllmv2_decode: q {tuple(q.shape)} does not fit the pages {tuple(k_cache.shape)} "
                         f"(head_dim must match, query heads a multiple of KV heads)")
    B, Hq, D = q.shape
    for name, t in (("k1_cache", k1_cache), ("k2_cache", k2_cache)):
        if t.dim() != 4 or t.shape[0] != R or t.shape[2:] != k_cache.shape[2:]:
            raise ValueError(f"infllmv2_decode: {name} {tuple(t.shape)} must be [{R}, S', Hkv, D] matching k_cache "
                             f"{tuple(k_cache.shape)}")
    if cache_seqlens.shape != (B,):
        raise ValueError(f"infllmv2_decode: cache_seqlens {tuple(cache_seqlens.shape)} must be [{B}]")
    s = softmax_scale(q, scale)
    pos = cache_seqlens.to(torch.int64) - 1                             # [B]
    if block_table is None:
        kbase = torch.arange(B, device=q.device) // T * S               # each query's cache row in the flat K/V
        kf, vf = k_cache.reshape(R * S, Hkv, D), v_cache.reshape(R * S, Hkv, D)
        table = None
    else:
        kbase = torch.arange(B, device=q.device) // T * NB              # each query's row in the flat table
        kf, vf = flat_pages("infllmv2_decode", k_cache), flat_pages("infllmv2_decode", v_cache)
        table = block_table.contiguous()
    idx = decode_select_blocks(q, k1_cache, k2_cache, cache_seqlens, params, NB, scale=s,
                               kernel_config=kernel_config, queries_per_row=T)
    with torch.no_grad():
        if use_triton(q, k_cache, v_cache, k1_cache, k2_cache):
            o = triton_decode.sparse_decode_splitk(q.contiguous(), kf, vf, idx, pos.to(torch.int32), kbase, bs, s,
                                                   kernel_config_or_default(kernel_config), block_table=table)
        else:
            o = ref.sparse_attention_flat_ref(q, kf, vf, idx.permute(0, 2, 1, 3).reshape(B, Hkv, -1), pos, kbase,
                                              bs, s, block_table=table)
    if out is not None:
        out.copy_(o)
        return out
    return o
