"""InfLLM-V2 decode: one new token per sequence against fixed-size caches (CUDA-graph friendly)."""
from __future__ import annotations

import torch

from sala.ops.dispatch import triton_available, use_triton
from sala.ops.infllmv2 import reference as ref
from sala.ops.infllmv2.params import SparseParams, check_qkv, kernel_variant, softmax_scale

if triton_available():
    from sala.ops.infllmv2 import triton_attention, triton_decode, triton_selection
    from sala.ops.infllmv2.triton_topk import topk_blocks_triton
else:  # pragma: no cover - without triton every call takes the reference path
    triton_attention = triton_decode = triton_selection = topk_blocks_triton = None


def infllmv2_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k1_cache: torch.Tensor,
                    k2_cache: torch.Tensor, cache_seqlens: torch.Tensor, params: SparseParams, *,
                    scale: float | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """One new token per sequence (CUDA-graph friendly: no host sync, shapes fixed by the caches).

    q [B, Hq, D]; k_cache, v_cache [B, S, Hkv, D]; k1_cache [B, S1, Hkv, D], k2_cache [B, S2, Hkv, D] kept
    up to date (update_compressed_keys); cache_seqlens int [B]: valid keys including the new token, which is at
    position cache_seqlens - 1. Returns o [B, Hq, D] (written into `out` if given).
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
    pos = (cache_seqlens.to(torch.int64) - 1)[:, None]                  # [B, 1]
    n_blocks = -(-S // params.block_size)
    kbase = torch.arange(B, device=q.device) * S
    kf, vf = k_cache.reshape(B * S, Hkv, D), v_cache.reshape(B * S, Hkv, D)
    with torch.no_grad():
        if use_triton(q, k_cache, v_cache, k1_cache, k2_cache):
            if kernel_variant("SALA_SPARSE_DECODE_SELECT") == "split":
                pooled = triton_decode.pooled_block_scores_decode_split(q, k1_cache, k2_cache, pos.view(-1).to(torch.int32),
                                                              params, s, n_blocks)
            else:
                pooled = triton_selection.pooled_block_scores_triton(q[:, None], k1_cache, k2_cache, pos.to(torch.int32), params,
                                                        s, n_blocks)
            idx = topk_blocks_triton(pooled, params.total_blocks)
            if kernel_variant("SALA_SPARSE_DECODE") == "splitk":
                o = triton_decode.sparse_decode_splitk(q.contiguous(), kf, vf, idx, pos.view(-1).to(torch.int32), kbase,
                                             params.block_size, s)
            else:
                o, _ = triton_attention.sparse_attention_fwd(q.contiguous(), kf, vf, idx, pos.view(-1).to(torch.int32), kbase,
                                                params.block_size, s)
        else:
            pooled = ref.pooled_block_scores_ref(q[:, None], k1_cache, k2_cache, pos, params, s, n_blocks)
            idx = ref.topk_block_indices(pooled, params.total_blocks)
            o = ref.sparse_attention_flat_ref(q, kf, vf, idx.permute(0, 2, 1, 3).reshape(B, Hkv, -1), pos.view(-1),
                                              kbase, params.block_size, s)
    if out is not None:
        out.copy_(o)
        return out
    return o
