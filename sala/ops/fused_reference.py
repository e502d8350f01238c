"""Plain-PyTorch references of the fused inference ops (ground truth for `sala.ops.fused_triton`).

Each one computes, op for op and rounding for rounding, what the model's modules compute
(`SalaRMSNorm`, `apply_rope`, the lightning `finish`, `SalaMLP`'s SiLU x up and the scaled residual add),
so the engine gives the same result with either implementation. `x.dtype` is the working dtype
(bf16 on GPU); every intermediate that the modules round to it is rounded here too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def rms_norm_reference(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """weight * (x / sqrt(mean(x^2) + eps)) over the last dim; variance in fp32, normalised x rounded to
    x.dtype before the weight (the `SalaRMSNorm` order). x [..., N], weight [N] or None."""
    x32 = x.float()
    y = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return y if weight is None else weight * y


def add_rms_norm_reference(h: Tensor, a: Tensor, scale: float, weight: Tensor | None, eps: float,
                           inplace: bool = False) -> tuple[Tensor, Tensor]:
    """The decoder's scaled residual add followed by the next RMSNorm: returns (h + a * scale, its norm);
    inplace=True writes the sum into h (same roundings)."""
    h = h.add_(a * scale) if inplace else h + a * scale
    return h, rms_norm_reference(h, weight, eps)


def qk_norm_rope_reference(x: Tensor, weight: Tensor | None, eps: float, cos: Tensor | None,
                           sin: Tensor | None) -> Tensor:
    """Per-head RMSNorm then NeoX ("rotate half") RoPE in fp32: x [B, T, H, D], weight [D] or None,
    cos/sin [B or 1, T, D] fp32 or None (no rotation). Returns a contiguous [B, T, H, D] in x.dtype (promoted
    as torch promotes when the weight's dtype is wider)."""
    if weight is not None:
        x = rms_norm_reference(x, weight, eps)
    if cos is None:
        return x.contiguous()
    x32 = x.float()
    half = x32.shape[-1] // 2
    rotated = torch.cat((-x32[..., half:], x32[..., :half]), dim=-1)
    return (x32 * cos[:, :, None] + rotated * sin[:, :, None]).to(x.dtype)


def rms_norm_gate_reference(o: Tensor, weight: Tensor | None, eps: float, gate: Tensor | None,
                            normalize: bool = True) -> Tensor:
    """Output norm and sigmoid gate of an attention layer: norm(o) * sigmoid(gate) over the last dim.
    o, gate [..., N]; normalize=False skips the norm (the sparse layers' o_gate alone)."""
    if normalize:
        o = rms_norm_reference(o, weight, eps)
    if gate is not None:
        o = o * torch.sigmoid(gate)
    return o


def silu_mul_reference(gate_up: Tensor) -> Tensor:
    """silu(gate) * up of a fused gate|up projection [..., 2I] -> [..., I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
