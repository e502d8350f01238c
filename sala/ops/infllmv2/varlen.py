"""InfLLM-V2 attention over packed documents (one row, document bounds `cu_seqlens`).

The dense-exact prefixes of all documents run in one packed dense call, then compression and selection per
document and one block-sparse call over all sparse queries of the row.
"""
from __future__ import annotations

import torch

from sala.ops.dense import dense_causal_attention
from sala.ops.infllmv2.compression import compress_keys
from sala.ops.infllmv2.params import SparseKernelConfig, SparseParams
from sala.ops.infllmv2.selection import select_blocks
from sala.ops.infllmv2.sparse_attention import sparse_attention_flat


def infllmv2_varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: SparseParams, scale: float,
                              cu_seqlens: torch.Tensor, kernel_config: SparseKernelConfig | None = None
                              ) -> torch.Tensor:
    """InfLLM-V2 attention of one packed row q [1, T, Hq, D], k, v [1, T, Hkv, D] whose documents (bounds
    cu_seqlens [n_docs + 1]) each start at position 0. Returns [1, T, Hq, D]."""
    B, T, Hq, D = q.shape
    if B != 1 or k.shape[1] != T:
        raise ValueError(f"infllmv2_attention: cu_seqlens needs B == 1 and Tq == Tk; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    bounds = [int(x) for x in cu_seqlens.tolist()]
    if not bounds or bounds[0] != 0 or bounds[-1] != T or any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
        raise ValueError(f"infllmv2_attention: cu_seqlens {bounds} must rise from 0 to T = {T}")
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
            idx_parts.append(select_blocks(q[:, s + dp:e].detach(), k1, k2, params, q_offset=dp, scale=scale,
                                           kernel_config=kernel_config))
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
                                torch.cat(pos), torch.cat(kbase), torch.cat(gbase), torch.cat(gks), torch.cat(gblk),
                                n_gid, params, scale, forced_blocks=True, kernel_config=kernel_config)
    out, used = [], 0
    for dense, idx in zip(dense_parts, idx_parts):
        out.append(dense)
        if idx is not None:
            out.append(o_s[used:used + idx.shape[2]])
            used += idx.shape[2]
    return torch.cat(out, dim=0)[None]
