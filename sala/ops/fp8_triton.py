"""Triton kernel of FP8 per-token activation quantization (`sala.ops.fp8.quantize_per_token` on CUDA).

`_quantize_rows_kernel`: one row per program, two passes over it in BLOCK_K slices: the row's max |x|, then
x / scale clamped to +-448 and rounded to float8_e4m3fn. Reads the input twice (the second time mostly from
cache) and writes one byte per element plus one fp32 scale per row, where the reference's chain of elementwise
ops makes fp32 copies of the whole activation. The divisions are IEEE-rounded (div_rn) and the values are
rounded to the e4m3 grid, to nearest even, before the cast, as the reference's cast rounds: both give the same
bits. No autotuning, so it runs under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_K_MAX = 2048


# Only core `tl` builtins (tl.reduce with `_max` instead of tl.max, which is itself a @triton.jit function built at
# import): the tests re-import this module under TRITON_INTERPRET=1 and the kernel must follow.
@triton.jit
def _max(a, b):
    return tl.maximum(a, b)


@triton.jit
def _quantize_rows_kernel(x_ptr, sx, q_ptr, sq, s_ptr, K, fp8_max, min_scale, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    amax = (cols * 0).to(tl.float32)           # (tl.zeros is a @triton.jit function: see above)
    for k in range(0, K, BLOCK_K):
        mask = k + cols < K
        v = tl.load(x_ptr + row * sx + k + cols, mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v))
    scale = tl.maximum(tl.math.div_rn(tl.reduce(amax, 0, _max), fp8_max), min_scale)
    tl.store(s_ptr + row, scale)
    for k in range(0, K, BLOCK_K):
        mask = k + cols < K
        v = tl.load(x_ptr + row * sx + k + cols, mask=mask, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(tl.math.div_rn(v, scale), -fp8_max), fp8_max)
        # Round to the e4m3 grid here, so that the cast below is exact whatever its own rounding (Triton's
        # interpreter drops the carry of values that round up to the next power of two): the grid spacing is
        # 2^(max(e, -6) - 3) for |q| in [2^e, 2^(e+1)); adding and subtracting c = 1.5 * 2^(spacing exponent + 23)
        # rounds to a multiple of it, to nearest even, in fp32. A result of zero keeps q's sign, as the cast does.
        e = ((q.to(tl.int32, bitcast=True) >> 23) & 255) - 127
        c = (((tl.maximum(e, -6) - 3 + 150) << 23) | 4194304).to(tl.float32, bitcast=True)
        r = (q + c) - c
        q = tl.where(r == 0.0, q * 0.0, r)
        tl.store(q_ptr + row * sq + k + cols, q.to(q_ptr.dtype.element_ty), mask=mask)


def _empty(shape, dtype, device) -> Tensor:
    """Output allocator (the tests swap in a NaN-filled one to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def quantize_rows_triton(x: Tensor, fp8_max: float, min_scale: float, fp8_dtype: torch.dtype
                         ) -> tuple[Tensor, Tensor]:
    """x [..., K] (bf16/fp16/fp32, last dim contiguous or not) -> (fp8 [..., K] contiguous, fp32 scale [..., 1])."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    if K > 1 and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    q = _empty((M, K), fp8_dtype, x.device)
    s = _empty((M, 1), torch.float32, x.device)
    if M and K:
        block = min(BLOCK_K_MAX, triton.next_power_of_2(K))
        _quantize_rows_kernel[(M,)](x2, x2.stride(0), q, q.stride(0), s, K, fp8_max, min_scale, BLOCK_K=block,
                                    num_warps=4 if block <= 1024 else 8)
    return q.view(*x.shape), s.view(*x.shape[:-1], 1)
