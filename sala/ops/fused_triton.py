"""Triton kernels of the fused inference ops: each reads its inputs once and writes its outputs once.

- `_rms_norm_rows_kernel`: one row per program; optional scaled residual add before the norm (the updated
  residual is written too), optional weight, optional sigmoid gate after it, or the gate alone.
- `_qk_norm_rope_kernel`: one token per program, all heads: per-head RMSNorm and NeoX RoPE, reading a
  strided view of the fused q|k|v projection and writing a contiguous [B, T, H, D].
- `_silu_mul_kernel`: silu(gate) * up of the fused gate|up projection.

Every intermediate that the references (`sala.ops.fused_reference`) round to the working dtype is rounded
here too, so the two agree to the last bit up to the order of the fp32 sums. No autotuning, so the kernels
run under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


# Only core `tl` builtins (tl.reduce with `_add` instead of tl.sum, which is itself a @triton.jit function
# built at import): the tests re-import this module under TRITON_INTERPRET=1 and the kernels must follow.
@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _rms_norm_rows_kernel(x_ptr, sx, a_ptr, sa, g_ptr, sg, w_ptr, res_ptr, sr, out_ptr, so, N, eps, scale,
                          HAS_ADD: tl.constexpr, NORMALIZE: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                          HAS_GATE: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    DT = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * sx + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_ADD:   # h + a * scale, each product and sum rounded to the working dtype
        a = tl.load(a_ptr + row * sa + cols, mask=mask, other=0.0).to(tl.float32)
        x = (x + (a * scale).to(DT).to(tl.float32)).to(DT).to(tl.float32)
        tl.store(res_ptr + row * sr + cols, x.to(DT), mask=mask)
    if NORMALIZE:
        inv = tl.rsqrt(tl.reduce(x * x, 0, _add) / N + eps)
        x = (x * inv).to(DT).to(tl.float32)
        if HAS_WEIGHT:
            w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            x = (w * x).to(DT).to(tl.float32)
    if HAS_GATE:
        g = tl.load(g_ptr + row * sg + cols, mask=mask, other=0.0).to(tl.float32)
        s = (1.0 / (1.0 + tl.exp(-g))).to(DT).to(tl.float32)
        x = x * s
    tl.store(out_ptr + row * so + cols, x.to(DT), mask=mask)


@triton.jit
def _qk_norm_rope_kernel(x_ptr, sxb, sxt, sxh, w_ptr, cos_ptr, sin_ptr, scb, sct, out_ptr, T, H, eps,
                         HAS_WEIGHT: tl.constexpr, HAS_ROPE: tl.constexpr, HALF: tl.constexpr,
                         BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row % T
    hs = tl.arange(0, BLOCK_H)
    ds = tl.arange(0, HALF)
    hm = (hs < H)[:, None]
    DT = out_ptr.dtype.element_ty
    src = x_ptr + b * sxb + t * sxt + hs[:, None] * sxh + ds[None, :]
    x1 = tl.load(src, mask=hm, other=0.0).to(tl.float32)            # first half of each head  [BLOCK_H, HALF]
    x2 = tl.load(src + HALF, mask=hm, other=0.0).to(tl.float32)     # second half
    if HAS_WEIGHT:
        inv = tl.rsqrt((tl.reduce(x1 * x1, 1, _add) + tl.reduce(x2 * x2, 1, _add)) / (2 * HALF) + eps)[:, None]
        w1 = tl.load(w_ptr + ds).to(tl.float32)[None, :]
        w2 = tl.load(w_ptr + HALF + ds).to(tl.float32)[None, :]
        x1 = (w1 * (x1 * inv).to(DT).to(tl.float32)).to(DT).to(tl.float32)
        x2 = (w2 * (x2 * inv).to(DT).to(tl.float32)).to(DT).to(tl.float32)
    if HAS_ROPE:   # rotate half: [x1, x2] * cos + [-x2, x1] * sin
        cs = cos_ptr + b * scb + t * sct
        sn = sin_ptr + b * scb + t * sct
        c1 = tl.load(cs + ds)[None, :]
        c2 = tl.load(cs + HALF + ds)[None, :]
        s1 = tl.load(sn + ds)[None, :]
        s2 = tl.load(sn + HALF + ds)[None, :]
        y1 = x1 * c1 + (-x2) * s1
        y2 = x2 * c2 + x1 * s2
        x1 = y1
        x2 = y2
    dst = out_ptr + row * (H * 2 * HALF) + hs[:, None] * (2 * HALF) + ds[None, :]
    tl.store(dst, x1.to(DT), mask=hm)
    tl.store(dst + HALF, x2.to(DT), mask=hm)


@triton.jit
def _silu_mul_kernel(x_ptr, sx, out_ptr, so, N, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    DT = out_ptr.dtype.element_ty
    g = tl.load(x_ptr + row * sx + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * sx + N + cols, mask=mask, other=0.0).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(DT).to(tl.float32)
    tl.store(out_ptr + row * so + cols, (s * u).to(DT), mask=mask)


# ----------------------------------------------------------------------------- launchers
def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Output buffers (the tests poison them with NaN to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _warps(elements: int) -> int:
    return 1 if elements <= 256 else 4 if elements <= 2048 else 8


def rms_norm_rows_triton(x: Tensor, weight: Tensor | None, eps: float, *, add: Tensor | None = None,
                         scale: float = 1.0, residual_out: Tensor | None = None, gate: Tensor | None = None,
                         normalize: bool = True) -> tuple[Tensor, Tensor | None]:
    """Rows x [M, N]; add and gate [M, N]; all with unit column stride. Returns (out [M, N] in x.dtype,
    x + add * scale [M, N] when add is given, else None). residual_out: where that sum goes (x itself for
    an in-place update: each program reads its row before writing it); a new buffer when None."""
    M, N = x.shape
    out = _empty((M, N), x.dtype, x.device)
    if add is not None and residual_out is None:
        residual_out = _empty((M, N), x.dtype, x.device)
    if M == 0:
        return out, residual_out
    block = triton.next_power_of_2(N)
    dummy = x
    _rms_norm_rows_kernel[(M,)](
        x, x.stride(0), add if add is not None else dummy, add.stride(0) if add is not None else 0,
        gate if gate is not None else dummy, gate.stride(0) if gate is not None else 0,
        weight if weight is not None else dummy,
        residual_out if residual_out is not None else dummy,
        residual_out.stride(0) if residual_out is not None else 0, out, out.stride(0), N, float(eps), float(scale),
        HAS_ADD=add is not None, NORMALIZE=normalize, HAS_WEIGHT=weight is not None, HAS_GATE=gate is not None,
        BLOCK_N=block, num_warps=_warps(block))
    return out, residual_out


def qk_norm_rope_triton(x: Tensor, weight: Tensor | None, eps: float, cos: Tensor | None,
                        sin: Tensor | None) -> Tensor:
    """x [B, T, H, D] (unit stride in D, D a power of two), cos/sin [B or 1, T, D] fp32 with unit stride in D.
    Returns a contiguous [B, T, H, D] in x.dtype."""
    B, T, H, D = x.shape
    out = _empty((B, T, H, D), x.dtype, x.device)
    if B * T == 0:
        return out
    has_rope = cos is not None
    cb = (cos.stride(0) if cos.shape[0] > 1 else 0) if has_rope else 0
    ct = cos.stride(1) if has_rope else 0
    block_h = triton.next_power_of_2(H)
    _qk_norm_rope_kernel[(B * T,)](
        x, x.stride(0), x.stride(1), x.stride(2), weight if weight is not None else x,
        cos if has_rope else x, sin if has_rope else x, cb, ct, out, T, H, float(eps),
        HAS_WEIGHT=weight is not None, HAS_ROPE=has_rope, HALF=D // 2, BLOCK_H=block_h,
        num_warps=_warps(block_h * D))
    return out


def silu_mul_triton(gate_up: Tensor) -> Tensor:
    """gate_up [M, 2I] (unit column stride) -> silu(gate) * up [M, I]."""
    M, N2 = gate_up.shape
    N = N2 // 2
    out = _empty((M, N), gate_up.dtype, gate_up.device)
    if M == 0:
        return out
    block = min(2048, triton.next_power_of_2(N))
    _silu_mul_kernel[(M, triton.cdiv(N, block))](gate_up, gate_up.stride(0), out, out.stride(0), N,
                                                 BLOCK_N=block, num_warps=_warps(block))
    return out
