"""Checking a `--device` value before anything is loaded onto it."""
from __future__ import annotations

from sala.utils.errors import UsageError


def check_device(name: str | None, flag: str = "--device") -> None:
    """Raise UsageError when `name` (None/"auto" pass) names a device this torch build or machine lacks."""
    if name is None or str(name) in ("auto", ""):
        return
    import torch

    try:
        dev = torch.device(str(name))
    except (RuntimeError, ValueError):
        raise UsageError(f"{flag} {name!r} is not a device name: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise UsageError(f"{flag} {name}: this torch ({torch.__version__}) is a CPU-only build; install a CUDA "
                             f"build of torch, or use {flag} cpu")
        if not torch.cuda.is_available():
            raise UsageError(f"{flag} {name}: no CUDA GPU is visible to torch; use {flag} cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"{flag} {name}: only {torch.cuda.device_count()} GPU(s) are visible "
                             f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    elif dev.type not in ("cpu", "meta") and dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"{flag} {name}: MPS is not available here; use {flag} cpu")
