"""StaticCache: every cache buffer of a SALA model, allocated once for a given batch and context capacity.

- lightning states: one tensor [n_lightning_layers, B, H, Dk, Dv] fp32 (updated in place);
- per sparse layer: k, v [B, capacity, Hkv, D] and compressed keys k1 [B, n1, Hkv, D], k2 [B, n2, Hkv, D]
  in the model dtype (capacity rounded up to a whole block);
- lengths: valid tokens per sequence, on the host (`lengths`) and on the device (`seqlens`, int32 [B]).

Fixed shapes and addresses are what lets the decode step be captured in a CUDA graph.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sala.engine.memory import compressed_capacity
from sala.modeling.configuration_sala import SalaConfig


@dataclass
class SparseBuffers:
    k: torch.Tensor     # [B, S, Hkv, D]
    v: torch.Tensor
    k1: torch.Tensor    # [B, S1, Hkv, D]
    k2: torch.Tensor    # [B, S2, Hkv, D]


class StaticCache:
    """Preallocated hybrid cache; see the module docstring for the layout."""

    def __init__(self, config: SalaConfig, batch: int, capacity: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        if batch < 1 or capacity < 1:
            raise ValueError(f"StaticCache: batch ({batch}) and capacity ({capacity}) must be >= 1")
        sp = config.sparse_config
        bs = sp["block_size"]
        self.capacity = -(-capacity // bs) * bs
        self.batch = batch
        self.device = torch.device(device)
        self.dtype = dtype
        self.light_index = {layer: i for i, layer in enumerate(config.lightning_layer_ids)}
        self.states = torch.zeros(len(self.light_index), batch, config.lightning_nh, config.lightning_head_dim,
                                  config.lightning_head_dim, dtype=torch.float32, device=self.device)
        hkv, d = config.num_key_value_heads, config.head_dim
        n1 = compressed_capacity(self.capacity, sp["kernel_size"], sp["kernel_stride"])
        n2 = compressed_capacity(self.capacity, 4 * sp["kernel_size"], 4 * sp["kernel_stride"])
        self.sparse: dict[int, SparseBuffers] = {}
        for layer in config.sparse_layer_ids:
            kw = dict(dtype=dtype, device=self.device)
            self.sparse[layer] = SparseBuffers(
                k=torch.zeros(batch, self.capacity, hkv, d, **kw), v=torch.zeros(batch, self.capacity, hkv, d, **kw),
                k1=torch.zeros(batch, n1, hkv, d, **kw), k2=torch.zeros(batch, n2, hkv, d, **kw))
        self.lengths = [0] * batch
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=self.device)

    def state(self, layer: int) -> torch.Tensor:
        """Lightning state of `layer`: [B, H, Dk, Dv] fp32 (a view)."""
        return self.states[self.light_index[layer]]

    def check_room(self, row: int, new_tokens: int) -> None:
        if self.lengths[row] + new_tokens > self.capacity:
            raise ValueError(f"StaticCache: sequence {row} would hold {self.lengths[row] + new_tokens} tokens, "
                             f"more than the capacity {self.capacity} this cache was allocated for")

    def reset(self) -> None:
        """Forget every sequence (buffers are kept; states zeroed). The host lengths are cleared in place: the
        `rows_view`s of this cache share the list."""
        self.states.zero_()
        self.lengths[:] = [0] * len(self.lengths)
        self.seqlens.zero_()

    def reset_row(self, row: int) -> None:
        """Forget sequence `row` (its lightning states zeroed, no tokens); its stale K/V and compressed keys lie
        beyond its length, where nothing reads them and its next prefill writes."""
        self.states[:, row].zero_()
        self.lengths[row] = 0
        self.seqlens[row:row + 1].fill_(0)        # a fill kernel: no host sync

    def memory_bytes(self) -> dict[str, int]:
        kv = sum(b.k.numel() * b.k.element_size() * 2 for b in self.sparse.values())
        comp = sum((b.k1.numel() + b.k2.numel()) * b.k1.element_size() for b in self.sparse.values())
        st = self.states.numel() * 4
        return {"sparse_kv": kv, "compressed_keys": comp, "lightning_states": st, "total": kv + comp + st}

    def rows_view(self, batch: int) -> StaticCache:
        """A StaticCache over rows [0, batch) of this one: every buffer a view (no copy), `lengths` shared.

        A DecodeStep built on it decodes only those rows (a batch-size bucket of a serving engine); writes land in
        this cache.
        """
        if not 1 <= batch <= self.batch:
            raise ValueError(f"StaticCache.rows_view: batch {batch} must be in [1, {self.batch}]")
        view = object.__new__(StaticCache)
        view.capacity, view.batch, view.device, view.dtype = self.capacity, batch, self.device, self.dtype
        view.light_index = self.light_index
        view.states = self.states[:, :batch]
        view.sparse = {layer: SparseBuffers(b.k[:batch], b.v[:batch], b.k1[:batch], b.k2[:batch])
                       for layer, b in self.sparse.items()}
        view.lengths = self.lengths
        view.seqlens = self.seqlens[:batch]
        return view
