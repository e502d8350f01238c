"""Triton kernels of InfLLM-V2 key compression (mean-pooled K1/K2 windows)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sala.ops.infllmv2.triton_utils import pow2


@triton.jit(do_not_specialize=["new_tokens", "n_cap"])
def _compress_windows_kernel(k_ptr, out_ptr, len_ptr, table_ptr, new_tokens, n_cap,
                             skb, skt, skh, sob, sot, soh,
                             KERNEL: tl.constexpr, STRIDE: tl.constexpr, D: tl.constexpr, BJ: tl.constexpr,
                             PAGED: tl.constexpr = False, BS: tl.constexpr = 1):
    """Program (window tile, kv head, sequence). PAGED: k is pages of BS keys, sequence b's key t at flat row
    table[b * skb + t // BS] * BS + t % BS (skb: the table's row stride; table_ptr unread otherwise)."""
    pid_j = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    length = tl.load(len_ptr + b).to(tl.int32)
    old = tl.maximum(length - new_tokens, 0)
    n_new = tl.where(length >= KERNEL, (tl.maximum(length - KERNEL, 0)) // STRIDE + 1, 0)
    n_old = tl.where(old >= KERNEL, (tl.maximum(old - KERNEL, 0)) // STRIDE + 1, 0)
    j = n_old + pid_j * BJ + tl.arange(0, BJ)
    jm = (j < n_new) & (j < n_cap)
    d = tl.arange(0, D)
    acc = tl.zeros([BJ, D], dtype=tl.float32)
    if PAGED:
        base = k_ptr + h * skh
    else:
        base = k_ptr + b.to(tl.int64) * skb + h * skh
    for c in range(KERNEL):
        t = (j * STRIDE + c).to(tl.int64)
        if PAGED:
            page = tl.load(table_ptr + b.to(tl.int64) * skb + t // BS, mask=jm, other=0)
            t = page.to(tl.int64) * BS + t % BS
        acc += tl.load(base + t[:, None] * skt + d[None, :], mask=jm[:, None], other=0.0).to(tl.float32)
    acc = acc / KERNEL
    optr = out_ptr + b.to(tl.int64) * sob + h * soh + j.to(tl.int64)[:, None] * sot + d[None, :]
    tl.store(optr, acc.to(out_ptr.dtype.element_ty), mask=jm[:, None])


def compress_windows(k: torch.Tensor, out: torch.Tensor, lengths: torch.Tensor, kernel: int, stride: int,
                     new_tokens: int, block_table: torch.Tensor | None = None) -> None:
    """Write windows [n(len - new_tokens), n(len)) of every sequence into `out` (k [B, S, H, D], out [B, n, H, D]).
    block_table int32 [B, NB]: k is pages [P, BS, H, D] (rows viewable flat), read through the table."""
    H, D = k.shape[2], k.shape[3]
    B = k.shape[0] if block_table is None else block_table.shape[0]
    if out.shape[1] == 0 or B == 0:
        return
    n_max = min(new_tokens // stride + 1, out.shape[1])
    BJ = 16 if n_max >= 16 else pow2(n_max)
    grid = (triton.cdiv(n_max, BJ), H, B)
    if block_table is None:   # lengths stand in for the table (never read)
        table, skb, paged = lengths, k.stride(0), {}
    else:
        table, skb, paged = block_table, block_table.stride(0), dict(PAGED=True, BS=k.shape[1])
    _compress_windows_kernel[grid](k, out, lengths, table, new_tokens, out.shape[1],
                                   skb, k.stride(1), k.stride(2), out.stride(0), out.stride(1), out.stride(2),
                                   KERNEL=kernel, STRIDE=stride, D=D, BJ=BJ, **paged)


def compress_keys_triton(k: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    B, T, H, D = k.shape
    n = (T - kernel) // stride + 1 if T >= kernel else 0
    out = torch.empty(B, n, H, D, dtype=k.dtype, device=k.device)
    if n:
        lengths = torch.full((B,), T, dtype=torch.int32, device=k.device)
        compress_windows(k, out, lengths, kernel, stride, new_tokens=T)
    return out


def update_compressed_keys_triton(k_cache, k1_cache, k2_cache, cache_seqlens, params, new_tokens: int,
                                  block_table: torch.Tensor | None = None) -> None:
    compress_windows(k_cache, k1_cache, cache_seqlens, params.kernel_size, params.kernel_stride, new_tokens,
                     block_table)
    compress_windows(k_cache, k2_cache, cache_seqlens, params.k2_kernel, params.k2_stride, new_tokens, block_table)
