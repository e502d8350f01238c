"""Fused inference ops: RMSNorm (with the scaled residual add before it or a sigmoid gate after it),
per-head QK-norm + RoPE, and SiLU x up. Used by the engine's prefill and decode (no autograd).

Unfused, these are chains of fp32 up-casts, reductions and down-casts: about 30% of a prefill's GPU time
(docs/engine.md). The Triton kernels (`sala.ops.fused_triton`) read each input once and write each output
once; the references (`sala.ops.fused_reference`) compute exactly what the model's modules compute.
Dispatch follows `SALA_KERNELS` (`sala.ops.dispatch`). Mixed dtypes (for example fp32 norm weights on bf16
activations, where torch promotes the result) always take the reference, which reproduces that promotion.
"""
from __future__ import annotations

import torch
from torch import Tensor

from sala.ops.dispatch import use_triton
from sala.ops.fused_reference import (
    add_rms_norm_reference,
    qk_norm_rope_reference,
    rms_norm_gate_reference,
    rms_norm_reference,
    silu_mul_reference,
)

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_ROW = 65536            # longest normalised row (elements) the row kernel takes in one program


def _check_last_dim(op: str, name: str, t: Tensor | None, n: int) -> None:
    if t is not None and t.shape[-1] != n:
        raise ValueError(f"{op}: {name} has last dim {t.shape[-1]} (shape {tuple(t.shape)}), expected {n}")


def _same_dtype(x: Tensor, *others: Tensor | None) -> bool:
    return x.dtype in _KERNEL_DTYPES and all(o is None or o.dtype == x.dtype for o in others)


def _rows(t: Tensor) -> Tensor:
    """[..., N] as [M, N] with unit column stride (a view when the strides allow it)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """RMSNorm over the last dim of x [..., N] with weight [N] (or None); returns [..., N]."""
    _check_last_dim("rms_norm", "weight", weight, x.shape[-1])
    if use_triton(x) and _same_dtype(x, weight) and x.shape[-1] <= MAX_ROW:
        from sala.ops.fused_triton import rms_norm_rows_triton
        return rms_norm_rows_triton(_rows(x), weight, eps)[0].view(x.shape)
    return rms_norm_reference(x, weight, eps)


def add_rms_norm(h: Tensor, a: Tensor, scale: float, weight: Tensor | None, eps: float, *,
                 inplace: bool = False) -> tuple[Tensor, Tensor]:
    """(h + a * scale, rms_norm(h + a * scale)) for h, a [..., N] in one pass. inplace=True writes the sum
    into h (contiguous) and returns h itself as the first element."""
    if a.shape != h.shape:
        raise ValueError(f"add_rms_norm: a has shape {tuple(a.shape)}, h has shape {tuple(h.shape)}; they must match")
    _check_last_dim("add_rms_norm", "weight", weight, h.shape[-1])
    if inplace and not h.is_contiguous():
        raise ValueError(f"add_rms_norm: inplace=True needs a contiguous h, got strides {h.stride()}")
    if use_triton(h, a) and _same_dtype(h, a, weight) and h.shape[-1] <= MAX_ROW:
        from sala.ops.fused_triton import rms_norm_rows_triton
        rows = _rows(h)
        out, res = rms_norm_rows_triton(rows, weight, eps, add=_rows(a), scale=scale,
                                        residual_out=rows if inplace else None)
        return (h if inplace else res.view(h.shape)), out.view(h.shape)
    return add_rms_norm_reference(h, a, scale, weight, eps, inplace)


def rms_norm_gate(o: Tensor, weight: Tensor | None, eps: float, gate: Tensor | None, *,
                  normalize: bool = True) -> Tensor:
    """rms_norm(o) * sigmoid(gate) over the last dim (o, gate [..., N]); normalize=False: o * sigmoid(gate)."""
    _check_last_dim("rms_norm_gate", "weight", weight, o.shape[-1])
    if gate is not None and gate.shape != o.shape:
        raise ValueError(f"rms_norm_gate: gate has shape {tuple(gate.shape)}, o has shape {tuple(o.shape)}; "
                         "they must match")
    if not normalize and gate is None:
        return o
    if use_triton(o, gate) and _same_dtype(o, weight, gate) and o.shape[-1] <= MAX_ROW:
        from sala.ops.fused_triton import rms_norm_rows_triton
        out, _ = rms_norm_rows_triton(_rows(o), weight, eps, gate=None if gate is None else _rows(gate),
                                      normalize=normalize)
        return out.view(o.shape)
    return rms_norm_gate_reference(o, weight, eps, gate, normalize)


def qk_norm_rope(x: Tensor, weight: Tensor | None, eps: float, cos: Tensor | None = None,
                 sin: Tensor | None = None) -> Tensor:
    """Per-head RMSNorm (weight [D] or None) then NeoX RoPE (cos/sin [B or 1, T, D] fp32, or None):
    x [B, T, H, D] (any strides with unit stride in D) -> contiguous [B, T, H, D] in x.dtype."""
    if x.dim() != 4:
        raise ValueError(f"qk_norm_rope: x must be [B, T, H, D], got shape {tuple(x.shape)}")
    B, T, H, D = x.shape
    _check_last_dim("qk_norm_rope", "weight", weight, D)
    if (cos is None) != (sin is None):
        raise ValueError("qk_norm_rope: cos and sin must be given together")
    if cos is not None:
        for name, t in (("cos", cos), ("sin", sin)):
            if t.dim() != 3 or t.shape[1:] != (T, D) or t.shape[0] not in (1, B):
                raise ValueError(f"qk_norm_rope: {name} must be [{B} or 1, {T}, {D}], got shape {tuple(t.shape)}")
        if D % 2:
            raise ValueError(f"qk_norm_rope: RoPE needs an even head dim, got {D}")
    pow2 = D >= 2 and D & (D - 1) == 0
    if (use_triton(x) and _same_dtype(x, weight) and pow2 and x.stride(-1) == 1
            and (cos is None or (cos.dtype == sin.dtype == torch.float32 and cos.stride() == sin.stride()
                                 and cos.stride(-1) == 1))):
        from sala.ops.fused_triton import qk_norm_rope_triton
        return qk_norm_rope_triton(x, weight, eps, cos, sin)
    return qk_norm_rope_reference(x, weight, eps, cos, sin)


def silu_mul(gate_up: Tensor) -> Tensor:
    """silu(gate) * up of a fused gate|up projection [..., 2I] -> [..., I]."""
    if gate_up.shape[-1] % 2:
        raise ValueError(f"silu_mul: the last dim must hold gate and up halves (even), got {gate_up.shape[-1]}")
    if use_triton(gate_up) and _same_dtype(gate_up):
        from sala.ops.fused_triton import silu_mul_triton
        return silu_mul_triton(_rows(gate_up)).view(*gate_up.shape[:-1], gate_up.shape[-1] // 2)
    return silu_mul_reference(gate_up)
