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
  Dk, Dv] fp32 for the row) and the accepted tokens are replayed (a second, shorter chunk over the 1 + a kept
  tokens). The replay writes the same K/V and compressed keys again, so the whole row equals a prefill of
  exactly the accepted tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sala.engine.forward import ModelRunner
from sala.engine.static_cache import StaticCache


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


@torch.no_grad()
def verify_row(runner: ModelRunner, cache: StaticCache, row: int, ids: list[int]) -> torch.Tensor:
    """Run ids (the last accepted token then the drafts) after the row's cached tokens; logits [len(ids), V] fp32
    (row j predicts the token after ids[j]). The row then holds all of ids."""
    t = torch.tensor(ids, dtype=torch.long, device=runner.device)
    h = runner.prefill_chunk(t, cache, row)
    return runner.logits_of(h[0])


@torch.no_grad()
def rollback_row(runner: ModelRunner, cache: StaticCache, row: int, snapshot: torch.Tensor, start: int,
                 keep: list[int]) -> None:
    """Make the row hold exactly its first `start` tokens plus `keep` (the last accepted token and the accepted
    drafts), after a verify step from `start` that appended more: lightning states from `snapshot` (taken at
    `start`), then `keep` replayed."""
    cache.states[:, row] = snapshot
    cache.lengths[row] = start
    cache.seqlens[row:row + 1].fill_(start)
    if keep:
        runner.prefill_chunk(torch.tensor(keep, dtype=torch.long, device=runner.device), cache, row)
