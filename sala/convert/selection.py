"""HALO layer selection: which layers stay softmax (sparse) and which become lightning.

For each layer i the teacher runs with only layer i swapped for its stage-1 student (softmax layers keep
RoPE), giving recall R_i and general ability C_i (= minus the held-out LM loss). HALO's score is
s_i = min(50, (R_max - R_i) / (C_max - C_i + 1e-10)) with R_max, C_max the maxima over the sweep: the
retrieval damage per unit of general damage. The highest-scoring layers stay softmax. As in MiniCPM-SALA
(unlike HALO) the first and last layers are always kept.
"""
from __future__ import annotations

import torch
from torch import nn

from sala.convert.optim import autocast, norms_keep_input_dtype
from sala.convert.probes import RecallProbe
from sala.convert.stage1 import run_student
from sala.convert.teacher import Teacher
from sala.eval.heldout import heldout_loss

SCORE_CAP = 50.0


@torch.no_grad()
def layer_swap_sweep(teacher: Teacher, students: nn.ModuleDict, probe: RecallProbe, heldout: torch.Tensor,
                     show_progress: bool = True) -> dict:
    """{"baseline": {R, C}, "layers": {i: {R, C, loss, score}}} for every student layer."""
    device = teacher.device

    def logits_fn(ids: torch.Tensor) -> torch.Tensor:
        with autocast(device):
            return teacher.logits(ids.to(device)).float()

    base_loss = heldout_loss(logits_fn, heldout)
    result = {"baseline": {"recall": probe.accuracy(logits_fn), "general": -base_loss, "loss": base_loss},
              "recall_probe": probe.kind, "layers": {}}
    layers = sorted(int(k) for k in students.keys())
    it = layers
    if show_progress:
        try:
            from tqdm.auto import tqdm
            it = tqdm(layers, desc="layer selection (swaps)")
        except ImportError:  # pragma: no cover
            pass
    for i in it:
        student = students[str(i)]
        with teacher.swapped(i, lambda x, s=student: run_student(s, x)), norms_keep_input_dtype(student):
            loss = heldout_loss(logits_fn, heldout)
            result["layers"][i] = {"recall": probe.accuracy(logits_fn), "general": -loss, "loss": loss}
    rs = [v["recall"] for v in result["layers"].values()]
    cs = [v["general"] for v in result["layers"].values()]
    r_max, c_max = max(rs), max(cs)
    for v in result["layers"].values():
        v["score"] = min(SCORE_CAP, (r_max - v["recall"]) / (c_max - v["general"] + 1e-10))
    result["r_max"], result["c_max"] = r_max, c_max
    return result


def num_softmax_layers(num_layers: int, fraction: float, keep_ends: bool = True) -> int:
    """round(fraction x L), at least 2 (first and last) when keep_ends, at most L."""
    n = round(num_layers * fraction)
    if keep_ends:
        n = max(n, min(2, num_layers))
    return max(0, min(num_layers, n))


def choose_softmax_layers(scores: dict[int, float], num_layers: int, fraction: float,
                          keep_ends: bool = True) -> list[int]:
    """First/last layers, then the highest HALO scores (ties: lower index) up to the softmax budget."""
    n = num_softmax_layers(num_layers, fraction, keep_ends)
    chosen = [i for i in ({0, num_layers - 1} if keep_ends else set()) if n > 0][:n]
    ranked = sorted((i for i in scores if i not in chosen), key=lambda i: (-scores[i], i))
    chosen += ranked[:max(0, n - len(chosen))]
    return sorted(set(chosen))


def parse_layer_list(text: str, num_layers: int) -> list[int] | None:
    """"auto" -> None; "none" / "" -> []; "0,5,7" -> [0, 5, 7] (checked against num_layers)."""
    t = text.strip().lower()
    if t == "auto":
        return None
    if t in ("none", ""):
        return []
    try:
        layers = sorted({int(x) for x in t.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"--softmax-layers must be 'auto', 'none' or comma-separated layer indices, "
                         f"got {text!r}") from None
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"--softmax-layers {bad} out of range: the teacher has {num_layers} layers "
                         f"(0..{num_layers - 1})")
    return layers
