"""Lightning attention (linear attention with a fixed per-head decay): public entry points.

    S_t = gamma_h S_{t-1} + k_t^T v_t ;  o_t = scale * q_t S_t        (gamma_h = exp(log_decay[h]))

No feature map, no normaliser; states are fp32. `sala.ops.dispatch.use_triton` picks the Triton
kernels (sala.ops.lightning_triton) or the PyTorch references (sala.ops.lightning_reference).
"""
from __future__ import annotations

import torch
from torch import Tensor

from sala.ops.dispatch import use_triton
from sala.ops.lightning_plan import LightningConfig
from sala.ops.lightning_reference import lightning_attention_chunked, lightning_decode_step_reference

_FLOAT_INPUTS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_STATE_DTYPES = (torch.float32, torch.float64)


def _check_float(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"lightning: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_INPUTS:
        raise ValueError(f"lightning: {name} must be float16/bfloat16/float32/float64, got {t.dtype}")


def _check_common(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, rank: int, layout: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_float(name, t)
        if t.dim() != rank:
            raise ValueError(f"lightning: {name} must be {layout} ({rank} dims), got shape {tuple(t.shape)}")
    if k.shape != q.shape:
        raise ValueError(f"lightning: k shape {tuple(k.shape)} must equal q shape {tuple(q.shape)}")
    if v.shape[:-1] != q.shape[:-1]:
        raise ValueError(
            f"lightning: v shape {tuple(v.shape)} must match q shape {tuple(q.shape)} in all dims but the last")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"lightning: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"lightning: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    heads = q.shape[-2]
    if not isinstance(log_decay, Tensor) or log_decay.shape != (heads,):
        shape = tuple(log_decay.shape) if isinstance(log_decay, Tensor) else type(log_decay).__name__
        raise ValueError(f"lightning: log_decay must have shape ({heads},) (one per head), got {shape}")
    if not log_decay.is_floating_point():
        raise ValueError(f"lightning: log_decay must be floating point (fp32), got {log_decay.dtype}")
    if log_decay.device != q.device:
        raise ValueError(f"lightning: log_decay is on {log_decay.device} but q is on {q.device}")


def _check_state(name: str, state: Tensor, expected: tuple[int, ...]) -> None:
    if not isinstance(state, Tensor):
        raise TypeError(f"lightning: {name} must be a torch.Tensor, got {type(state).__name__}")
    if tuple(state.shape) != expected:
        raise ValueError(f"lightning: {name} must have shape {expected} [N, H, Dk, Dv], got {tuple(state.shape)}")
    if state.dtype not in _STATE_DTYPES:
        raise ValueError(f"lightning: {name} must be float32, got {state.dtype}")


def _check_cu_seqlens(cu_seqlens: Tensor, batch: int, length: int) -> int:
    """Validate packed offsets; returns the number of sequences. Reads the offsets (a host sync on GPU)."""
    if not isinstance(cu_seqlens, Tensor):
        raise TypeError(f"lightning: cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"lightning: cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"lightning: cu_seqlens must be 1-D with N+1 >= 2 entries, got shape "
                         f"{tuple(cu_seqlens.shape)}")
    if batch != 1:
        raise ValueError(f"lightning: with cu_seqlens the batch size must be 1 (packed sequences), got {batch}")
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0 or offsets[-1] != length:
        raise ValueError(f"lightning: cu_seqlens must start at 0 and end at T={length}, got first "
                         f"{offsets[0]} and last {offsets[-1]}")
    if any(b < a for a, b in zip(offsets[:-1], offsets[1:])):
        raise ValueError(f"lightning: cu_seqlens must be non-decreasing, got {offsets}")
    return len(offsets) - 1


def lightning_attention(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, scale: float | None = None,
                        initial_state: Tensor | None = None, output_final_state: bool = False,
                        cu_seqlens: Tensor | None = None, *, config: LightningConfig | None = None
                        ) -> tuple[Tensor, Tensor | None]:
    """Causal lightning attention over whole sequences (prefill / training).

    q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; log_decay: [H] (log gamma, negative); scale defaults to Dk**-0.5.
    initial_state: [N, H, Dk, Dv] fp32 (N = B, or the number of packed sequences with cu_seqlens, B == 1).
    cu_seqlens: int32/int64 [N+1] offsets (first 0, last T); each sequence sees only its own tokens.
    Returns (o [B, T, H, Dv] in q.dtype, final state [N, H, Dk, Dv] fp32 if output_final_state else None).
    Differentiable w.r.t. q, k, v and initial_state. config: launch settings of the Triton kernels (None: the
    defaults, `sala.ops.lightning_plan.DEFAULT_CONFIG`); the reference ignores it.
    """
    _check_common(q, k, v, log_decay, 4, "[B, T, H, D]")
    batch, length, heads, dk = q.shape
    dv = v.shape[-1]
    num_seqs = batch if cu_seqlens is None else _check_cu_seqlens(cu_seqlens, batch, length)
    if initial_state is not None:
        _check_state("initial_state", initial_state, (num_seqs, heads, dk, dv))
        if initial_state.device != q.device:
            raise ValueError(f"lightning: initial_state is on {initial_state.device} but q is on {q.device}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"lightning: scale must be a float or None, got {type(scale).__name__}")
    if use_triton(q, k, v):
        from sala.ops import lightning_triton

        return lightning_triton.lightning_attention_triton(
            q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens, config)
    return lightning_attention_chunked(q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens)


def _decode_args_ok(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, state: Tensor, out: Tensor | None) -> bool:
    """The common case of `_check_decode_args` in one expression (a decode step is called once per layer and
    token, so its checks are kept to a few attribute reads); False sends the call through the full checks."""
    try:
        qs, vs, dtype, dev = q.shape, v.shape, q.dtype, q.device
        n = len(qs)
        return ((n == 3 or (n == 4 and qs[1] > 0)) and k.shape == qs and len(vs) == n and vs[:-1] == qs[:-1]
                and dtype in _FLOAT_INPUTS and k.dtype == dtype and v.dtype == dtype
                and k.device == dev and v.device == dev and state.device == dev and log_decay.device == dev
                and log_decay.shape == (qs[-2],) and log_decay.is_floating_point()
                and state.shape == (qs[0], qs[-2], qs[-1], vs[-1]) and state.dtype in _STATE_DTYPES
                and (out is None or (out.shape == vs and out.dtype == dtype and out.device == dev)))
    except (AttributeError, TypeError):
        return False


def _check_decode_args(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, state: Tensor, out: Tensor | None) -> None:
    """Every check of a decode step's arguments, each with its own message."""
    rank = q.dim() if isinstance(q, Tensor) and q.dim() == 4 else 3
    _check_common(q, k, v, log_decay, rank, "[B, H, D] or [B, T, H, D]")
    if rank == 4 and q.shape[1] == 0:
        raise ValueError(f"lightning: a decode step needs at least one token per row, got q {tuple(q.shape)}")
    batch, heads, dk = q.shape[0], q.shape[-2], q.shape[-1]
    dv = v.shape[-1]
    _check_state("state", state, (batch, heads, dk, dv))
    if state.device != q.device:
        raise ValueError(f"lightning: state is on {state.device} but q is on {q.device}")
    want = tuple(v.shape)
    if out is not None and (not isinstance(out, Tensor) or tuple(out.shape) != want
                            or out.dtype != q.dtype or out.device != q.device):
        desc = (f"{out.dtype} {tuple(out.shape)} on {out.device}" if isinstance(out, Tensor)
                else type(out).__name__)
        raise ValueError(f"lightning: out must be a {q.dtype} tensor of shape {want} on {q.device}, got {desc}")


def lightning_decode_step(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, state: Tensor,
                          scale: float | None = None, out: Tensor | None = None, *,
                          config: LightningConfig | None = None) -> Tensor:
    """New tokens per sequence, in order: state <- gamma*state + k_t^T v_t (IN PLACE), o_t = scale * q_t state.

    q, k: [B, H, Dk] and v: [B, H, Dv] (one token), or [B, T, H, Dk] / [B, T, H, Dv] (T tokens: the same as T
    one-token calls, in one launch); state: [B, H, Dk, Dv] fp32, the state after the last token on return; out:
    optional, v's shape in q.dtype, to write into (no allocation, CUDA-graph friendly). Returns o (v's shape) in
    q.dtype. config: as for `lightning_attention`.
    """
    if not _decode_args_ok(q, k, v, log_decay, state, out):
        _check_decode_args(q, k, v, log_decay, state, out)
    if use_triton(q, k, v):
        from sala.ops import lightning_triton

        return lightning_triton.lightning_decode_step_triton(q, k, v, log_decay, state, scale, out, config)
    if q.dim() == 4:
        o = torch.stack([lightning_decode_step_reference(q[:, t], k[:, t], v[:, t], log_decay, state, scale)
                         for t in range(q.shape[1])], dim=1)
    else:
        o = lightning_decode_step_reference(q, k, v, log_decay, state, scale)
    if out is not None:
        out.copy_(o)
        return out
    return o


def lightning_state_after(state: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, keep: Tensor) -> Tensor:
    """The state after the first `keep[b]` of T tokens, from the state before them (closed form, no host sync):

        S_keep = gamma^keep * S_0 + sum_{i < keep} gamma^(keep - 1 - i) k_i^T v_i

    state [B, H, Dk, Dv] fp32 (S_0, not modified); k [B, T, H, Dk], v [B, T, H, Dv]; log_decay [H]; keep int [B]
    in 0..T (0 gives S_0). Returns a new [B, H, Dk, Dv] tensor in state's dtype: what `keep` decode steps from S_0
    would leave (a speculative verify step's rollback to its accepted tokens).
    """
    if state.dim() != 4 or k.dim() != 4 or v.shape[:3] != k.shape[:3] or state.shape[:3] != (k.shape[0], k.shape[2],
                                                                                             k.shape[3]):
        raise ValueError(f"lightning_state_after: state {tuple(state.shape)} must be [B, H, Dk, Dv] for k "
                         f"{tuple(k.shape)} [B, T, H, Dk] and v {tuple(v.shape)} [B, T, H, Dv]")
    if keep.shape != (k.shape[0],):
        raise ValueError(f"lightning_state_after: keep {tuple(keep.shape)} must be [{k.shape[0]}]")
    ct = state.dtype
    T = k.shape[1]
    i = torch.arange(T, device=k.device)
    n = keep.to(device=k.device, dtype=ct)[:, None]                                       # [B, 1]
    lg = log_decay.to(ct)
    w = torch.exp((n - 1 - i)[..., None] * lg)                                            # [B, T, H]
    w = torch.where((i[None, :] < keep[:, None])[..., None], w, torch.zeros((), dtype=ct, device=k.device))
    added = torch.einsum("bth,bthk,bthv->bhkv", w, k.to(ct), v.to(ct))
    return torch.exp(n * lg)[..., None, None] * state + added
