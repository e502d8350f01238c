"""Kernel dispatch: choose Triton kernels or plain-PyTorch references.

`SALA_KERNELS=reference|triton|auto` (default `auto`):
- `reference`: always the PyTorch reference ops (ground truth, CPU and GPU).
- `triton`: always the Triton kernels; on a CPU tensor this needs `TRITON_INTERPRET=1`.
- `auto`: Triton on CUDA tensors when Triton imports, references elsewhere.
"""
from __future__ import annotations

import functools
import os

import torch

_CHOICES = ("reference", "triton", "auto")


def kernel_mode() -> str:
    """The value of SALA_KERNELS, validated."""
    mode = os.environ.get("SALA_KERNELS", "auto").strip().lower() or "auto"
    if mode not in _CHOICES:
        raise ValueError(f"SALA_KERNELS={mode!r} is not one of {', '.join(_CHOICES)}")
    return mode


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether an op called on `tensors` should run its Triton kernel (cheap: called once per op and layer)."""
    raw = os.environ.get("SALA_KERNELS")
    mode = "auto" if raw is None or raw == "auto" else kernel_mode()
    if mode == "reference":
        return False
    on_cuda = True
    for t in tensors:
        if t is not None and not t.is_cuda:
            on_cuda = False
            break
    if mode == "auto":
        return on_cuda and triton_available() and not interpreter_enabled()
    # mode == "triton"
    if not triton_available():
        raise RuntimeError("SALA_KERNELS=triton but triton is not installed (pip install triton)")
    if not on_cuda and not interpreter_enabled():
        raise RuntimeError(
            "SALA_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1 (Triton's interpreter)"
        )
    return True
