"""Concurrent clients, the prefix cache over HTTP, every error status, client disconnects and bursts of load."""
from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.serve.live import make_core, serving, stream_then_leave

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu",
         "nu", "xi", "omicron", "pi", "rho", "sigma", "tau", "upsilon", "phi", "chi", "psi", "omega"]


def _prompt(i: int, words: int) -> str:
    return "# notes " + " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(words)) + "\ndef f():\n"


async def _complete(client: httpx.AsyncClient, prompt, **kw) -> dict:
    r = await client.post("/v1/completions", json={"model": "sala-test", "prompt": prompt, "temperature": 0, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def _tokens(body: dict, tokenizer) -> list[int]:
    return tokenizer.encode(body["choices"][0]["text"])


def test_concurrent_clients_get_what_each_gets_alone(server):
    tok = server.app.state.engine.tokenizer
    prompts = [_prompt(i, 3 + 9 * i) for i in range(16)]      # 10 .. 150+ tokens

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=600) as client:
            alone = [await _complete(client, p, max_tokens=12, logprobs=0) for p in prompts]
            together = await asyncio.gather(*[_complete(client, p, max_tokens=12, logprobs=0) for p in prompts])
            return alone, together

    alone, together = asyncio.run(main())
    for a, b in zip(alone, together):
        assert b["choices"][0]["logprobs"]["tokens"] == a["choices"][0]["logprobs"]["tokens"]
        assert b["choices"][0]["text"] == a["choices"][0]["text"]
        assert _tokens(a, tok) == _tokens(b, tok)


def test_a_small_kv_pool_preempts_and_still_answers_each_exactly():
    """A K/V pool of one 256-token row for 6 concurrent 120-token answers: requests map pages as they grow, the
    newest are preempted and recomputed, and every client still gets what it gets alone (and the metrics count
    the preemptions)."""
    prompts = [_prompt(i, 5 + 7 * i) for i in range(6)]

    async def main(url: str, together: bool):
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            if together:
                return await asyncio.gather(*[_complete(client, p, max_tokens=120, ignore_eos=True) for p in prompts])
            return [await _complete(client, p, max_tokens=120, ignore_eos=True) for p in prompts]

    with serving(max_model_len=256, max_num_seqs=6, kv_cache_tokens=256) as small:
        squeezed = asyncio.run(main(small.url, True))
        metrics = httpx.get(small.url + "/metrics").text
    with serving(max_model_len=256, max_num_seqs=1) as roomy:
        alone = asyncio.run(main(roomy.url, False))
    for a, b in zip(alone, squeezed):
        assert b["choices"][0]["text"] == a["choices"][0]["text"]
        assert b["usage"]["completion_tokens"] == 120
    preemptions = next(float(line.split()[-1]) for line in metrics.splitlines()
                       if line.startswith("sala_preemptions_total "))
    assert preemptions >= 1


def test_prefix_cache_same_answer_as_without_and_reports_cached_tokens():
    document = "\n".join(f"# section {k}: " + " ".join(WORDS[(k * 5 + j) % len(WORDS)] for j in range(12))
                         for k in range(40))
    questions = ["\nQ: what is section 3 about?\nA:", "\nQ: name the last section.\nA:"]

    def ask(server) -> list[dict]:
        async def main():
            async with httpx.AsyncClient(base_url=server.url, timeout=600) as client:
                return [await _complete(client, document + q, max_tokens=8) for q in questions]
        return asyncio.run(main())

    with serving(max_model_len=2048) as on:
        with_cache = ask(on)
    with serving(max_model_len=2048, enable_prefix_cache=False) as off:
        without = ask(off)
    n_doc = with_cache[0]["usage"]["prompt_tokens"]
    assert n_doc > 4 * 64, "the document must span several 64-token pages"
    for a, b in zip(with_cache, without):
        assert a["choices"][0]["text"] == b["choices"][0]["text"]
        assert b["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert with_cache[0]["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    cached = with_cache[1]["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= 4 * 64 and cached % 64 == 0 and cached < with_cache[1]["usage"]["prompt_tokens"]


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert "Traceback" not in r.text
    return body["error"]


def test_bad_inputs_get_openai_errors(server):
    url = server.url

    def post(path, **kw):
        return httpx.post(url + path, timeout=60, **kw)

    ok = {"model": "sala-test", "prompt": "hi", "max_tokens": 2}
    for bad, param in [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"n": 0}, "n"),
                       ({"logprobs": 99}, "logprobs"), ({"max_tokens": -3}, "max_tokens"), ({"stop": [""]}, "stop"),
                       ({"prompt": []}, "prompt"), ({"prompt": [[]]}, "prompt"), ({"prompt": 12}, "prompt"),
                       ({"prompt": [10**9]}, "prompt"), ({"max_tokens": 0}, "max_tokens"),
                       ({"top_k": -5}, "top_k")]:
        err = _error(post("/v1/completions", json={**ok, **bad}), 400)
        assert err["param"] == param or err["param"].startswith(param), (bad, err)
    # too long for the model length: both numbers in the message
    max_len = server.app.state.engine.max_model_len
    err = _error(post("/v1/completions", json={**ok, "prompt": list(range(5, 5 + max_len + 10))}), 400)
    assert str(max_len) in err["message"] and str(max_len + 10) in err["message"]
    err = _error(post("/v1/completions", json={**ok, "max_tokens": max_len}), 400)
    assert str(max_len) in err["message"]
    err = _error(post("/v1/chat/completions", json={"model": "sala-test", "messages": [
        {"role": "user", "content": "x " * (max_len + 5)}]}), 400)
    assert str(max_len) in err["message"]
    # malformed bodies
    _error(post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}), 400)
    _error(post("/v1/completions", json=["a", "list"]), 400)
    _error(post("/v1/chat/completions", json={"model": "sala-test", "messages": []}), 400)
    _error(post("/v1/chat/completions", json={"model": "sala-test", "messages": [{"role": "wizard"}]}), 400)
    # unknown model, unknown route
    assert _error(post("/v1/completions", json={**ok, "model": "gpt-4"}), 404)["code"] == "model_not_found"
    _error(httpx.get(url + "/v1/nothing-here"), 404)
    # the server is still fine
    assert httpx.get(url + "/health").status_code == 200
    assert post("/v1/completions", json=ok).status_code == 200


