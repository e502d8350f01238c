"""Exact prefix caching for the serving engine: a prompt that starts with already-computed tokens skips them.

Pages are the K/V pages of the engine's `KVPagePool` (`page_size` tokens, the InfLLM-V2 block), keyed by a hash
chain of their token ids (key_i = hash(key_{i-1}, tokens of page i)); every entry also keeps its tokens and its
parent key, so a hash collision can never return another prompt's cache. Two kinds of entries:

- a page: a reference on a pool page that a prompt's prefill wrote (no copy: the cache and the row share it);
- a state snapshot at a page boundary P: every lightning layer's state after the first P tokens,
  [n_lightning_layers, H, Dk, Dv] fp32 (what the row's recurrences hold at P), on the cache's device.

A prefix of P tokens is usable when pages 0 .. P/page_size - 1 and the snapshot at P are all present. Restoring
it into a row maps those pages into the row's block table (no K/V is copied; the row writes only pages after
them), copies the states, and recomputes the compressed keys K1/K2 of the windows that end at or before P from
those keys with `compress_window_range` -- the same windows an uninterrupted prefill computes, on the same keys, so they
are identical; windows that end after P are written by the continued prefill, which starts its windows at
`compressed_lengths(P)` exactly as a prefill chunk starting at P does.

Snapshots are held within `max_bytes`; pages within the pool: `reclaim(n)` gives pages back when the engine needs
free ones. Entries are reference-counted while a request that restored them runs, and evicted
least-recently-used: snapshots in least-recently-used order, and the pages that no longer lead to any snapshot
(leaves of the page tree, as in a radix cache), so pressure shortens cached prefixes from their ends back to an
earlier snapshot and never cuts a chain at its root.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from sala.engine.kv_pages import KVPagePool
from sala.engine.static_cache import StaticCache
from sala.modeling.configuration_sala import SalaConfig
from sala.modeling.modeling_sala import sparse_params_from_config
from sala.ops.infllmv2 import compress_window_range, compressed_lengths, gather_paged_range

logger = logging.getLogger(__name__)

PAGE_SIZE = 64     # the released model's sparse block (a paged cache's page size is its config's block size)
_ROOT = 0          # parent key of page 0


@dataclass
class _Page:
    key: int
    parent: int
    tokens: tuple[int, ...]
    page: int                                 # the pool page (one reference held by the cache)
    refs: int = 0
    children: set[int] = field(default_factory=set)
    snapshot: bool = False                    # a state snapshot exists at the end of this page


@dataclass
class _Snapshot:
    key: int                                  # key of the last page of the prefix
    length: int                               # P (tokens)
    states: torch.Tensor                      # [n_light, H, Dk, Dv] fp32
    refs: int = 0

    @property
    def nbytes(self) -> int:
        return self.states.numel() * self.states.element_size()


@dataclass
class PrefixMatch:
    """A usable cached prefix: its length in tokens and the keys of its pages (first to last).

    `pages_length`: tokens of the prompt's leading pages found in the cache (>= length: pages can run past the
    last snapshot). A prefill that continues from `length` should end a chunk at `pages_length`, so a
    snapshot lands where this prompt leaves the cached one (the end of a shared document, say).
    """

    length: int
    keys: list[int]
    pages_length: int = 0


def page_keys(ids: list[int], page_size: int = PAGE_SIZE) -> list[int]:
    """Hash-chain keys of the full pages of ids (len(ids) // page_size of them)."""
    keys, prev = [], _ROOT
    for i in range(len(ids) // page_size):
        prev = hash((prev, tuple(ids[i * page_size:(i + 1) * page_size])))
        keys.append(prev)
    return keys


class PrefixCache:
    """Pool pages and lightning-state snapshots keyed by token-id hash chains (see the module docstring)."""

    def __init__(self, config: SalaConfig, pool: KVPagePool, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"PrefixCache: max_bytes must be >= 0, got {max_bytes}")
        self.config = config
        self.pool = pool
        self.page_size = pool.page_size
        self.max_bytes = int(max_bytes)            # snapshots (the pages are the pool's)
        self.params = sparse_params_from_config(config)
        self.sparse_ids = list(config.sparse_layer_ids)
        self.pages: dict[int, _Page] = {}
        self.snapshots: dict[int, _Snapshot] = {}
        # Eviction candidates, oldest first: ("snap", key) for every snapshot, ("page", key) for leaf pages.
        self._lru: OrderedDict[tuple[str, int], None] = OrderedDict()
        self.bytes = 0                 # snapshots
        self.evictions = 0
        self.refs = 0              # references held by running requests (acquire - release), all entries

    # ------------------------------------------------------------------ bookkeeping
    def _touch(self, kind: str, key: int) -> None:
        if kind == "page" and self.pages[key].children:
            return                                     # not a leaf: not a candidate
        self._lru[(kind, key)] = None
        self._lru.move_to_end((kind, key))

    def stats(self) -> dict:
        return {"prefix_cache_pages": len(self.pages), "prefix_cache_snapshots": len(self.snapshots),
                "prefix_cache_bytes": self.bytes, "prefix_cache_max_bytes": self.max_bytes,
                "prefix_cache_refs": self.refs,
                "prefix_cache_evictions": self.evictions}

    def _drop_snapshot(self, key: int) -> None:
        snap = self.snapshots.pop(key)
        self.bytes -= snap.nbytes
        self._lru.pop(("snap", key), None)
        if key in self.pages:
            self.pages[key].snapshot = False

    def _drop_page(self, key: int) -> None:
        """Remove a page, its snapshot and everything that extends it (unreachable without it)."""
        stack = [key]
        while stack:
            k = stack.pop()
            page = self.pages.pop(k, None)
            if page is None:
                continue
            if page.snapshot and k in self.snapshots:
                self._drop_snapshot(k)
            self.pool.release([page.page])
            self._lru.pop(("page", k), None)
            parent = self.pages.get(page.parent)
            if parent is not None:
                parent.children.discard(k)
                if not parent.children:                # a leaf again; as cold as the child just dropped
                    self._lru[("page", page.parent)] = None
                    self._lru.move_to_end(("page", page.parent), last=False)
            stack.extend(page.children)

    def _victim(self, free_pages: bool = False) -> tuple[str, int] | None:
        """What to evict next; entries in use never. For snapshot bytes: a leaf page without a snapshot (no
        prefix can end there: free to drop), else the least recently used snapshot -- dropping a chain's last
        snapshot turns its tail pages into such leaves, so a chain shrinks back to its previous snapshot. For pool
        pages (free_pages): only leaf pages that no running row maps (their page goes back to the pool), those
        without a snapshot first, else the least recently used leaf with its snapshot: a chain shrinks from its
        end."""
        snap = leaf = None
        for kind, key in self._lru:
            if kind == "page":
                page = self.pages[key]
                if page.refs or (free_pages and self.pool.refs[page.page] > 1):
                    continue
                if not page.snapshot:
                    return kind, key
                if free_pages and leaf is None and self.snapshots[key].refs == 0:
                    leaf = (kind, key)
            elif not free_pages and snap is None and self.snapshots[key].refs == 0:
                snap = (kind, key)
        return leaf if free_pages else snap

    def _evict(self, victim: tuple[str, int]) -> None:
        kind, key = victim
        if kind == "snap":
            self._drop_snapshot(key)
        else:
            self._drop_page(key)
        self.evictions += 1

    def _make_room(self, nbytes: int) -> bool:
        """Evict until a snapshot of nbytes more fits; False if it cannot."""
        if nbytes > self.max_bytes:
            return False
        while self.bytes + nbytes > self.max_bytes:
            victim = self._victim()
            if victim is None:
                return False
            self._evict(victim)
        return True

    def reclaim(self, pages: int) -> bool:
        """Evict entries until the pool has `pages` free pages; False if it cannot get there."""
        while self.pool.num_free < pages:
            victim = self._victim(free_pages=True)
            if victim is None:
                return False
            self._evict(victim)
        return True

    def _pin(self, key: int, n: int) -> None:
        """Add n to the refs of page `key` and of its snapshot (if any)."""
        if key in self.pages:
            self.pages[key].refs += n
        if key in self.snapshots:
            self.snapshots[key].refs += n

    # ------------------------------------------------------------------ lookup / restore
    def lookup(self, ids: list[int], max_tokens: int, keys: list[int] | None = None) -> PrefixMatch | None:
        """The longest cached prefix of ids of at most max_tokens tokens (pages + snapshot), or None.
        `keys`: page_keys(ids) if already computed."""
        ps = self.page_size
        chain = page_keys(ids, ps) if keys is None else keys
        best, keys, prev = None, [], _ROOT
        for i, key in enumerate(chain[:max_tokens // ps]):
            page = self.pages.get(key)
            if page is None or page.parent != prev or page.tokens != tuple(ids[i * ps:(i + 1) * ps]):
                break
            keys.append(key)
            prev = key
            if key in self.snapshots:
                best = len(keys)
        if best is None:
            return None
        return PrefixMatch(best * ps, keys[:best], len(keys) * ps)

    def acquire(self, match: PrefixMatch) -> None:
        """Pin the match's entries (no eviction) and mark them recently used."""
        for key in match.keys:
            self.pages[key].refs += 1
            self._touch("page", key)
        self.snapshots[match.keys[-1]].refs += 1
        self._touch("snap", match.keys[-1])
        self.refs += len(match.keys) + 1

    def release(self, match: PrefixMatch) -> None:
        for key in match.keys:
            if key in self.pages:
                self.pages[key].refs -= 1
        snap = self.snapshots.get(match.keys[-1])
        if snap is not None:
            snap.refs -= 1
        self.refs -= len(match.keys) + 1

    @torch.no_grad()
    def restore(self, match: PrefixMatch, cache: StaticCache, row: int) -> None:
        """Put the cached prefix into `row` of a paged cache (whose row maps no pages yet): its pages mapped (a
        reference each for the row), K1/K2 of the windows inside [0, P) computed from their keys, the lightning
        states at P, lengths P."""
        P = match.length
        if cache.pool is not self.pool or cache.row_pages[row]:
            raise ValueError("PrefixCache.restore: the cache must be paged on this prefix cache's pool and the row "
                             f"empty (row {row} maps {len(cache.row_pages[row])} pages)")
        if P > cache.capacity:
            raise ValueError(f"PrefixCache.restore: a {P}-token prefix does not fit the row capacity {cache.capacity}")
        pages = [self.pages[k].page for k in match.keys]
        self.pool.retain(pages)
        cache.map_pages(row, pages)
        p = self.params
        n1, n2 = compressed_lengths(P, p)
        table_row = cache.block_table[row]
        for layer in self.sparse_ids:
            buf = cache.sparse[layer]
            keys = gather_paged_range(buf.k, table_row, 0, P)
            for comp, kernel, stride, n in ((buf.k1, p.kernel_size, p.kernel_stride, n1),
                                            (buf.k2, p.k2_kernel, p.k2_stride, n2)):
                if n > 0:
                    comp[row, :n] = compress_window_range(keys, 0, n, kernel, stride)[0]
            del keys
        cache.states[:, row].copy_(self.snapshots[match.keys[-1]].states)
        cache.lengths[row] = P
        cache.seqlens[row:row + 1].fill_(P)

    # ------------------------------------------------------------------ insertion
    @torch.no_grad()
    def store(self, ids: list[int], cache: StaticCache, row: int, upto: int, start: int = 0,
              keys: list[int] | None = None) -> int:
        """Insert the pages of ids [start, upto) (page-aligned, already in `row` of a paged cache on this pool,
        whose length is `upto`: the cache takes a reference on the row's pages) and a snapshot of the row's
        lightning states at `upto`. Returns how far pages are now stored for this prompt (`start` if nothing
        could be stored: a missing parent). `keys`: page_keys(ids) if already computed (a long prompt stores
        once per chunk)."""
        ps = self.page_size
        if cache.pool is not self.pool:
            raise ValueError("PrefixCache.store: the cache must be paged on this prefix cache's pool")
        if upto % ps or start % ps or cache.lengths[row] != upto:
            raise ValueError(f"PrefixCache.store: upto {upto} and start {start} must be multiples of the page size "
                             f"{ps} and upto the row's length {cache.lengths[row]}")
        keys = page_keys(ids[:upto], ps) if keys is None else keys[:upto // ps]
        prev = keys[start // ps - 1] if start else _ROOT
        if start and prev not in self.pages:
            return start
        done = start
        for i in range(start // ps, upto // ps):
            key = keys[i]
            if key not in self.pages:
                a, b = i * ps, (i + 1) * ps
                page = _Page(key, prev, tuple(ids[a:b]), cache.row_pages[row][i])
                self.pool.retain([page.page])      # shared with the row: no copy
                self.pages[key] = page
                if prev != _ROOT:
                    self.pages[prev].children.add(key)
                    self._lru.pop(("page", prev), None)
            self._touch("page", key)
            prev = key
            done = (i + 1) * ps
        if upto and keys[-1] not in self.snapshots:
            states = cache.states[:, row].clone()
            snap = _Snapshot(keys[-1], upto, states)
            self._pin(keys[-1], 1)
            fits = self._make_room(snap.nbytes)
            self._pin(keys[-1], -1)
            if fits and keys[-1] in self.pages:
                self.snapshots[keys[-1]] = snap
                self.pages[keys[-1]].snapshot = True
                self.bytes += snap.nbytes
        if upto and keys[-1] in self.snapshots:
            self._touch("snap", keys[-1])
        return done

    def clear(self) -> None:
        """Drop every entry not in use."""
        for key in [k for k, p in self.pages.items() if p.parent == _ROOT]:
            if self.pages[key].refs == 0:
                self._drop_page(key)
        for key in [k for k, s in self.snapshots.items() if s.refs == 0]:
            self._drop_snapshot(key)
