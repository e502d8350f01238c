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


def test_evictions_forget_the_least_recently_routed_pages_of_that_replica():
    router = PrefixRouter(2)
    old, new = page_keys(_doc(8, 3)), page_keys(_doc(9, 3))
    router.record(0, old)
    router.record(1, old)
    router.record(0, new)
    assert router.forget_oldest(0, 2) == 2          # replica 0 evicted 2 entries: its 2 oldest pages
    assert router.match_lengths(old) == [0, 3]       # a chain cut at its root matches nothing on replica 0
    assert router.match_lengths(new) == [3, 0]       # its recent document is still routed to it
    assert router.forget_oldest(0, 10) == 4          # more than it holds: everything it held
    assert router.num_pages(0) == 0 and router.num_pages(1) == 3


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_replicas must be >= 1, got 0"):
        PrefixRouter(0)
    with pytest.raises(ValueError, match="max_inflight must be >= 1, got 0"):
        PrefixRouter(2, max_inflight=0)


# ---------------------------------------------------------------------- RoutedEngine behind the app (no Ray)
class _FakeReplica:
    """A replica handle: `mode` "ok", "dead" (fails every call), "broken" (answers stats, fails generate),
    "die_before_output" (admits, then fails before any output, once), "die_mid" (fails after the first output)."""

    def __init__(self, mode: str = "ok") -> None:
        self.mode = mode
        self.served: list[str] = []
        self.cancelled = 0

    async def stats(self):
        if self.mode == "dead":
            raise RuntimeError("The actor died unexpectedly")
        return {"pid": 1, "running": 0, "waiting": 0}

    async def generate(self, request):
        from sala.engine.requests import RequestOutput
        from sala.serve.routed_engine import ADMITTED, OUTPUT

        if self.mode in ("dead", "broken"):
            raise RuntimeError("The actor died unexpectedly")
        yield ADMITTED, None
        if self.mode == "die_before_output":
            self.mode = "ok"
            raise RuntimeError("The actor died unexpectedly")
        n = request.params.max_new_tokens
        for k in range(n):
            if self.mode == "die_mid" and k == 1:
                raise RuntimeError("The actor died unexpectedly")
            last = k == n - 1
            yield OUTPUT, [RequestOutput(request.request_id, [100 + k], f" t{k}", None, None, last,
                                         "length" if last else None, len(request.prompt_ids), 0, k + 1)]
        self.served.append(request.request_id)


class _FakeStream:
    def __init__(self, replica: _FakeReplica, agen) -> None:
        self.replica, self.agen = replica, agen

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self.agen.__anext__()

    def cancel(self) -> None:
        self.replica.cancelled += 1


def _fake_call(handle, method, *args, stream=False):
    result = getattr(handle, method)(*args)
    return _FakeStream(handle, result) if stream else result


def _client(replicas):
    from fastapi.testclient import TestClient

    from sala.engine.loading import load_config_dir, load_tokenizer_dir
    from sala.serve.app import build_app
    from sala.serve.routed_engine import RetryAfter503, RoutedEngine
    from sala.utils.bundled import BUNDLED_MODEL_DIR

    engine = RoutedEngine(replicas, tokenizer=load_tokenizer_dir(BUNDLED_MODEL_DIR),
                          config=load_config_dir(BUNDLED_MODEL_DIR), max_model_len=4096, call=_fake_call,
                          poll_s=3600)
    app = build_app(engine, model_name="m")
    app.add_middleware(RetryAfter503)
    return TestClient(app), engine


def test_failed_replicas_are_routed_around_before_any_output():
    dead, flaky = _FakeReplica("dead"), _FakeReplica("die_before_output")
    client, engine = _client([dead, flaky, _FakeReplica()])
    with client:
        for i in range(3):
            r = client.post("/v1/completions", json={"model": "m", "prompt": f"hello {i}", "max_tokens": 3})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == " t0 t1 t2"
        assert engine.down >= {0} and engine.retried == 1      # the flaky one failed once before output
        assert engine.router.inflight == [0, 0, 0]


def test_failure_after_output_is_a_retryable_503():
    client, engine = _client([_FakeReplica("die_mid"), _FakeReplica("die_mid")])
    with client:
        r = client.post("/v1/completions", json={"model": "m", "prompt": "hello", "max_tokens": 4})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        err = r.json()["error"]
        assert err["type"] == "service_unavailable" and "retry" in err["message"]
        # streamed: the headers went out with the first token, so the error is an event before [DONE]
        r = client.post("/v1/completions", json={"model": "m", "prompt": "hello", "max_tokens": 4, "stream": True})
        events = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
        assert r.status_code == 200 and events[-1] == "[DONE]" and "retry" in events[-2]
        assert engine.router.inflight == [0, 0]


def test_no_replica_left_is_503_with_retry_after():
    client, _ = _client([_FakeReplica("dead"), _FakeReplica("dead")])
    with client:
        r = client.post("/v1/chat/completions", json={"model": "m", "max_tokens": 2,
                                                      "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert "all 2 engine replicas are down" in r.json()["error"]["message"]
        assert client.get("/health").status_code == 503     # every replica down


def test_every_replica_failing_the_request_is_503_replica_unavailable():
    client, engine = _client([_FakeReplica("broken"), _FakeReplica("broken")])
    with client:
        r = client.post("/v1/completions", json={"model": "m", "prompt": "hello", "max_tokens": 2})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "replica_unavailable"
        assert engine.failures == 2 and engine.router.inflight == [0, 0]


def test_poll_forgets_restarted_and_evicting_replicas():
    import asyncio

    from sala.serve.routed_engine import RoutedEngine

    class Stats:
        def __init__(self):
            self.value = {"pid": 1, "prefix_cache_evictions": 0}

        async def stats(self):
            return dict(self.value)

    a, b = Stats(), Stats()
    engine = RoutedEngine([a, b], tokenizer=None, config=None, max_model_len=100, call=_fake_call)
    keys = page_keys(_doc(10, 4))
    asyncio.run(engine.poll())
    engine.router.record(0, keys)
    engine.router.record(1, keys)
    a.value["pid"] = 2                                     # replica 0 restarted
    b.value["prefix_cache_evictions"] = 1                  # replica 1 evicted one entry
    asyncio.run(engine.poll())
    assert engine.router.match_lengths(keys) == [0, 0]     # 0: empty cache; 1: its oldest page (the root) went
    assert engine.router.num_pages(1) == 3 and engine.stats()["replicas_up"] == 2
