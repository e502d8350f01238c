"""KVPagePool: the sparse layers' keys and values in pages of `page_size` tokens, shared by every sequence.

A serving engine allocates one pool at start: per sparse layer, K and V [num_pages + 1, page_size, Hkv, D] in the
model dtype. Page 0 is a scratch page that no sequence owns: block-table entries of blocks a row has not mapped
point there, so writes past a row's pages (a padded verify position, an idle row of a decode bucket) land
somewhere harmless and reads of them are masked by the row's length. The page size is the InfLLM-V2 block
(64 tokens), so a selected block is one page.

Pages are reference-counted: a row of the `StaticCache` holds one reference on each page it maps, the
`PrefixCache` one on each page it keeps. A prompt that starts with cached pages maps them (no copy) and writes
only pages of its own after them; a page returns to the free list when its last reference goes.
"""
from __future__ import annotations

import torch

from sala.engine.memory import dtype_bytes
from sala.modeling.configuration_sala import SalaConfig


class OutOfPagesError(RuntimeError):
    """The pool has fewer free pages than asked for."""


class KVPagePool:
    """Reference-counted pages of K/V for the sparse layers (see the module docstring)."""

    SCRATCH = 0

    def __init__(self, config: SalaConfig, num_pages: int, dtype: torch.dtype, device: torch.device | str) -> None:
        page_size = config.sparse_config["block_size"]   # the attention kernels read one selected block as one page
        if num_pages < 1:
            raise ValueError(f"KVPagePool: num_pages must be >= 1, got {num_pages}")
        self.page_size = page_size
        self.num_pages = int(num_pages)            # usable pages (page 0, the scratch page, not counted)
        self.device = torch.device(device)
        self.dtype = dtype
        self.layer_index = {layer: i for i, layer in enumerate(config.sparse_layer_ids)}
        shape = (len(self.layer_index), self.num_pages + 1, page_size, config.num_key_value_heads, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=dtype, device=self.device)
        self.refs = [0] * (self.num_pages + 1)
        self._free = list(range(self.num_pages, 0, -1))      # a stack: the lowest page is handed out first

    @staticmethod
    def bytes_per_page(config: SalaConfig, dtype: torch.dtype) -> int:
        """Bytes of one page over all sparse layers (K and V)."""
        return (2 * len(config.sparse_layer_ids) * config.sparse_config["block_size"] * config.num_key_value_heads
                * config.head_dim * dtype_bytes(dtype))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    def memory_bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V pages of sparse layer `layer`: [num_pages + 1, page_size, Hkv, D] each (views)."""
        i = self.layer_index[layer]
        return self.k[i], self.v[i]

    def allocate(self, n: int) -> list[int]:
        """n fresh pages (one reference each). OutOfPagesError, allocating nothing, if fewer are free."""
        if n < 0:
            raise ValueError(f"KVPagePool.allocate: n must be >= 0, got {n}")
        if n > len(self._free):
            raise OutOfPagesError(f"the K/V page pool has {len(self._free)} free pages of {self.num_pages}; "
                                  f"{n} were asked for")
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self.refs[p] = 1
        return pages

    def retain(self, pages: list[int]) -> None:
        """One more reference on each page (a row mapping a cached page, the prefix cache keeping a row's)."""
        for p in pages:
            if p == self.SCRATCH or self.refs[p] < 1:
                raise ValueError(f"KVPagePool.retain: page {p} is not allocated")
            self.refs[p] += 1

    def release(self, pages: list[int]) -> None:
        """Drop one reference on each page; pages without references return to the free list."""
        for p in pages:
            if p == self.SCRATCH or self.refs[p] < 1:
                raise ValueError(f"KVPagePool.release: page {p} is not allocated")
            self.refs[p] -= 1
            if self.refs[p] == 0:
                self._free.append(p)

    def __repr__(self) -> str:
        return (f"KVPagePool(pages={self.num_pages} x {self.page_size} tokens, free={self.num_free}, "
                f"{self.memory_bytes() / 2**20:.1f} MiB)")
