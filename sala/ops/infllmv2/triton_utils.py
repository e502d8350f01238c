"""Shared pieces of the InfLLM-V2 Triton kernels: launch helpers, shape checks and the online-softmax step."""
from __future__ import annotations

import triton
import triton.language as tl

from sala.ops.dispatch import interpreter_enabled

LOG2E = 1.4426950408889634


def launch_stages(stages: int | None) -> dict:
    """`num_stages` launch keyword for a configured value (none: Triton's choice, and always in the interpreter)."""
    return {} if stages is None or interpreter_enabled() else {"num_stages": stages}


def check_selection(r: int, halo: int, D: int, scale: float) -> None:
    """What the stage-1 kernels need: r = block_size / kernel_stride a power of two, halo windows <= r, head_dim a
    power of two >= 16, and a positive softmax scale (they take row maxima of unscaled scores)."""
    if halo > r or r & (r - 1) or D & (D - 1) or D < 16:
        raise ValueError(f"infllmv2 Triton selection needs block_size/kernel_stride a power of two ({r}), "
                         f"(kernel_size-1)//kernel_stride <= that ({halo}), head_dim a power of two >= 16 ({D})")
    if not scale > 0:
        raise ValueError(f"infllmv2 selection: the softmax scale must be > 0, got {scale}")


def pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, (int(n) - 1).bit_length())


def select_nb(r: int, k1_tile: int) -> int:
    """Blocks per K1 tile of the selection kernels (tile = NB * r K1 columns; 16 columns in the interpreter)."""
    return max(16 // r, 2) if interpreter_enabled() else max(k1_tile // r, 2)


def k2_tile() -> int:
    """K2 columns per tile of the selection kernels, prefill and split decode (16 in the interpreter)."""
    return 16 if interpreter_enabled() else 64


@triton.jit
def online_softmax(s, m, l):
    """One key tile of an online softmax (exp2 domain): scores s [M, N] (-inf = masked), running max m and sum l
    [M] -> (new max, factor alpha that rescales the old accumulator, probabilities p [M, N], new sum)."""
    m_new = tl.maximum(m, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    return m_new, alpha, p, l * alpha + tl.sum(p, axis=1)