def test_api_key_and_full_queue():
    with serving(api_key="s3cret", max_waiting=0) as server:
        body = {"model": "sala-test", "prompt": "hi", "max_tokens": 2}
        assert _error(httpx.post(server.url + "/v1/completions", json=body), 401)["code"] == "invalid_api_key"
        wrong = {"Authorization": "Bearer nope"}
        _error(httpx.post(server.url + "/v1/completions", json=body, headers=wrong), 401)
        _error(httpx.get(server.url + "/v1/models", headers=wrong), 401)
        good = {"Authorization": "Bearer s3cret"}
        assert httpx.get(server.url + "/v1/models", headers=good).status_code == 200
        assert httpx.get(server.url + "/health").status_code == 200          # health needs no key
        # max_waiting 0: every request finds the waiting queue full
        err = _error(httpx.post(server.url + "/v1/completions", json=body, headers=good, timeout=60), 503)
        assert "waiting" in err["message"]


def test_disconnect_mid_stream_aborts_the_request(server):
    engine = server.app.state.engine
    tokens_before = engine.stats()["generation_tokens_total"]
    aborted_before = engine.stats()["requests_aborted"]
    body = {"model": "sala-test", "prompt": "def main():\n", "max_tokens": 400, "temperature": 0, "stream": True,
            "ignore_eos": True}
    stream_then_leave(server.url, body)
    steps_at_close = engine.steps
    # the engine thread stops the request and the running count returns to 0 within a bounded number of steps
    for _ in range(10_000):                      # a hang guard only: the bound that matters is in steps
        s = engine.stats()
        if not (s["running"] or s["prefilling"] or s["waiting"]):
            break
        # the server notices the closed socket on its event loop, then the abort applies before the next step
        assert engine.steps - steps_at_close <= 8, "the aborted request kept running"
        time.sleep(0.01)
    s = engine.stats()
    assert s["running"] == s["prefilling"] == s["waiting"] == 0
    assert s["requests_aborted"] == aborted_before + 1
    assert s["generation_tokens_total"] - tokens_before < 400


