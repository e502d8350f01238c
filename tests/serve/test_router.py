"""PrefixRouter (pure Python): affinity to the longest cached prefix, least-loaded fallback, overload, eviction."""
from __future__ import annotations

import pytest

from sala.engine.prefix_cache import page_keys
from sala.serve.router import AFFINITY, LEAST_LOADED, PrefixRouter


def _doc(seed: int, pages: int) -> list[int]:
    return [(seed * 7919 + i * 31) % 5000 + 3 for i in range(pages * 64)]


def test_new_prompts_spread_least_loaded_then_follow_ups_stay():
    router = PrefixRouter(3, max_inflight=4)
    docs = [_doc(s, 3) for s in range(3)]
    first = [router.route(page_keys(d)) for d in docs]
    assert [d.reason for d in first] == [LEAST_LOADED] * 3
    assert sorted(d.replica for d in first) == [0, 1, 2]          # one per replica
    for d in first:
        router.finished(d.replica)
    # a follow-up extends each document (more pages): it goes where the document is
    for doc, d in zip(docs, first):
        follow = router.route(page_keys(doc + _doc(99, 2)))
        assert (follow.replica, follow.reason, follow.matched_pages) == (d.replica, AFFINITY, 3)
        router.finished(follow.replica)
    assert router.routed == {AFFINITY: 3, LEAST_LOADED: 3}


def test_longest_leading_match_wins_and_must_start_at_page_zero():
    router = PrefixRouter(2)
    a, b = _doc(1, 4), _doc(2, 4)
    router.record(0, page_keys(a[:128]))     # replica 0: first 2 pages of a
    router.record(1, page_keys(a))           # replica 1: all 4 pages of a
    assert router.match_lengths(page_keys(a)) == [2, 4]
    assert router.choose(page_keys(a)).replica == 1
    # the same page content after a different first page has a different key (hash chain): no match
    shifted = b[:64] + a[64:]
    assert router.match_lengths(page_keys(shifted)) == [0, 0]
    assert router.choose(page_keys(shifted)).reason == LEAST_LOADED
    # a prompt shorter than one page has no key: least-loaded
    assert router.choose(page_keys(a[:40])).reason == LEAST_LOADED


def test_overloaded_affinity_replica_falls_back_to_least_loaded():
    router = PrefixRouter(2, max_inflight=2)
    doc = _doc(3, 2)
    keys = page_keys(doc)
    d0 = router.route(keys)
    # a second request for the same prefix: replica still below the bound -> affinity
    d1 = router.route(keys)
    assert (d1.replica, d1.reason) == (d0.replica, AFFINITY)
    # now that replica has 2 in flight (the bound): the next one goes to the other replica
    d2 = router.route(keys)
    assert d2.replica != d0.replica and d2.reason == LEAST_LOADED
    assert router.inflight == ([2, 1] if d0.replica == 0 else [1, 2])
    # both now hold the prefix; once the first drains, it is chosen again (tie on length: lower load)
    router.finished(d0.replica)
    router.finished(d0.replica)
    d3 = router.choose(keys)
    assert (d3.replica, d3.reason) == (d0.replica, AFFINITY)


def test_exclude_skips_a_failed_replica():
    router = PrefixRouter(2)
    keys = page_keys(_doc(4, 2))
    d = router.route(keys)
    router.finished(d.replica)
    retry = router.route(keys, exclude={d.replica})
    assert retry.replica != d.replica
    with pytest.raises(ValueError, match="all 2 excluded"):
        router.least_loaded({0, 1})


def test_forget_evicts_a_replica_and_lru_bound():
    router = PrefixRouter(2, max_pages=5)
    a, b = page_keys(_doc(5, 3)), page_keys(_doc(6, 3))
    router.record(0, a)
    router.record(1, a)
    router.forget(0)                          # replica 0 restarted: its cache is empty
    assert router.match_lengths(a) == [0, 3]
    router.forget(1, a[2:])                   # replica 1 evicted the last page of a
    assert router.match_lengths(a) == [0, 2]
    assert router.num_pages() == 2
    router.record(0, b)                       # 2 + 3 = 5 keys: at the bound
    assert router.num_pages() == 5
    router.record(0, page_keys(_doc(7, 1)))   # one more: the least recently used key (a[0]) goes
    assert router.num_pages() == 5 and router.match_lengths(a) == [0, 0]
    assert router.match_lengths(b) == [3, 0]


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_replicas must be >= 1, got 0"):
        PrefixRouter(0)
    with pytest.raises(ValueError, match="max_inflight must be >= 1, got 0"):
        PrefixRouter(2, max_inflight=0)
