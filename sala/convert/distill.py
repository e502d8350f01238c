"""Stage 2, end-to-end distillation, and the optional short continual-training stage.

Stage 2: forward KL(teacher || student) over the full vocabulary, summed over the vocabulary and averaged
over tokens, no cross-entropy term; all student parameters train, the mixers (`self_attn`) at `lr`, the
rest (MLPs, embeddings, norms, lm_head) at `lr x other_lr_ratio` (Li et al.'s 10x split).
Continual training (`run_finetune`): plain next-token cross-entropy at a longer sequence length, a
stand-in for `sala train` so a conversion can end at the training length without another tool.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sala.convert.data import TokenSource
from sala.convert.optim import adamw, autocast, norms_keep_input_dtype, progress, set_lr
from sala.convert.teacher import Teacher


def param_groups(model: nn.Module, lr: float, other_lr_ratio: float) -> list[dict]:
    mixers = [p for n, p in model.named_parameters() if ".self_attn." in n and p.requires_grad]
    rest = [p for n, p in model.named_parameters() if ".self_attn." not in n and p.requires_grad]
    groups = [{"params": mixers, "lr": lr}]
    if rest and other_lr_ratio > 0:
        groups.append({"params": rest, "lr": lr * other_lr_ratio})
    for p in (rest if other_lr_ratio <= 0 else []):
        p.requires_grad_(False)
    return groups


def kl_teacher_student(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(p_teacher || p_student), fp32. logits [B, T, V]."""
    t = F.log_softmax(teacher_logits.float(), -1)
    s = F.log_softmax(student_logits.float(), -1)
    return (t.exp() * (t - s)).sum(-1).mean()


def _sparse_off(model: nn.Module):
    """Short-context training runs the sparse layers dense (as the paper's short stages do)."""
    cfg = model.config
    prev = cfg.use_sparse_attention
    cfg.use_sparse_attention = False
    return prev


def _train_student(student: nn.Module, opt: torch.optim.Optimizer, steps: int, tokens_per_step: int, label: str,
                   metric: str, warmup: int, min_ratio: float, loss_fn, show_progress: bool,
                   log_every: int) -> list[dict]:
    """The loop both stages share: sparse layers dense, LR schedule, clip 1.0, progress bar, history every
    `log_every` steps. `loss_fn(step) -> loss` runs the forward. The model is left in eval mode, sparse restored."""
    prev = _sparse_off(student)
    student.train()
    history: list[dict] = []
    bar = progress(steps * tokens_per_step, label, show_progress)
    try:
        for step in range(steps):
            set_lr(opt, step, steps, warmup=warmup, min_ratio=min_ratio)
            loss = loss_fn(step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            bar.update(tokens_per_step)
            if step % log_every == 0 or step == steps - 1:
                history.append({"step": step, "tokens": (step + 1) * tokens_per_step, metric: loss.item()})
                bar.set_postfix(**{metric: f"{loss.item():.4f}"})
    finally:
        bar.close()
        student.config.use_sparse_attention = prev
        student.eval()
    return history


def run_distill(teacher: Teacher, student: nn.Module, source: TokenSource, tokens: int, seq_len: int, batch: int,
                lr: float, other_lr_ratio: float = 0.1, show_progress: bool = True,
                log_every: int = 10) -> list[dict]:
    """KL-distill `student` (a SalaForCausalLM on the teacher's device) for `tokens` tokens."""
    device = teacher.device
    steps = max(1, tokens // (batch * seq_len))

    def kl_loss(step: int) -> torch.Tensor:
        ids = source.train_batch(batch, seq_len).to(device)
        with torch.no_grad(), autocast(device):
            t_logits = teacher.logits(ids)
        with autocast(device), norms_keep_input_dtype(student):
            s_logits = student(input_ids=ids, use_cache=False).logits
        return kl_teacher_student(t_logits, s_logits)

    opt = adamw(param_groups(student, lr, other_lr_ratio), lr)
    return _train_student(student, opt, steps, batch * seq_len, "stage 2 (KL distillation)", "kl",
                          min(50, max(1, steps // 10)), 0.1, kl_loss, show_progress, log_every)


def run_finetune(student: nn.Module, source: TokenSource, tokens: int, seq_len: int, batch: int, lr: float,
                 device: torch.device, show_progress: bool = True, log_every: int = 10) -> list[dict]:
    """Next-token cross-entropy on all parameters (sparse layers dense), constant LR after a short warmup."""
    steps = max(1, tokens // (batch * seq_len))

    def ce_loss(step: int) -> torch.Tensor:
        ids = source.train_batch(batch, seq_len).to(device)
        with autocast(device), norms_keep_input_dtype(student):
            return student(input_ids=ids, labels=ids, use_cache=False).loss

    opt = adamw([{"params": [p for p in student.parameters() if p.requires_grad]}], lr)
    return _train_student(student, opt, steps, batch * seq_len, "continual training (CE)", "loss",
                          min(20, max(1, steps // 10)), 1.0, ce_loss, show_progress, log_every)
