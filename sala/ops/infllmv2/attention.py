"""InfLLM-V2 sparse attention of a whole query range: dense SDPA below `dense_positions`, block selection and
block-sparse attention after (docs/sparse.md, SALA.md §2).

For a query at position p with q_blk = p // block_size, block selection applies at every position. If
q_blk + 1 <= total_blocks (= topk + window_size // block_size) the query keeps all its blocks, i.e. exact dense
causal attention: positions < `dense_positions` run through SDPA. Otherwise stage-1 scores (coarse K2
log-sum-exp, fine K1 probabilities summed over the G heads of the group) are max-pooled into blocks, init and
local blocks forced, the top `total_blocks` kept, and one causal softmax runs over their tokens.
"""
from __future__ import annotations

import torch

from sala.ops.dense import dense_causal_attention
from sala.ops.infllmv2.compression import compress_keys
from sala.ops.infllmv2.params import SparseKernelConfig, SparseParams, check_qkv, softmax_scale
from sala.ops.infllmv2.selection import select_blocks
from sala.ops.infllmv2.sparse_attention import block_sparse_attention
from sala.ops.infllmv2.varlen import infllmv2_varlen_attention

# Sparse queries per selection+attention step when no gradient is needed (bounds block-index memory).
_NO_GRAD_QUERY_CHUNK = 16384


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def infllmv2_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: SparseParams, *,
                       scale: float | None = None, k1: torch.Tensor | None = None, k2: torch.Tensor | None = None,
                       cu_seqlens: torch.Tensor | None = None,
                       kernel_config: SparseKernelConfig | None = None) -> torch.Tensor:
    """InfLLM-V2 attention of q [B, Tq, Hq, D] at the last Tq positions of k, v [B, Tk, Hkv, D].

    k1/k2: compressed keys of the whole k if the caller keeps them (else computed here). cu_seqlens (B == 1,
    Tq == Tk): packed documents, each with positions from 0. Positions < params.dense_positions use dense SDPA,
    later ones select blocks and attend to them. Differentiable w.r.t. q, k, v. Returns [B, Tq, Hq, D].
    kernel_config: Triton launch settings (None: the defaults; they never change the result).
    """
    check_qkv("infllmv2_attention", q, k, v)
    B, Tq, Hq, D = q.shape
    Tk = k.shape[1]
    if Tk < Tq:
        raise ValueError(f"infllmv2_attention: key length {Tk} (k {tuple(k.shape)}) < query length {Tq}")
    s = softmax_scale(q, scale)
    if cu_seqlens is not None:
        if k1 is not None or k2 is not None:
            raise ValueError("infllmv2_attention: k1/k2 cannot be passed with cu_seqlens (computed per document)")
        return infllmv2_varlen_attention(q, k, v, params, s, cu_seqlens, kernel_config)
    q_off = Tk - Tq
    dp = params.dense_positions
    n_dense = min(max(dp - q_off, 0), Tq)
    grad = _needs_grad(q, k, v)
    parts = []
    # inference: write every piece into one preallocated output (no concatenation copy)
    out = None if grad else torch.empty_like(q)
    if n_dense > 0:
        o_d = dense_causal_attention(q[:, :n_dense], k[:, :q_off + n_dense], v[:, :q_off + n_dense], scale=s)
        if out is None:
            parts.append(o_d)
        else:
            out[:, :n_dense] = o_d
        del o_d
    if n_dense < Tq:
        kd = k.detach()
        k1 = compress_keys(kd, params.kernel_size, params.kernel_stride) if k1 is None else k1
        k2 = compress_keys(kd, params.k2_kernel, params.k2_stride) if k2 is None else k2
        Ts = Tq - n_dense
        chunk = Ts if grad else _NO_GRAD_QUERY_CHUNK
        for c0 in range(0, Ts, chunk):
            a, b = n_dense + c0, min(Tq, n_dense + c0 + chunk)
            qc = q[:, a:b]
            off = q_off + a
            idx = select_blocks(qc.detach(), k1, k2, params, q_offset=off, scale=s, kernel_config=kernel_config)
            o_s = block_sparse_attention(qc, k, v, idx, params, q_offset=off, scale=s, forced_blocks=True,
                                         kernel_config=kernel_config)
            if out is None:
                parts.append(o_s)
            else:
                out[:, a:b] = o_s
            del idx, o_s
    if out is not None:
        return out
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