def test_healthy_after_a_burst(server):
    prompts = [_prompt(i, 4 + (i % 8) * 6) for i in range(32)]

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=600) as client:
            burst = await asyncio.gather(*[_complete(client, p, max_tokens=6) for p in prompts])
            health = await client.get("/health")
            after = await _complete(client, prompts[5], max_tokens=6)
            return burst, health, after

    burst, health, after = asyncio.run(main())
    assert health.status_code == 200
    assert after["choices"][0]["text"] == burst[5]["choices"][0]["text"]
    assert all(b["usage"]["completion_tokens"] >= 1 for b in burst)
    stats = server.app.state.engine.stats()
    assert stats["running"] == 0 and stats["waiting"] == 0


def test_engine_construction_errors_are_clear():
    with pytest.raises(ValueError, match="max_num_seqs"):
        make_core(max_num_seqs=0)


def test_disconnect_before_a_non_streamed_response_aborts_the_request(server):
    engine = server.app.state.engine
    before = engine.stats()
    body = {"model": "sala-test", "prompt": "def main():\n", "max_tokens": 400, "temperature": 0,
            "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):      # the client gives up and closes its connection
        httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(60, read=1.0))
    for _ in range(10_000):                      # a hang guard only
        s = engine.stats()
        if s["requests_aborted"] > before["requests_aborted"] and not (s["running"] or s["prefilling"]
                                                                         or s["waiting"]):
            break
        time.sleep(0.01)
    s = engine.stats()
    assert s["requests_aborted"] == before["requests_aborted"] + 1
    assert s["generation_tokens_total"] - before["generation_tokens_total"] < 400
    assert httpx.get(server.url + "/health").status_code == 200


def test_a_bug_is_a_json_500_and_an_engine_failure_a_503():
    core = make_core(max_model_len=256, max_num_seqs=2)
    with serving(core) as server:
        tok = server.app.state.engine.tokenizer
        real_encode = tok.encode

        def broken_encode(text, *a, **kw):
            if text == "trigger a bug":
                raise KeyError("a bug in the tokenizer")
            return real_encode(text, *a, **kw)

        tok.encode = broken_encode
        err = _error(httpx.post(server.url + "/v1/completions", json={"prompt": "trigger a bug", "max_tokens": 2}),
                     500)
        assert err["type"] == "internal_server_error" and "KeyError" not in err["message"]
        tok.encode = real_encode

        def broken_step():
            raise RuntimeError("device lost")

        core.step = broken_step
        err = _error(httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                                timeout=60), 503)
        assert "device lost" in err["message"]
        assert httpx.get(server.url + "/health").status_code == 503
        _error(httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}), 503)


def test_async_engine_applies_an_abort_before_its_next_step():
    from sala.engine.requests import Request
    from sala.engine.sampling import SamplingParams
    from sala.serve.async_engine import AsyncEngine

    core = make_core(max_model_len=512, max_num_seqs=2)
    engine = AsyncEngine(core)
    applied: list[int] = []
    real_abort = core.abort

    def recording_abort(request_id):
        applied.append(engine.steps)
        real_abort(request_id)

    core.abort = recording_abort

    async def main():
        engine.start()
        try:
            stream = await engine.add(Request("r1", core.tokenizer.encode("def main():", add_bos=True),
                                              SamplingParams(max_new_tokens=400, ignore_eos=True)))
            seen = 0
            async for _ in engine.outputs(stream):   # leaving the loop aborts the request
                seen += 1
                if seen == 3:
                    at_abort = engine.steps
                    break
            for _ in range(10_000):                  # a hang guard only
                if applied:
                    break
                await asyncio.sleep(0.001)
            return at_abort
        finally:
            engine.shutdown()

    at_abort = asyncio.run(main())
    assert len(applied) == 1 and applied[0] - at_abort <= 1
    s = core.stats()
    assert s["requests_aborted"] == 1 and s["running"] == s["waiting"] == 0
    assert 3 <= s["generation_tokens_total"] <= applied[0]     # no step ran for it after the abort
