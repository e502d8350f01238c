"""StaticCache: every cache buffer of a SALA model, allocated once for a given batch and context capacity.

- lightning states: one tensor [n_lightning_layers, B, H, Dk, Dv] fp32 (updated in place);
- per sparse layer: k, v [B, capacity, Hkv, D] and compressed keys k1 [B, n1, Hkv, D], k2 [B, n2, Hkv, D]
  in the model dtype (capacity rounded up to a whole block);
- or, with a `KVPagePool` (a serving engine): k, v are the pool's pages [P + 1, page_size, Hkv, D], shared by all
  rows, and `block_table` int32 [B, capacity / page_size] maps each row's blocks to pages (0: the scratch page,
  unmapped); `row_pages` is its host copy and `pages_mapped` the number of distinct pages the rows map (shared
  prefix pages once). Rows map pages with `map_pages` / `grow_row` and give them back with `release_row`.
  Compressed keys and lightning states stay per row;
- lengths: valid tokens per sequence, on the host (`lengths`) and on the device (`seqlens`, int32 [B]).

Fixed shapes and addresses are what lets the decode step be captured in a CUDA graph.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from sala.engine.kv_pages import KVPagePool
from sala.engine.memory import compressed_capacity
from sala.modeling.configuration_sala import SalaConfig


@dataclass
class SparseBuffers:
    k: torch.Tensor     # [B, S, Hkv, D], or pages [P + 1, page_size, Hkv, D] of a paged cache
    v: torch.Tensor
    k1: torch.Tensor    # [B, S1, Hkv, D]
    k2: torch.Tensor    # [B, S2, Hkv, D]


class StaticCache:
    """Preallocated hybrid cache; see the module docstring for the layout."""

    def __init__(self, config: SalaConfig, batch: int, capacity: int, dtype: torch.dtype,
                 device: torch.device | str, pool: KVPagePool | None = None) -> None:
        if batch < 1 or capacity < 1:
            raise ValueError(f"StaticCache: batch ({batch}) and capacity ({capacity}) must be >= 1")
        sp = config.sparse_config
        bs = sp["block_size"]
        self.capacity = -(-capacity // bs) * bs
        self.page_size = bs
        self.batch = batch
        self.device = torch.device(device)
        self.dtype = dtype
        self.light_index = {layer: i for i, layer in enumerate(config.lightning_layer_ids)}
        self.states = torch.zeros(len(self.light_index), batch, config.lightning_nh, config.lightning_head_dim,
                                  config.lightning_head_dim, dtype=torch.float32, device=self.device)
        hkv, d = config.num_key_value_heads, config.head_dim
        n1 = compressed_capacity(self.capacity, sp["kernel_size"], sp["kernel_stride"])
        n2 = compressed_capacity(self.capacity, 4 * sp["kernel_size"], 4 * sp["kernel_stride"])
        self.pool = pool
        self.block_table: torch.Tensor | None = None
        self.row_pages: list[list[int]] = []
        self._page_rows: Counter[int] = Counter()      # page -> rows mapping it
        if pool is not None:
            if pool.device != self.device or pool.dtype != dtype:
                raise ValueError(f"StaticCache: the page pool is on {pool.device} in {pool.dtype}, the cache on "
                                 f"{self.device} in {dtype}")
            self.block_table = torch.zeros(batch, self.capacity // bs, dtype=torch.int32, device=self.device)
            self.row_pages = [[] for _ in range(batch)]
        self.sparse: dict[int, SparseBuffers] = {}
        for layer in config.sparse_layer_ids:
            kw = dict(dtype=dtype, device=self.device)
            if pool is not None:
                k, v = pool.layer(layer)
            else:
                k, v = torch.zeros(batch, self.capacity, hkv, d, **kw), torch.zeros(batch, self.capacity, hkv, d, **kw)
            self.sparse[layer] = SparseBuffers(k=k, v=v, k1=torch.zeros(batch, n1, hkv, d, **kw),
                                               k2=torch.zeros(batch, n2, hkv, d, **kw))
        self.lengths = [0] * batch
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=self.device)

    @property
    def pages_mapped(self) -> int:
        """Distinct pool pages the rows map (a page several rows share counts once)."""
        return len(self._page_rows)

    # ------------------------------------------------------------------ pages (a paged cache)
    def map_pages(self, row: int, pages: list[int]) -> None:
        """Append `pages` (references already held for this row) to row `row`'s blocks."""
        have = self.row_pages[row]
        if len(have) + len(pages) > self.block_table.shape[1]:
            raise ValueError(f"StaticCache: row {row} would map {len(have) + len(pages)} pages, more than the "
                             f"{self.block_table.shape[1]} blocks of its capacity {self.capacity}")
        if pages:
            self.block_table[row, len(have):len(have) + len(pages)] = torch.tensor(pages, dtype=torch.int32)
            have.extend(pages)
            self._page_rows.update(pages)

    def grow_row(self, row: int, tokens: int) -> None:
        """Map fresh pages so that row `row` holds `tokens` tokens (OutOfPagesError if the pool is short)."""
        need = -(-tokens // self.page_size) - len(self.row_pages[row])
        if need > 0:
            self.map_pages(row, self.pool.allocate(need))

    def release_row(self, row: int) -> None:
        """Give row `row`'s pages back to the pool and unmap them (its blocks point at the scratch page)."""
        pages = self.row_pages[row]
        if pages:
            self.pool.release(pages)
            self.block_table[row, :len(pages)].zero_()
            self.row_pages[row] = []
            for p in pages:
                self._page_rows[p] -= 1
                if not self._page_rows[p]:
                    del self._page_rows[p]

    def state(self, layer: int) -> torch.Tensor:
        """Lightning state of `layer`: [B, H, Dk, Dv] fp32 (a view)."""
        return self.states[self.light_index[layer]]

    def check_room(self, row: int, new_tokens: int) -> None:
        end = self.lengths[row] + new_tokens
        if end > self.capacity:
            raise ValueError(f"StaticCache: sequence {row} would hold {end} tokens, "
                             f"more than the capacity {self.capacity} this cache was allocated for")
        if self.pool is not None and end > len(self.row_pages[row]) * self.page_size:
            raise ValueError(f"StaticCache: sequence {row} would hold {end} tokens, but its "
                             f"{len(self.row_pages[row])} pages hold {len(self.row_pages[row]) * self.page_size} "
                             "(grow_row first)")

    def reset(self) -> None:
        """Forget every sequence (buffers are kept; states zeroed). The host lengths are cleared in place: the
        `rows_view`s of this cache share the list."""
        if self.pool is not None:
            for row in range(self.batch):
                self.release_row(row)
        self.states.zero_()
        self.lengths[:] = [0] * len(self.lengths)
        self.seqlens.zero_()

    def reset_row(self, row: int) -> None:
        """Forget sequence `row` (its lightning states zeroed, no tokens, a paged row's pages released); its stale
        K/V and compressed keys lie beyond its length, where nothing reads them and its next prefill writes."""
        if self.pool is not None:
            self.release_row(row)
        self.states[:, row].zero_()
        self.lengths[row] = 0
        self.seqlens[row:row + 1].fill_(0)        # a fill kernel: no host sync

    def memory_bytes(self) -> dict[str, int]:
        kv = (self.pool.memory_bytes() if self.pool is not None
              else sum(b.k.numel() * b.k.element_size() * 2 for b in self.sparse.values()))
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
        view.page_size, view._page_rows = self.page_size, self._page_rows
        view.light_index = self.light_index
        view.states = self.states[:, :batch]
        view.pool, view.row_pages = self.pool, self.row_pages
        view.block_table = self.block_table[:batch] if self.block_table is not None else None
        kv_rows = slice(None) if self.pool is not None else slice(0, batch)     # pages are shared by all rows
        view.sparse = {layer: SparseBuffers(b.k[kv_rows], b.v[kv_rows], b.k1[:batch], b.k2[:batch])
                       for layer, b in self.sparse.items()}
        view.lengths = self.lengths
        view.seqlens = self.seqlens[:batch]
        return view
