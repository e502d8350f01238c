"""What one forward call tells every layer: positions, padding, packing, the elementwise ops, and the cache.

The model's layers are the only forward. The same layers run:
- `FULL`: whole sequences (training, `SalaForCausalLM.forward`), optionally growing a `SalaCache` (generate);
- `PREFILL`: a chunk of one sequence (`row`, tokens from `start` on) written into a preallocated static cache
  (the engine's `StaticCache`);
- `DECODE`: T new tokens for every row of a static cache (T = 1: a decode step; T > 1: a speculative verify
  step), with static shapes and no host syncs (CUDA-graph capturable); positions [B, T] come from the cache's
  device lengths; the lightning layers step their states token by token and, when `saved_kv` has buffers for
  them, keep their k, v (for rolling the states back to an accepted prefix: `sala.ops.lightning_state_after`).

A static cache is any object with `.state(layer)` ([B, H, Dk, Dv] fp32 lightning state), `.sparse[layer]`
(buffers `.k`, `.v` [B, S, Hkv, D] and compressed keys `.k1`, `.k2`) and `.seqlens` (int32 [B] on the device); a
paged one also has `.block_table` (int32 [B, S / page_size]), and its `.k`, `.v` are pages [P, page_size, Hkv, D].
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import torch

from sala.ops import fused
from sala.ops.fused_reference import (
    add_rms_norm_reference,
    qk_norm_rope_reference,
    rms_norm_gate_reference,
    rms_norm_reference,
    silu_mul_reference,
)

FULL, PREFILL, DECODE = "full", "prefill", "decode"


class ElementwiseOps(NamedTuple):
    """The elementwise pieces of a layer, as one set of functions (`sala.ops.fused` signatures)."""
    rms_norm: Callable
    add_rms_norm: Callable
    qk_norm_rope: Callable
    rms_norm_gate: Callable
    silu_mul: Callable


# Plain PyTorch, differentiable: the model's own forward (training, transformers generate).
REFERENCE_OPS = ElementwiseOps(rms_norm_reference, add_rms_norm_reference, qk_norm_rope_reference,
                               rms_norm_gate_reference, silu_mul_reference)

# Inference (no autograd): the Triton kernels on CUDA, the references elsewhere; the residual add updates the
# hidden state in place.
FUSED_OPS = ElementwiseOps(fused.rms_norm, functools.partial(fused.add_rms_norm, inplace=True), fused.qk_norm_rope,
                           fused.rms_norm_gate, fused.silu_mul)


def rope_cos_sin(position_ids: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, T, dim] in fp32 for NeoX ("rotate half") RoPE at integer positions [B, T].

    The only place RoPE frequencies are computed (model, engine prefill and decode)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=position_ids.device, dtype=torch.float32) / dim))
    freqs = position_ids.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


@dataclass
class ForwardContext:
    """Per-call facts shared by all layers (see the module docstring for the modes)."""

    position_ids: torch.Tensor                  # [B, T] int64
    pad: list[int] | None = None                # FULL: new left-pad tokens per row in this call, or None
    cu_seqlens: torch.Tensor | None = None      # FULL: [N+1] packed documents (B == 1), on the CPU, or None
    real_mask: torch.Tensor | None = None       # FULL: [B, T] bool, True for real tokens, or None
    ops: ElementwiseOps = REFERENCE_OPS
    mode: str = FULL
    cache: Any = None                           # PREFILL / DECODE: the static cache
    row: int = 0                                # PREFILL: the cache row of the sequence
    start: int = 0                              # PREFILL: tokens already cached for it
    row_index: torch.Tensor | None = None       # PREFILL: the row as a device tensor [1] int64 (one CUDA graph of
                                                # the dense pieces serves every row: `sala.engine.prefill_graph`)
    out: dict[str, torch.Tensor] = field(default_factory=dict)   # DECODE: preallocated attention outputs by kind
    saved_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None   # DECODE: layer -> k, v buffers [B, T, H, D]
    _rope: dict[Any, Any] = field(default_factory=dict, repr=False)     # per-call values: RoPE, `shared`

    def shared(self, key: Any, make: Callable[[], Any]) -> Any:
        """`make()` once per call: a value every layer of the call would compute alike (e.g. a paged cache's write
        rows of the call's positions)."""
        if key not in self._rope:
            self._rope[key] = make()
        return self._rope[key]

    def rope(self, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, T, dim] for this call's positions (computed once per call and size)."""
        key = (dim, theta)
        if key not in self._rope:
            self._rope[key] = rope_cos_sin(self.position_ids, dim, theta)
        return self._rope[key]

    @property
    def static(self) -> bool:
        """True when the layers read and write a static cache (engine prefill or decode)."""
        return self.mode != FULL
