"""Dense causal softmax attention with GQA through torch SDPA (FlashAttention on GPU).

Packed documents (`cu_seqlens`) run as one FlashAttention varlen call on CUDA in fp16/bf16
(`torch.nn.attention.varlen`, probed once per device/dtype/head_dim against SDPA), else as one masked SDPA
per row (<= 8192 tokens) or one SDPA call per document.
"""
from __future__ import annotations

import contextlib
import functools

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


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
          avoid_cudnn: bool = False) -> torch.Tensor:
    """q [B, Tq, Hq, D] at the last Tq positions of k, v [B, Tk, Hkv, D]; causal, bottom-right aligned.
    avoid_cudnn: for callers whose shapes change call after call (see `_no_cudnn`)."""
    Tq, Tk = q.shape[1], k.shape[1]
    G = q.shape[2] // k.shape[2]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if Tq == 0:
        return q.clone()
    if Tq == Tk or Tq == 1:   # one query at the end sees every key: no mask
        with _no_cudnn(q, Tq) if avoid_cudnn else contextlib.nullcontext():
            o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=Tq > 1, scale=scale, enable_gqa=G > 1)
    else:
        # bottom-right causal: query t sees keys 0 .. Tk - Tq + t (boolean mask [Tq, Tk], used for chunks/decode)
        t = torch.arange(Tq, device=q.device)[:, None] + (Tk - Tq)
        mask = torch.arange(Tk, device=q.device)[None, :] <= t
        return _masked_sdpa(q, k, v, mask, scale)
    return o.transpose(1, 2)


def _no_cudnn(q: torch.Tensor, Tq: int):
    """On CUDA with more than one query: SDPA without the cuDNN backend, for the per-document calls of packed
    rows. cuDNN builds an execution plan for every new shape (tens to hundreds of ms), which calls of changing
    lengths meet almost every training step; FlashAttention has no such cost. Fixed-shape callers (benchmark
    baselines, the engine) keep torch's own backend choice. Elsewhere (CPU, decode): no change."""
    if not q.is_cuda or Tq <= 1:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _masked_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                 scale: float | None) -> torch.Tensor:
    """SDPA with a boolean mask [Tq, Tk]; q [B, Tq, Hq, D], k, v [B, Tk, Hkv, D] -> [B, Tq, Hq, D].

    On CUDA the KV heads are repeated to the query heads: the memory-efficient kernel (the one that takes a
    mask) has no GQA, and `enable_gqa` with a mask would fall back to the math kernel's [Tq, Tk] scores."""
    G = q.shape[2] // k.shape[2]
    if q.is_cuda and G > 1:
        k, v = k.repeat_interleave(G, dim=2), v.repeat_interleave(G, dim=2)
        G = 1
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                       scale=scale, enable_gqa=G > 1)
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
    if len(bounds) > 2:
        fn = flash_varlen_fn(q)
        if fn is not None:   # FlashAttention varlen: one call, no mask, no per-document loop
            cu = torch.tensor(bounds, dtype=torch.int32).to(q.device, non_blocking=True)
            max_len = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
            s = q.shape[-1] ** -0.5 if scale is None else scale
            return fn(q[0], k[0], v[0], cu, bounds, max_len, s)[None]
    return _packed_sdpa(q, k, v, bounds, scale)


def flash_varlen_fn(q: torch.Tensor):
    """The probed FlashAttention varlen fn for q's device and dtype (CUDA, fp16/bf16), else None."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return probed_flash_varlen(str(q.device), q.dtype, q.shape[-1])
    return None


def _packed_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: list[int],
                 scale: float | None) -> torch.Tensor:
    """Packed documents through SDPA: one masked call for rows <= 8192 tokens, else one call per document."""
    T = q.shape[1]
    if len(bounds) > 2 and T <= _MASKED_VARLEN_MAX_T:
        # One SDPA call with a block-diagonal causal mask ([T, T] bools) beats one call per document for the
        # short, many-document rows of training.
        cu = torch.tensor(bounds, device=q.device)
        doc = torch.searchsorted(cu[1:], torch.arange(T, device=q.device), right=True)
        mask = (doc[:, None] == doc[None, :]).tril_()
        return _masked_sdpa(q, k, v, mask, scale)
    outs = [_sdpa(q[:, s:e], k[:, s:e], v[:, s:e], scale, avoid_cudnn=True)
            for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
    return torch.cat(outs, dim=1) if outs else q.clone()


# Longest packed row handled by one masked SDPA call (the mask is T*T bytes: 64 MiB at 8K).
_MASKED_VARLEN_MAX_T = 8192


@functools.lru_cache(maxsize=None)
def probed_flash_varlen(device: str, dtype: torch.dtype, head_dim: int):
    """`_flash_varlen()` if, on a tiny packed case, its forward matches masked SDPA and its backward runs
    (once per device/dtype/head_dim); None otherwise, so an unsupported torch build falls back, never misleads."""
    fn = _flash_varlen()
    if fn is None:
        return None
    try:
        with torch.enable_grad():
            ok = _check_varlen_fn(fn, device, dtype, head_dim)
    except Exception:  # an unsupported build/signature: use the block-sparse kernel instead
        return None
    return fn if ok else None


def _check_varlen_fn(fn, device: str, dtype: torch.dtype, head_dim: int) -> bool:
    """fn on 2 packed documents (GQA 4/2) vs masked SDPA; its backward must run and be finite."""
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(40, 4, head_dim, device=device, dtype=dtype, generator=g).requires_grad_()
    k = torch.randn(40, 2, head_dim, device=device, dtype=dtype, generator=g)
    v = torch.randn(40, 2, head_dim, device=device, dtype=dtype, generator=g)
    cu = torch.tensor([0, 17, 40], dtype=torch.int32, device=device)
    o = fn(q, k, v, cu, [0, 17, 40], 23, 0.3)
    want = _packed_sdpa(q[None].detach(), k[None], v[None], [0, 17, 40], 0.3)[0]
    (grad,) = torch.autograd.grad(o.float().sum(), q)
    return bool((o.float() - want.float()).abs().max() < 2e-2) and bool(torch.isfinite(grad).all())


def _flash_varlen():
    """A dense causal varlen attention fn(q [N, Hq, D], k, v [N, Hkv, D], cu int32, max_len, scale) through
    torch.nn.attention.varlen (FlashAttention, CUDA), or None where this torch lacks it."""
    try:
        import inspect

        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    names = inspect.signature(varlen_attn).parameters
    if "window_size" in names:
        causal = {"window_size": (-1, 0)}
    elif "is_causal" in names:
        causal = {"is_causal": True}
    else:
        return None
    gqa, has_scale = "enable_gqa" in names, "scale" in names

    def run(q, k, v, cu, cu_host, max_len, scale):
        G = q.shape[1] // k.shape[1]
        if G > 1 and not gqa:
            k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
        extra = dict(causal)
        if gqa and G > 1:
            extra["enable_gqa"] = True
        if has_scale:
            extra["scale"] = scale
        else:                                   # default scale D ** -0.5: fold ours into q
            q = q * (scale * q.shape[-1] ** 0.5)
        return varlen_attn(q, k, v, cu, cu, max_len, max_len, **extra)

    return run
