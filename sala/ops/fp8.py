"""FP8 (float8_e4m3fn) linear layers: per-output-channel weight scales, dynamic per-token activation scales.

    w_q, w_s = quantize_weight_per_channel(w)             # w [N, K] -> fp8 [N, K], fp32 [N]
    y = fp8_linear(x, w_q, w_s)                            # x [..., K] -> y [..., N] in x.dtype

Semantics (every path): x is quantized per token, q_x = round_e4m3(x / s_x) with s_x = max|x_row| / 448, and
y = (q_x @ q_w^T) * s_x * s_w (+ bias). Two paths compute it:
- "scaled_mm": `torch._scaled_mm` in its row-wise mode (fp8 [M, K] row-major x fp8 [K, N] column-major, scales
  fp32 [M, 1] and [1, N], bf16 output, fp32 accumulation). Needs CUDA with compute capability >= 8.9
  (Ada, Hopper and later) and K a multiple of 16; output columns beyond the last multiple of 16 go through the
  reference arithmetic (only the LM head of a vocabulary such as 73448 has any).
- "reference": dequantize both operands to the activation dtype and `F.linear` (CPU tests and any device).
"auto" picks "scaled_mm" where FP8 runs and otherwise raises `Fp8UnsupportedError` (one line: what, the device,
what to do); the reference path is never chosen silently, since it is slower than bf16.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from sala.ops.dispatch import use_triton
from sala.utils.errors import SalaError

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0                      # largest finite float8_e4m3fn (it has no inf): values are clamped to it
MIN_SCALE = 1e-12                    # keeps all-zero rows finite: they quantize to zeros with this scale
MIN_CAPABILITY = (8, 9)              # Ada (sm_89) and Hopper (sm_90): the first GPUs with FP8 tensor cores
SCALED_MM_ALIGN = 16                 # torch._scaled_mm: K and N must be multiples of 16
BACKENDS = ("auto", "scaled_mm", "reference")


class Fp8UnsupportedError(SalaError, RuntimeError):
    """FP8 execution was asked for on a device that has no FP8 matrix multiply (a one-line error at the CLI)."""


def fp8_support_problem(device: torch.device | str) -> str | None:
    """Why FP8 GEMMs cannot run on `device` (one sentence naming the device), or None when they can."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"the {device.type} device has no FP8 matrix multiply"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if getattr(torch.version, "hip", None):
        return "ROCm GPUs use float8_e4m3fnuz, which this FP8 path does not implement"
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    if (major, minor) < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(index)
        return (f"cuda:{index} is {name} (compute capability {major}.{minor}); FP8 needs "
                f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer (Ada, Hopper)")
    return None


def check_fp8_supported(device: torch.device | str) -> None:
    """Raise Fp8UnsupportedError (one line: what, the device, what to do) unless FP8 GEMMs run on `device`."""
    problem = fp8_support_problem(device)
    if problem is not None:
        raise Fp8UnsupportedError(f"FP8 quantization is not supported here: {problem}; run on an Ada or Hopper "
                                  "GPU (compute capability >= 8.9), or drop --quantization fp8 / "
                                  "quantization='fp8' to run in bf16")


@functools.lru_cache(maxsize=None)
def _cuda_index_supported(index: int) -> bool:
    return fp8_support_problem(torch.device("cuda", index)) is None


def _device_supported(device: torch.device) -> bool:
    """Cached per CUDA device (called on every GEMM, also inside CUDA-graph capture: host work only)."""
    if device.type != "cuda":
        return False
    return _cuda_index_supported(device.index if device.index is not None else torch.cuda.current_device())


# ----------------------------------------------------------------------------- quantize / dequantize
def _quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize along the last dim: (fp8 like x, fp32 scale [..., 1] = max|row| / 448, at least MIN_SCALE)."""
    xf = x.float()
    # divided by a tensor on x's device: a Python scalar divisor is a multiplication by its reciprocal on CUDA,
    # which differs from the IEEE quotient (the Triton kernel's) in the last bit for some rows
    scale = (xf.abs().amax(dim=-1, keepdim=True) / torch.tensor(FP8_MAX, device=x.device)).clamp(min=MIN_SCALE)
    # round to nearest even; the clamp makes x / scale rounding past 448 saturate on every backend (e4m3fn
    # encodes no inf, and how a cast treats overflow is not part of the format)
    q = (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def quantize_weight_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] (any float dtype) -> (fp8 [N, K], fp32 scale [N]): one scale per output channel (row),
    max|row| / 448, so every row's largest entry maps to +-448. All-zero rows get MIN_SCALE and stay zero."""
    if weight.ndim != 2:
        raise ValueError(f"quantize_weight_per_channel: weight must be 2-D [out, in], got shape {list(weight.shape)}")
    if not weight.is_floating_point() or weight.dtype == FP8_DTYPE:
        raise ValueError(f"quantize_weight_per_channel: weight must be bf16/fp16/fp32, got {weight.dtype}")
    q, scale = _quantize_rows(weight)
    return q.contiguous(), scale[:, 0].contiguous()


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic activation quantization: x [..., K] -> (fp8 [..., K], fp32 scale [..., 1]), one scale per token.
    On CUDA one Triton kernel (`sala.ops.fp8_triton`, the same bits); elsewhere the reference."""
    if x.dtype == FP8_DTYPE:
        raise ValueError("quantize_per_token: x is already float8_e4m3fn")
    if x.shape[-1] and use_triton(x):
        from sala.ops.fp8_triton import quantize_rows_triton

        return quantize_rows_triton(x, FP8_MAX, MIN_SCALE, FP8_DTYPE)
    return _quantize_rows(x)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q (fp8) * scale (fp32, broadcast against q: [..., 1] per token, [N, 1] per weight row) in `dtype`."""
    return (q.float() * scale).to(dtype)


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-channel fp8 weight [N, K] with scale [N] -> [N, K] in `dtype`."""
    return dequantize(q, scale[:, None], dtype)


# ----------------------------------------------------------------------------- the linear layer
def fp8_linear_reference(x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """The reference: quantize x per token, dequantize x and the weight to x.dtype, F.linear. [..., K] -> [..., N]."""
    q, s = quantize_per_token(x)
    return F.linear(dequantize(q, s, x.dtype), dequantize_weight(w_fp8, w_scale, x.dtype),
                    None if bias is None else bias.to(x.dtype))


def fp8_linear_scaled_mm(x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor,
                         bias: torch.Tensor | None = None, fast_accum: bool = False) -> torch.Tensor:
    """`torch._scaled_mm` row-wise: x [..., K] -> [..., N] in x.dtype (computed with bf16 output, which the
    row-wise mode requires). Output columns past the last multiple of 16 (N % 16 of them) use the reference
    arithmetic on the same quantized x, so any N works; K must be a multiple of 16. fast_accum: the tensor cores'
    reduced-precision accumulation (faster on Hopper, less exact; off by default)."""
    K = x.shape[-1]
    N = w_fp8.shape[0]
    if K % SCALED_MM_ALIGN:
        raise ValueError(f"fp8_linear: in_features {K} is not a multiple of {SCALED_MM_ALIGN}, which "
                         "torch._scaled_mm requires; leave this layer in bf16 (quantize_model_fp8 skip=...)")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if x2.shape[0] == 0:
        return x.new_zeros(*lead, N)
    q, s = quantize_per_token(x2)
    q, s = q.contiguous(), s.contiguous()                  # q [M, K] row-major, s [M, 1] (no-ops but for odd views)
    n16 = N - N % SCALED_MM_ALIGN
    parts = []
    if n16:
        # w_fp8[:n16] is a row-major [n16, K] view, so its transpose is the column-major [K, n16] operand
        try:
            parts.append(torch._scaled_mm(q, w_fp8[:n16].t(), s, w_scale[:n16].view(1, n16),
                                          out_dtype=torch.bfloat16, use_fast_accum=fast_accum))
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as e:   # e.g. a torch build without the row-wise mode for this GPU generation
            where = torch.cuda.get_device_name(x.device) if x.is_cuda else x.device.type
            raise Fp8UnsupportedError(f"torch._scaled_mm (row-wise fp8) failed on {where} with torch "
                                      f"{torch.__version__}: {str(e).splitlines()[0][:200]}; upgrade torch or run "
                                      "without quantization") from e
    if n16 < N:
        tail = (q.float() @ w_fp8[n16:].float().t()) * s * w_scale[n16:]
        parts.append(tail.to(torch.bfloat16))
    y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
    y = y.to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.view(*lead, N)


def fp8_linear(x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
               *, backend: str = "auto", fast_accum: bool = False) -> torch.Tensor:
    """y = x @ W^T (+ bias) with W = w_fp8 [N, K] (float8_e4m3fn) * w_scale [N] (fp32, per output channel) and x
    [..., K] quantized per token on the fly; returns [..., N] in x.dtype.

    backend: "scaled_mm" (CUDA, compute capability >= 8.9), "reference" (dequantize + matmul, any device), or
    "auto": scaled_mm where supported, else Fp8UnsupportedError. fast_accum: see `fp8_linear_scaled_mm`."""
    if w_fp8.dtype != FP8_DTYPE:
        raise ValueError(f"fp8_linear: weight must be float8_e4m3fn, got {w_fp8.dtype}")
    if w_fp8.ndim != 2 or w_scale.shape != (w_fp8.shape[0],):
        raise ValueError(f"fp8_linear: weight [N, K] and weight_scale [N] expected, got {list(w_fp8.shape)} and "
                         f"{list(w_scale.shape)}")
    if x.shape[-1] != w_fp8.shape[1]:
        raise ValueError(f"fp8_linear: x has {x.shape[-1]} features, the weight [N, K] = {list(w_fp8.shape)} "
                         f"expects {w_fp8.shape[1]}")
    if backend == "reference":
        return fp8_linear_reference(x, w_fp8, w_scale, bias)
    if backend == "auto" and not _device_supported(x.device):
        check_fp8_supported(x.device)          # raises with the reason
    if backend not in ("auto", "scaled_mm"):
        raise ValueError(f"fp8_linear: unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    return fp8_linear_scaled_mm(x, w_fp8, w_scale, bias, fast_accum=fast_accum)
