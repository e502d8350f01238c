"""Dense causal softmax attention with GQA through torch SDPA (FlashAttention on GPU)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"dense_causal_attention: q, k, v must be [B, T, H, D]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"dense_causal_attention: k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"dense_causal_attention: batch/head_dim of q {tuple(q.shape)} and k {tuple(k.shape)} differ")
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"dense_causal_attention: query heads {q.shape[2]} not a multiple of KV heads {k.shape[2]}")
    if k.shape[1] < q.shape[1]:
        raise ValueError(f"dense_causal_attention: key length {k.shape[1]} < query length {q.shape[1]}")


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    """q [B, Tq, Hq, D] at the last Tq positions of k, v [B, Tk, Hkv, D]; causal, bottom-right aligned."""
    Tq, Tk = q.shape[1], k.shape[1]
    G = q.shape[2] // k.shape[2]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if Tq == 0:
        return q.clone()
    if Tq == Tk:
        o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=G > 1)
    else:
        # bottom-right causal: query t sees keys 0 .. Tk - Tq + t (boolean mask [Tq, Tk], used for chunks/decode)
        t = torch.arange(Tq, device=q.device)[:, None] + (Tk - Tq)
        mask = torch.arange(Tk, device=q.device)[None, :] <= t
        o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=G > 1)
    return o.transpose(1, 2)


def dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                           cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Causal softmax attention, GQA (Hq = G * Hkv), bottom-right aligned like a KV cache.

    q [B, Tq, Hq, D]; k, v [B, Tk, Hkv, D] with Tk >= Tq: query t is at position Tk - Tq + t.
    cu_seqlens (int [N+1], with B == 1 and Tq == Tk): packed documents, no attention across them.
    scale defaults to D ** -0.5. Returns o [B, Tq, Hq, D] in q.dtype.
    """
    _check(q, k, v)
    if cu_seqlens is None:
        return _sdpa(q, k, v, scale)
    if q.shape[0] != 1 or q.shape[1] != k.shape[1]:
        raise ValueError(f"dense_causal_attention: cu_seqlens needs B == 1 and Tq == Tk; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    bounds = [int(x) for x in cu_seqlens.tolist()]
    if bounds[0] != 0 or bounds[-1] != q.shape[1] or any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
        raise ValueError(f"dense_causal_attention: cu_seqlens {bounds} must rise from 0 to T = {q.shape[1]}")
    T = q.shape[1]
    if len(bounds) > 2 and T <= _MASKED_VARLEN_MAX_T:
        # One SDPA call with a block-diagonal causal mask ([T, T] bools) beats one call per document for the
        # short, many-document rows of training.
        cu = torch.tensor(bounds, device=q.device)
        doc = torch.searchsorted(cu[1:], torch.arange(T, device=q.device), right=True)
        mask = (doc[:, None] == doc[None, :]).tril_()
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                           scale=scale, enable_gqa=q.shape[2] != k.shape[2])
        return o.transpose(1, 2)
    outs = [_sdpa(q[:, s:e], k[:, s:e], v[:, s:e], scale) for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
    return torch.cat(outs, dim=1) if outs else q.clone()


# Longest packed row handled by one masked SDPA call (the mask is T*T bytes: 64 MiB at 8K).
_MASKED_VARLEN_MAX_T = 8192
