"""Per-head decay of SALA's lightning layers: ALiBi slopes, no per-layer factor."""
from __future__ import annotations

import functools
import math

import torch


def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi slopes for `num_heads` heads (Press et al.), as floats.

    For n a power of two: start = 2^(-8/n), slope_h = start^(h+1). Otherwise the slopes of the
    closest smaller power of two, followed by every other slope of twice that power.
    """
    if num_heads <= 0:
        raise ValueError(f"num_heads must be positive, got {num_heads}")

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (h + 1) for h in range(n)]

    if math.log2(num_heads).is_integer():
        return power_of_two(num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    return power_of_two(closest) + power_of_two(2 * closest)[0::2][: num_heads - closest]


def lightning_log_decay(num_heads: int, device: torch.device | str | None = None) -> torch.Tensor:
    """log(gamma_h) = -slope_h for each head: fp32 tensor [num_heads], all negative.

    Cached per (heads, device): layers ask for it on every call, and a fresh host-to-device copy per layer per
    decode step is waste. Treat the result as read-only.
    """
    return _log_decay_cached(num_heads, str(torch.device(device) if device is not None else torch.device("cpu")))


@functools.lru_cache(maxsize=64)
def _log_decay_cached(num_heads: int, device: str) -> torch.Tensor:
    return -torch.tensor(alibi_slopes(num_heads), dtype=torch.float32, device=device)
