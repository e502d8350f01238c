"""Stage 1, hidden-state alignment: each lightning student learns its dense layer's attention output.

Every layer's student receives the teacher's own (detached) attention input x_i and is trained to
reproduce the teacher attention block's output y_i (after o_proj); teacher outputs propagate, so layers
train independently. Loss: sum over layers of the relative MSE ||s_i - y_i||^2 / ||y_i||^2 (HALO uses plain
MSE; normalising per layer keeps layers with small outputs from being ignored). Only student parameters train.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from sala.convert.data import TokenSource
from sala.convert.optim import adamw, autocast, norms_keep_input_dtype, progress, set_lr
from sala.convert.teacher import Teacher
from sala.modeling.configuration_sala import SalaConfig
from sala.modeling.context import ForwardContext
from sala.modeling.modeling_sala import SalaLightningAttention


def positions_batch(batch: int, seq_len: int, device: torch.device) -> ForwardContext:
    """The per-call facts a SALA mixer needs for unpacked, unpadded rows: positions 0..T-1."""
    pos = torch.arange(seq_len, device=device)[None].expand(batch, seq_len)
    return ForwardContext(pos)


def run_student(student: SalaLightningAttention, x: torch.Tensor) -> torch.Tensor:
    """A lightning student on normed layer input x [B, T, hidden] -> [B, T, hidden]."""
    return student(x, positions_batch(x.shape[0], x.shape[1], x.device), None)


def build_students(config: SalaConfig, layers: list[int], init: Callable[[int, dict], dict],
                   device: torch.device, seed: int = 0) -> nn.ModuleDict:
    """One `SalaLightningAttention` per layer, initialised by init(layer, fresh_state_dict) -> state dict."""
    torch.manual_seed(seed)
    students = nn.ModuleDict()
    for i in layers:
        m = SalaLightningAttention(config, i)
        m.load_state_dict(init(i, m.state_dict()))
        students[str(i)] = m
    return students.to(device)


def relative_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    pred, target = pred.float(), target.float()
    return (pred - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-12)


@torch.no_grad()
def calibrate_output_scale(teacher: Teacher, students: nn.ModuleDict, ids: torch.Tensor) -> dict[int, float]:
    """Scale each student's o_norm weight so its output RMS matches the teacher's on one batch.

    The fresh o_norm (ones) makes the lightning output O(1) per channel while the teacher's attention
    output is usually much smaller; matching the scale first lets stage 1 spend its steps on the shape.
    """
    layers = [int(k) for k in students.keys()]
    with autocast(teacher.device), teacher.capture(layers) as cap:
        teacher.logits(ids, last_only=True)
    factors = {}
    for i in layers:
        x, y = cap[i]
        s = run_student(students[str(i)], x.float())
        c = (y.float().pow(2).mean().sqrt() / s.float().pow(2).mean().sqrt().clamp_min(1e-12)).item()
        if students[str(i)].o_norm is not None and 0 < c < float("inf"):
            students[str(i)].o_norm.weight.mul_(c)
            factors[i] = c
    return factors


def run_stage1(teacher: Teacher, students: nn.ModuleDict, source: TokenSource, tokens: int, seq_len: int,
               batch: int, lr: float, show_progress: bool = True, log_every: int = 10) -> list[dict]:
    """Train `students` for `tokens` tokens; returns a history of {step, tokens, loss, per_layer}."""
    device = teacher.device
    steps = max(1, tokens // (batch * seq_len))
    opt = adamw([{"params": [p for p in students.parameters() if p.requires_grad]}], lr)
    layers = [int(k) for k in students.keys()]
    with norms_keep_input_dtype(students):
        calibrate_output_scale(teacher, students, source.train_batch(batch, seq_len).to(device))
        students.train()
        return _train(teacher, students, source, steps, seq_len, batch, opt, layers, show_progress, log_every)


def _train(teacher, students, source, steps, seq_len, batch, opt, layers, show_progress, log_every) -> list[dict]:
    device = teacher.device
    history: list[dict] = []
    bar = progress(steps * batch * seq_len, "stage 1 (alignment)", show_progress)
    for step in range(steps):
        set_lr(opt, step, steps, warmup=min(50, max(1, steps // 10)), min_ratio=0.01)
        ids = source.train_batch(batch, seq_len).to(device)
        with torch.no_grad(), autocast(device), teacher.capture(layers) as cap:
            teacher.logits(ids, last_only=True)
        per_layer = {}
        loss = torch.zeros((), device=device)
        with autocast(device):
            for i in layers:
                x, y = cap[i]
                l_i = relative_mse(run_student(students[str(i)], x), y)
                per_layer[i] = l_i
                loss = loss + l_i
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(students.parameters(), 1.0)
        opt.step()
        bar.update(batch * seq_len)
        if step % log_every == 0 or step == steps - 1:
            rec = {"step": step, "tokens": (step + 1) * batch * seq_len, "loss": loss.item() / len(layers),
                   "per_layer": {i: v.item() for i, v in per_layer.items()}}
            history.append(rec)
            bar.set_postfix(rel_mse=f"{rec['loss']:.4f}")
    bar.close()
    students.eval()
    return history
