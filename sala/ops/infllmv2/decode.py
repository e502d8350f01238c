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
    check_qkv,
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
                         scale: float | None = None, kernel_config: SparseKernelConfig | None = None
                         ) -> torch.Tensor:
    """Blocks selected by the new token of every sequence: int32 [B, Hkv, 1, total_blocks], ascending, -1 padded,
    ties at the cut-off to the lowest block index. q [B, Hq, D]; k1_cache / k2_cache [B, S1|S2, Hkv, D];
    cache_seqlens int [B] (the new token is at cache_seqlens - 1); n_blocks: blocks of the cache capacity."""
    s = softmax_scale(q, scale)
    pos = cache_seqlens.to(torch.int64) - 1
    with torch.no_grad():
        if use_triton(q, k1_cache, k2_cache):
            config = kernel_config_or_default(kernel_config)
            pooled = triton_decode.pooled_block_scores_decode_split(q, k1_cache, k2_cache, pos.to(torch.int32), params,
                                                                    s, n_blocks, config)
            return topk_blocks_triton(pooled, params.total_blocks, max_cols=config.topk_max_cols)
        pooled = ref.pooled_block_scores_ref(q[:, None], k1_cache, k2_cache, pos[:, None], params, s, n_blocks)
        return ref.topk_block_indices(pooled, params.total_blocks)


def infllmv2_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k1_cache: torch.Tensor,
                    k2_cache: torch.Tensor, cache_seqlens: torch.Tensor, params: SparseParams, *,
                    scale: float | None = None, out: torch.Tensor | None = None,
                    kernel_config: SparseKernelConfig | None = None) -> torch.Tensor:
    """One new token per sequence (CUDA-graph friendly: no host sync, shapes fixed by the caches).

    q [B, Hq, D]; k_cache, v_cache [B, S, Hkv, D]; k1_cache [B, S1, Hkv, D], k2_cache [B, S2, Hkv, D] kept
    up to date (update_compressed_keys); cache_seqlens int [B]: valid keys including the new token, which is at
    position cache_seqlens - 1. Returns o [B, Hq, D] (written into `out` if given). kernel_config: Triton launch
    settings (None: the defaults).
    """
    if q.dim() != 3:
        raise ValueError(f"infllmv2_decode: q must be [B, Hq, D], got {tuple(q.shape)}")
    check_qkv("infllmv2_decode", q[:, None], k_cache, v_cache)
    B, Hq, D = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    for name, t in (("k1_cache", k1_cache), ("k2_cache", k2_cache)):
        if t.dim() != 4 or t.shape[0] != B or t.shape[2:] != k_cache.shape[2:]:
            raise ValueError(f"infllmv2_decode: {name} {tuple(t.shape)} must be [B, S', Hkv, D] matching k_cache "
                             f"{tuple(k_cache.shape)}")
    if cache_seqlens.shape != (B,):
        raise ValueError(f"infllmv2_decode: cache_seqlens {tuple(cache_seqlens.shape)} must be [{B}]")
    s = softmax_scale(q, scale)
    pos = cache_seqlens.to(torch.int64) - 1                             # [B]
    kbase = torch.arange(B, device=q.device) * S
    kf, vf = k_cache.reshape(B * S, Hkv, D), v_cache.reshape(B * S, Hkv, D)
    idx = decode_select_blocks(q, k1_cache, k2_cache, cache_seqlens, params, -(-S // params.block_size), scale=s,
                               kernel_config=kernel_config)
    with torch.no_grad():
        if use_triton(q, k_cache, v_cache, k1_cache, k2_cache):
            o = triton_decode.sparse_decode_splitk(q.contiguous(), kf, vf, idx, pos.to(torch.int32), kbase,
                                                   params.block_size, s, kernel_config_or_default(kernel_config))
        else:
            o = ref.sparse_attention_flat_ref(q, kf, vf, idx.permute(0, 2, 1, 3).reshape(B, Hkv, -1), pos, kbase,
                                              params.block_size, s)
    if out is not None:
        out.copy_(o)
        return out
    return o
