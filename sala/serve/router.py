"""PrefixRouter: which engine replica serves a prompt, by prefix-cache affinity, else by load.

A replica's prefix cache holds pages of 64 tokens keyed by a hash chain (`sala.engine.prefix_cache.page_keys`:
key_i = hash(key_{i-1}, tokens of page i)), so two prompts share their first k pages exactly when their first k
keys are equal. The router keeps, per page key, the replicas that were sent a prompt containing that page (they
computed it, so their cache holds it until evicted), and routes a prompt to the replica holding its longest run of
leading pages, unless that replica has `max_inflight` requests or more in flight (a hot conversation must not pile
onto one replica while others idle); then, as for prompts without a cached prefix, to the least-loaded replica.

Memory is bounded: at most `max_pages` keys are remembered, least recently used first out. A replica that restarted
(its cache is empty) is dropped from every key with `forget`; one whose prefix cache evicted n entries loses its n
least recently routed keys (`forget_oldest`: its cache evicts least recently used first too).

Pure Python (no Ray), not thread-safe: the ingress calls it from its one event loop.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

logger = logging.getLogger(__name__)

AFFINITY = "affinity"
LEAST_LOADED = "least_loaded"


@dataclass(frozen=True)
class RouteDecision:
    """Where a request goes: `replica` (index), `reason` (AFFINITY or LEAST_LOADED) and `matched_pages`, the
    leading pages of the prompt the chosen replica is believed to hold."""

    replica: int
    reason: str
    matched_pages: int


class PrefixRouter:
    """Routes prompts (as leading page keys) to `num_replicas` replicas; see the module docstring.

    `max_inflight`: a replica with this many requests in flight or more is overloaded (affinity is ignored for it).
    `max_pages`: most page keys remembered (LRU).
    """

    def __init__(self, num_replicas: int, *, max_inflight: int = 16, max_pages: int = 1 << 20) -> None:
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, got {max_inflight}")
        self.num_replicas = num_replicas
        self.max_inflight = max_inflight
        self.max_pages = max_pages
        self.inflight = [0] * num_replicas
        self.routed = {AFFINITY: 0, LEAST_LOADED: 0}
        self._pages: OrderedDict[int, set[int]] = OrderedDict()   # page key -> replicas holding it
        self._next = 0                                             # round-robin among equally loaded replicas

    # ------------------------------------------------------------------ queries
    def match_lengths(self, keys: list[int]) -> list[int]:
        """Per replica, how many leading pages of `keys` it holds (a run from the first page)."""
        lengths = [0] * self.num_replicas
        alive = set(range(self.num_replicas))
        for n, key in enumerate(keys):
            holders = self._pages.get(key)
            alive &= holders if holders is not None else set()
            if not alive:
                break
            for r in alive:
                lengths[r] = n + 1
        return lengths

    def least_loaded(self, exclude: set[int] | frozenset[int] = frozenset()) -> int:
        """The replica with the fewest requests in flight (ties: round-robin), not in `exclude`."""
        candidates = [r for r in range(self.num_replicas) if r not in exclude]
        if not candidates:
            raise ValueError(f"no replica left: all {self.num_replicas} excluded")
        low = min(self.inflight[r] for r in candidates)
        tied = [r for r in candidates if self.inflight[r] == low]
        pick = next((r for r in tied if r >= self._next), tied[0])
        self._next = (pick + 1) % self.num_replicas
        return pick

    # ------------------------------------------------------------------ decisions
    def choose(self, keys: list[int], exclude: set[int] | frozenset[int] = frozenset()) -> RouteDecision:
        """Pick a replica for a prompt with leading page keys `keys` (no bookkeeping; see `route`)."""
        lengths = self.match_lengths(keys)
        best, best_len = -1, 0
        for r, n in enumerate(lengths):
            if r in exclude or self.inflight[r] >= self.max_inflight:
                continue
            if n > best_len or (n == best_len and n > 0 and self.inflight[r] < self.inflight[best]):
                best, best_len = r, n
        if best >= 0:
            return RouteDecision(best, AFFINITY, best_len)
        r = self.least_loaded(exclude)
        return RouteDecision(r, LEAST_LOADED, lengths[r])

    def route(self, keys: list[int], exclude: set[int] | frozenset[int] = frozenset()) -> RouteDecision:
        """Choose a replica, count the request in flight there and record that it will hold `keys`'s pages.
        Call `finished(decision.replica)` when the request ends, however it ends."""
        d = self.choose(keys, exclude)
        self.inflight[d.replica] += 1
        self.routed[d.reason] += 1
        self.record(d.replica, keys)
        return d

    def finished(self, replica: int) -> None:
        self.inflight[replica] = max(0, self.inflight[replica] - 1)

    # ------------------------------------------------------------------ cache knowledge
    def record(self, replica: int, keys: list[int]) -> None:
        """`replica` holds (or will hold once its prefill ran) the pages `keys`."""
        for key in keys:
            holders = self._pages.get(key)
            if holders is None:
                self._pages[key] = {replica}
            else:
                holders.add(replica)
                self._pages.move_to_end(key)
        while len(self._pages) > self.max_pages:
            self._pages.popitem(last=False)

    def forget(self, replica: int, keys: list[int] | None = None) -> None:
        """`replica` no longer holds `keys` (all its pages when None: it restarted or its cache was evicted)."""
        targets = list(self._pages) if keys is None else keys
        for key in targets:
            holders = self._pages.get(key)
            if holders is None:
                continue
            holders.discard(replica)
            if not holders:
                del self._pages[key]

    def forget_oldest(self, replica: int, n: int) -> int:
        """`replica` evicted `n` cache entries: forget its `n` least recently routed pages (its cache evicts
        least recently used first, so these are the likeliest gone). Returns how many were forgotten."""
        dropped = []
        for key, holders in self._pages.items():
            if len(dropped) >= n:
                break
            if replica in holders:
                dropped.append(key)
        self.forget(replica, dropped)
        return len(dropped)

    def num_pages(self, replica: int | None = None) -> int:
        """Page keys remembered (for `replica` only when given)."""
        if replica is None:
            return len(self._pages)
        return sum(1 for h in self._pages.values() if replica in h)
