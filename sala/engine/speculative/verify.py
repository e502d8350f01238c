"""Verify steps on one StaticCache row and their exact rollback.

A verify step feeds [last accepted token, d_1 .. d_k] through the model's prefill-chunk path at the row's length
L, which gives logits at all k + 1 positions and appends the k + 1 tokens to the row. When only a < k drafts are
accepted, the row must hold exactly L + 1 + a tokens:

- sparse K/V: positions past L + 1 + a are beyond the row's length, hence invisible; the next chunk or decode
  step writes from the length on, so resetting `cache.lengths[row]` / `cache.seqlens[row]` forgets them;
- compressed K1/K2 keys: readers use only the windows that lie wholly inside the length (`compressed_lengths`),
  and prefill chunks / `update_compressed_keys` write windows from n(length before) on, so a window that a
  rejected token completed is invisible and is recomputed from the true keys when the sequence reaches its end;
- lightning states are recurrent, so they are restored from a snapshot taken before the step ([n_lightning, H,
  Dk, Dv] fp32 for the row) and advanced over the 1 + a kept positions by each lightning layer alone, from its
  inputs captured during the verify step. That is what a replay of the kept tokens through the whole model
  would compute for those layers, without the replay's MLPs, sparse layers and lm_head (measured faster).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sala.engine.forward import ModelRunner
from sala.engine.static_cache import StaticCache
from sala.modeling.context import PREFILL, ForwardContext
from sala.modeling.modeling_sala import SalaLightningAttention


@dataclass
class SpecStats:
    """Per-request counts: drafted and accepted tokens, verify steps."""
    draft_tokens: int = 0
    accepted_tokens: int = 0
    verify_steps: int = 0

    def add(self, drafted: int, accepted: int) -> None:
        self.draft_tokens += drafted
        self.accepted_tokens += accepted
        self.verify_steps += 1

    def as_dict(self) -> dict:
        """acceptance_rate = accepted / drafted; mean_accepted_length = tokens emitted per verify step (accepted
        drafts + the target's own token)."""
        return {"draft_tokens": self.draft_tokens, "accepted_tokens": self.accepted_tokens,
                "verify_steps": self.verify_steps,
                "acceptance_rate": self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0,
                "mean_accepted_length": ((self.accepted_tokens + self.verify_steps) / self.verify_steps
                                         if self.verify_steps else 0.0)}


def snapshot_row(cache: StaticCache, row: int) -> torch.Tensor:
    """Copy of the row's lightning states [n_lightning, H, Dk, Dv] fp32."""
    return cache.states[:, row].clone()


# The lightning layers' inputs during one verify step: layer index -> (normed layer input x [1, T, hidden],
# position_ids [1, T]).
LightningInputs = dict[int, tuple[torch.Tensor, torch.Tensor]]


def _lightning_layers(runner: ModelRunner) -> list[tuple[int, SalaLightningAttention]]:
    return [(i, layer.self_attn) for i, layer in enumerate(runner.model.model.layers)
            if isinstance(layer.self_attn, SalaLightningAttention)]


@torch.no_grad()
def verify_row(runner: ModelRunner, cache: StaticCache, row: int, ids: list[int]
               ) -> tuple[torch.Tensor, LightningInputs]:
    """Run ids (the last accepted token then the drafts) after the row's cached tokens through the prefill-chunk
    path. Returns logits [len(ids), V] fp32 (row j predicts the token after ids[j]) and each lightning layer's
    input (for `rollback_row`). The row then holds all of ids."""
    cap: LightningInputs = {}

    def hook(i: int):
        def record(module, args):
            x, ctx = args[0], args[1]
            cap[i] = (x, ctx.position_ids)
        return record

    handles = [attn.register_forward_pre_hook(hook(i)) for i, attn in _lightning_layers(runner)]
    try:
        h = runner.prefill_chunk(torch.tensor(ids, dtype=torch.long, device=runner.device), cache, row)
    finally:
        for handle in handles:
            handle.remove()
    return runner.logits_of(h[0]), cap


@torch.no_grad()
def rollback_row(runner: ModelRunner, cache: StaticCache, row: int, snapshot: torch.Tensor, start: int, keep: int,
                 cap: LightningInputs) -> None:
    """Make the row hold exactly its first `start` tokens plus the first `keep` tokens of the verify step that
    began at `start` (the last accepted token and the accepted drafts). Lightning states: `snapshot` (taken at
    `start`) advanced over the kept positions by each lightning layer alone, from its captured input (by
    causality those inputs are what a replay of the kept tokens would compute). Sparse K/V and K1/K2 only need
    the length (module docstring)."""
    cache.states[:, row] = snapshot
    layers = dict(_lightning_layers(runner))
    for i, (x, positions) in cap.items():
        ctx = ForwardContext(positions[:, :keep], ops=runner.ops, mode=PREFILL, cache=cache, row=row, start=start)
        layers[i](x[:, :keep], ctx)      # updates the row's state of layer i; the output is not needed
    cache.lengths[row] = start + keep
    cache.seqlens[row:row + 1].fill_(start + keep)
