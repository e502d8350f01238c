"""The small training-loop helpers shared by the conversion stages: AdamW, warmup + cosine LR, autocast."""
from __future__ import annotations

import contextlib
import math

import torch


def adamw(groups: list[dict], lr: float) -> torch.optim.AdamW:
    """AdamW with HALO's betas (0.9, 0.95) and no weight decay; `groups` may carry their own "lr"."""
    kwargs = {"fused": True} if all(p.is_cuda for g in groups for p in g["params"]) else {}
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), weight_decay=0.0, **kwargs)
    for g in opt.param_groups:
        g["peak_lr"] = g["lr"]
    return opt


def set_lr(opt: torch.optim.Optimizer, step: int, total: int, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to `min_ratio` x peak at `total`; returns the factor."""
    if step < warmup:
        f = (step + 1) / warmup
    else:
        t = (step - warmup) / max(1, total - warmup)
        f = min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    for g in opt.param_groups:
        g["lr"] = g["peak_lr"] * f
    return f


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (fp32 master weights), nothing on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def norms_keep_input_dtype(module: torch.nn.Module):
    """Within the block, every SALA RMSNorm returns its input's dtype (its "input" output mode).

    Under autocast the fp32 norm weights promote bf16 activations to fp32, so a lightning layer would get
    fp32 q/k next to a bf16 v (which its kernels reject); a bf16 model returns bf16 there, and so do we.
    """
    from sala.modeling.modeling_sala import SalaRMSNorm

    norms = [m for m in module.modules() if isinstance(m, SalaRMSNorm)]
    saved = [m.output_mode for m in norms]
    for m in norms:
        m.set_output_mode("input")
    try:
        yield
    finally:
        for m, mode in zip(norms, saved):
            m.set_output_mode(mode)


def progress(total: int, desc: str, enabled: bool = True):
    """A tqdm bar (or a no-op stand-in when tqdm is missing or disabled)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    if tqdm is None or not enabled:
        class _Null:
            def update(self, n: int = 1) -> None: ...
            def set_postfix(self, **kw) -> None: ...
            def close(self) -> None: ...
        return _Null()
    return tqdm(total=total, desc=desc, unit="tok", unit_scale=True, dynamic_ncols=True)
