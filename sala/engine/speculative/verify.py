"""Verify steps over a StaticCache bucket and their exact rollback.

A verify step feeds T tokens per row ([last accepted token, d_1 .. d_k], padded to T) through the model's DECODE
path (`decode_forward`: static shapes, no host sync, CUDA-graph capturable like the decode step), which gives
logits at all T positions and appends the T tokens to every row. When a row keeps only its first `keep` tokens
(the last accepted token and the accepted drafts), it must hold exactly L + keep tokens:

- sparse K/V: positions past L + keep are beyond the row's length, hence invisible; the next step writes from
  the length on, so resetting the lengths forgets them;
- compressed K1/K2 keys: readers use only the windows that lie wholly inside the length, and writers write the
  windows completed by their new tokens, so a window that a rejected token completed is invisible and is
  recomputed from the true keys when the sequence reaches its end;
- lightning states are recurrent: the step snapshots them first and keeps each lightning layer's k, v; the
  rollback computes each row's state after its `keep` tokens in closed form from the snapshot
  (`sala.ops.lightning_state_after`: `keep` = 0 restores a row that took no part, `keep` = T leaves the step's
  own state). No replay of the model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sala.engine.forward import ModelRunner, decode_buffers, decode_forward
from sala.engine.static_cache import StaticCache
from sala.ops.lightning import lightning_state_after


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


class VerifyStep:
    """A verify step of T tokens for all B rows of a StaticCache (a bucket), on static buffers.

    Fill `ids` [B, T] int64 and call: logits [B, T, V] fp32 (position j predicts the token after ids[:, j]); every
    row then holds its T tokens (device `seqlens` advanced by T; the host `lengths` are the caller's). Then fill
    `keep` [B] (tokens each row keeps, 0..T) and call `rollback()`. Both calls are graph-capturable
    (`GraphedDecodeStep`). `snapshot`: a buffer of the cache states' shape to keep the states before the step in
    (default: its own).
    """

    def __init__(self, runner: ModelRunner, cache: StaticCache, tokens: int,
                 snapshot: torch.Tensor | None = None) -> None:
        if tokens < 1:
            raise ValueError(f"VerifyStep: tokens per row must be >= 1, got {tokens}")
        self.runner = runner
        self.cache = cache
        self.tokens = tokens
        cfg, B, dev = runner.config, cache.batch, runner.device
        self.ids = torch.zeros(B, tokens, dtype=torch.long, device=dev)
        self.logits = torch.zeros(B, tokens, cfg.vocab_size, dtype=torch.float32, device=dev)
        self.keep = torch.zeros(B, dtype=torch.long, device=dev)
        self.out = decode_buffers(runner, B, tokens)
        if snapshot is not None and snapshot.shape != cache.states.shape:
            raise ValueError(f"VerifyStep: snapshot {tuple(snapshot.shape)} must have the cache states' shape "
                             f"{tuple(cache.states.shape)}")
        # the states before the step (several steps of one engine may share one buffer: one runs at a time)
        self.snapshot = torch.zeros_like(cache.states) if snapshot is None else snapshot
        shape = (B, tokens, cfg.lightning_nh, cfg.lightning_head_dim)
        self.saved_kv = {layer: (torch.zeros(shape, dtype=runner.dtype, device=dev),
                                 torch.zeros(shape, dtype=runner.dtype, device=dev))
                         for layer in cfg.lightning_layer_ids}
        layers = runner.model.model.layers
        self.log_decay = {layer: layers[layer].self_attn.log_decay(dev) for layer in cfg.lightning_layer_ids}

    @torch.no_grad()
    def __call__(self) -> torch.Tensor:
        self.snapshot.copy_(self.cache.states)
        h = decode_forward(self.runner, self.cache, self.ids, self.out, self.saved_kv)
        self.logits.copy_(self.runner.logits_of(h))
        return self.logits

    @torch.no_grad()
    def rollback(self) -> None:
        """Every row's lightning states after its first `keep` tokens of the last call (the sparse caches need
        only the lengths, which are the caller's)."""
        for layer, (k, v) in self.saved_kv.items():
            slot = self.cache.light_index[layer]
            self.cache.states[slot].copy_(lightning_state_after(self.snapshot[slot], k, v, self.log_decay[layer],
                                                                   self.keep))
