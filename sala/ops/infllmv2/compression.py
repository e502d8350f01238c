"""InfLLM-V2 key compression: mean-pooled K1 / K2 windows (Triton on GPU, PyTorch reference elsewhere)."""
from __future__ import annotations

import torch

from sala.ops.dispatch import triton_available, use_triton
from sala.ops.infllmv2 import reference as ref
from sala.ops.infllmv2.params import SparseParams, check_block_table, check_no_grad, check_pages, flat_pages

if triton_available():
    from sala.ops.infllmv2 import triton_compression as tri
else:  # pragma: no cover - without triton every call takes the reference path
    tri = None


def compress_keys(k: torch.Tensor, kernel_size: int, stride: int) -> torch.Tensor:
    """Mean-pooled keys: k [B, T, Hkv, D] -> [B, n, Hkv, D], n = (T - kernel_size) // stride + 1 (0 if T < kernel).

    Window j covers keys [stride*j, stride*j + kernel_size); mean in fp32, output in k.dtype.
    """
    if k.dim() != 4:
        raise ValueError(f"compress_keys: k must be [B, T, Hkv, D], got {tuple(k.shape)}")
    if kernel_size <= 0 or stride <= 0:
        raise ValueError(f"compress_keys: kernel_size {kernel_size} and stride {stride} must be positive")
    if use_triton(k):
        return tri.compress_keys_triton(k, kernel_size, stride)
    return ref.compress_keys_ref(k, kernel_size, stride)


def compress_window_range(k: torch.Tensor, first: int, end: int, kernel_size: int, stride: int) -> torch.Tensor:
    """Windows first..end-1 of `compress_keys(k, kernel_size, stride)`, reading only the keys they cover.

    k [B, T, Hkv, D] -> [B, end - first, Hkv, D]: how a cache extends its compressed keys after an append.
    """
    return compress_keys(k[:, stride * first: stride * (end - 1) + kernel_size], kernel_size, stride)


def update_compressed_keys(k_cache: torch.Tensor, k1_cache: torch.Tensor, k2_cache: torch.Tensor,
                           cache_seqlens: torch.Tensor, params: SparseParams, *, new_tokens: int = 1,
                           block_table: torch.Tensor | None = None) -> None:
    """Extend compressed key caches in place after keys were appended (CUDA-graph friendly, no host sync).

    k_cache [B, S, Hkv, D]; k1_cache [B, S1, Hkv, D]; k2_cache [B, S2, Hkv, D]; cache_seqlens int [B]: valid keys
    per sequence *after* the append. The last `new_tokens` keys of every sequence are new (decode: 1; a prefill
    chunk: its length), so windows [n(len - new_tokens), n(len)) are written; windows past S1/S2 are dropped.
    block_table int32 [B, NB] (inference only): k_cache is pages [P, block_size, Hkv, D] read through the table
    (S = NB * block_size), the same result as on `gather_paged(k_cache, block_table, S)`.
    """
    fn = "update_compressed_keys"
    if k_cache.dim() != 4 or k1_cache.dim() != 4 or k2_cache.dim() != 4:
        raise ValueError(f"{fn}: caches must be [B, S, Hkv, D]; got k {tuple(k_cache.shape)}, "
                         f"k1 {tuple(k1_cache.shape)}, k2 {tuple(k2_cache.shape)}")
    if block_table is not None:
        check_no_grad(fn, k_cache, k1_cache, k2_cache)
        check_block_table(fn, block_table, (2,), pages=k_cache)
        check_pages(fn, k_cache, params.block_size, "k_cache")
        flat_pages(fn, k_cache)
        B = block_table.shape[0]
        for name, t in (("k1_cache", k1_cache), ("k2_cache", k2_cache)):
            if t.shape[0] != B or t.shape[2:] != k_cache.shape[2:]:
                raise ValueError(f"{fn}: {name} {tuple(t.shape)} must be [{B}, S', Hkv, D] for block_table "
                                 f"{tuple(block_table.shape)} and pages {tuple(k_cache.shape)}")
        if cache_seqlens.shape != (B,):
            raise ValueError(f"{fn}: cache_seqlens {tuple(cache_seqlens.shape)} must be [{B}] (rows of "
                             f"block_table {tuple(block_table.shape)})")
    elif cache_seqlens.shape != (k_cache.shape[0],):
        raise ValueError(f"{fn}: cache_seqlens {tuple(cache_seqlens.shape)} must be "
                         f"[{k_cache.shape[0]}] (batch of k_cache {tuple(k_cache.shape)})")
    if new_tokens < 1:
        raise ValueError(f"{fn}: new_tokens must be >= 1, got {new_tokens}")
    table = None if block_table is None else block_table.contiguous()
    if use_triton(k_cache, k1_cache, k2_cache, cache_seqlens):
        tri.update_compressed_keys_triton(k_cache, k1_cache, k2_cache, cache_seqlens, params, new_tokens, table)
    else:
        ref.update_compressed_keys_ref(k_cache, k1_cache, k2_cache, cache_seqlens, params, new_tokens, table)
