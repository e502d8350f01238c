"""`sala serve --engine-process`: the EngineCore in a child process (ProcessEngine) behind the same app.

One process-engine server per module (each child imports torch and loads the bundled model); the thread engine's
server (`server`, conftest) is the reference: at temperature 0 both must give the same tokens.
"""
from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import signal
import time

import httpx
import pytest

openai = pytest.importorskip("openai")

from tests.serve.live import MODEL_DIR, serving_process, stream_then_leave  # noqa: E402  (after pytest.importorskip)

PROMPTS = ["def fibonacci(n):\n    ", "import os\nimport sys\n\n", "# sort a list of numbers\n",
           "class Stack:\n    def __init__(self):\n"]
CHATS = [[{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Sort a list."}],
         [{"role": "user", "content": "Reverse a string in Python."}]]


@pytest.fixture(scope="module")
def proc_server():
    with serving_process() as s:
        yield s


def _metrics(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("sala_") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _engine_children() -> set[int]:
    """The pids of this process's engine children (the module's server has one)."""
    return {p.pid for p in multiprocessing.active_children() if p.name == "sala-engine"}


async def _run_all(url: str) -> list:
    """Completions and chats, streamed and not, all at once (several concurrent clients); their tokens."""
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
    common = {"model": "sala-test", "temperature": 0, "extra_body": {"ignore_eos": True}}

    async def completion(prompt: str, stream: bool):
        kw = dict(common, prompt=prompt, max_tokens=12, logprobs=1)
        if not stream:
            r = await client.completions.create(**kw)
            c = r.choices[0]
            return ("completion", c.text, c.logprobs.tokens, c.logprobs.token_logprobs, c.finish_reason,
                    r.usage.completion_tokens)
        text, tokens, lps, finish, n = "", [], [], None, None
        async for chunk in await client.completions.create(**kw, stream=True,
                                                            stream_options={"include_usage": True}):
            if chunk.usage is not None:
                n = chunk.usage.completion_tokens
            for c in chunk.choices:
                text += c.text
                if c.logprobs is not None:
                    tokens += c.logprobs.tokens
                    lps += c.logprobs.token_logprobs
                finish = c.finish_reason or finish
        return "completion", text, tokens, lps, finish, n

    async def chat(messages: list, stream: bool):
        kw = dict(common, messages=messages, max_tokens=10, logprobs=True, top_logprobs=1)
        if not stream:
            r = await client.chat.completions.create(**kw)
            c = r.choices[0]
            return ("chat", c.message.content, [t.token for t in c.logprobs.content],
                    [t.logprob for t in c.logprobs.content], c.finish_reason, r.usage.completion_tokens)
        text, tokens, lps, finish, n = "", [], [], None, None
        async for chunk in await client.chat.completions.create(**kw, stream=True,
                                                                stream_options={"include_usage": True}):
            if chunk.usage is not None:
                n = chunk.usage.completion_tokens
            for c in chunk.choices:
                text += c.delta.content or ""
                if c.logprobs is not None and c.logprobs.content:
                    tokens += [t.token for t in c.logprobs.content]
                    lps += [t.logprob for t in c.logprobs.content]
                finish = c.finish_reason or finish
        return "chat", text, tokens, lps, finish, n

    try:
        jobs = [completion(p, s) for p in PROMPTS for s in (False, True)]
        jobs += [chat(m, s) for m in CHATS for s in (False, True)]
        return await asyncio.gather(*jobs)
    finally:
        await client.close()


def test_same_tokens_as_the_thread_engine(server, proc_server):
    engine = proc_server.app.state.engine
    assert engine.pid != os.getpid() and engine.process.is_alive() and engine.is_running
    assert engine.max_model_len == server.app.state.engine.max_model_len
    assert engine.config.vocab_size == server.app.state.engine.config.vocab_size
    threaded = asyncio.run(_run_all(server.url))
    separate = asyncio.run(_run_all(proc_server.url))
    for a, b in zip(threaded, separate):
        kind, text, tokens, lps, finish, n = b
        assert (kind, text, tokens, finish, n) == a[:3] + a[4:]
        assert len(tokens) == n == (12 if kind == "completion" else 10) and finish == "length"
        assert lps == pytest.approx(a[3], abs=1e-4)
    # the streamed answers equal the non-streamed ones (pairs: not streamed, streamed)
    for plain, streamed in zip(separate[0::2], separate[1::2]):
        assert plain[:3] == streamed[:3]
    s = engine.stats()
    assert s["running"] == s["waiting"] == 0 and s["requests_finished"] >= len(separate)
    assert engine.steps > 0


def test_refusals_are_the_engines_exceptions_and_messages(server, proc_server):
    from sala.engine.requests import Request, RequestError
    from sala.engine.sampling import SamplingParams

    def refusal(engine) -> str:
        req = Request("too-long", list(range(5, 5 + 1500)), SamplingParams(max_new_tokens=4))
        with pytest.raises(RequestError) as e:
            asyncio.run(engine.add(req))
        return str(e.value)

    in_thread, in_child = refusal(server.app.state.engine), refusal(proc_server.app.state.engine)
    assert in_child == in_thread and "1504" in in_child and "1024" in in_child
    # over HTTP: a prompt longer than the model length is a 400 with both numbers
    r = httpx.post(proc_server.url + "/v1/completions", timeout=60,
                   json={"model": "sala-test", "prompt": list(range(5, 5 + 1100)), "max_tokens": 2})
    assert r.status_code == 400, r.text
    assert "1100" in r.json()["error"]["message"] and "1024" in r.json()["error"]["message"]
    assert proc_server.app.state.engine.is_running


def test_disconnect_mid_stream_frees_the_sequence(proc_server):
    engine = proc_server.app.state.engine
    before = engine.stats()
    body = {"model": "sala-test", "prompt": "def main():\n", "max_tokens": 400, "temperature": 0, "stream": True,
            "ignore_eos": True}
    stream_then_leave(proc_server.url, body)
    steps_at_close = engine.steps
    for _ in range(10_000):                      # a hang guard only: the bound that matters is in steps
        m = _metrics(proc_server.url)
        if not (m["sala_num_requests_running"] or m["sala_num_requests_waiting"] or m["sala_cache_pages_used"]):
            break
        # the server notices the closed socket, the abort crosses the pipe and applies before the child's next step
        assert engine.steps - steps_at_close <= 8, "the aborted request kept running"
        time.sleep(0.01)
    s = engine.stats()
    assert s["running"] == s["prefilling"] == s["waiting"] == s["cache_pages_used"] == 0
    assert s["requests_aborted"] == before["requests_aborted"] + 1
    assert s["generation_tokens_total"] - before["generation_tokens_total"] < 400
    assert httpx.get(proc_server.url + "/health").status_code == 200


def test_full_queue_503_and_a_clean_exit():
    with serving_process(max_model_len=1024, max_num_seqs=2, max_waiting=0) as s:
        engine = s.app.state.engine
        pid = engine.pid
        body = {"model": "sala-test", "prompt": "hi", "max_tokens": 2}
        r = httpx.post(s.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["message"] == ("the waiting queue is full (0 requests waiting, max_waiting 0); "
                                                "retry later")
        assert r.json()["error"]["code"] == "queue_full"
        assert httpx.get(s.url + "/health").status_code == 200
        assert _pid_exists(pid)
    assert engine.process is None and engine.exitcode == 0          # it left on the stop message
    assert not _pid_exists(pid) and pid not in _engine_children()
    assert not engine.is_running


def test_a_dead_engine_process_fails_its_requests_and_the_server_answers_503():
    with serving_process(max_model_len=512, max_num_seqs=2) as s:
        engine = s.app.state.engine
        pid = engine.pid
        body = {"model": "sala-test", "prompt": "def main():\n", "max_tokens": 300, "temperature": 0,
                "stream": True, "ignore_eos": True}
        with httpx.Client(base_url=s.url, timeout=120) as client:
            with client.stream("POST", "/v1/completions", json=body) as r:
                lines = r.iter_lines()
                seen = 0
                for line in lines:
                    if line.startswith("data: {"):
                        seen += 1
                        if seen == 2:
                            os.kill(pid, signal.SIGKILL)
                            break
                rest = list(lines)
        errors = [json.loads(line[6:])["error"] for line in rest if line.startswith('data: {"error"')]
        assert len(errors) == 1 and "exited unexpectedly" in errors[0]["message"], rest
        assert [line for line in rest if line][-1] == "data: [DONE]"
        assert engine.dead is not None and not engine.is_running
        health = httpx.get(s.url + "/health")
        assert health.status_code == 503 and "exited unexpectedly" in health.json()["error"]["message"]
        r = httpx.post(s.url + "/v1/completions", json={"model": "sala-test", "prompt": "hi", "max_tokens": 2},
                       timeout=60)
        assert r.status_code == 503 and "not running" in r.json()["error"]["message"]
    assert engine.process is None and not _pid_exists(pid) and pid not in _engine_children()


def test_a_child_that_fails_at_startup_raises_its_error():
    from sala.serve.engine_process import EngineProcessError
    from sala.serve.server import create_app

    before = _engine_children()
    with pytest.raises(EngineProcessError, match="failed to start: FileNotFoundError: .*neither a model directory"):
        create_app(os.path.join(MODEL_DIR, "no-such-model"), engine_process=True, engine_kwargs={"device": "cpu"})
    assert _engine_children() == before
    with pytest.raises(ValueError, match="not core"):
        create_app(MODEL_DIR, engine_process=True, core=object())


def test_the_serve_flag_reaches_create_app(monkeypatch, capsys):
    import uvicorn

    import sala.serve.server as server_module
    from sala.cli import main

    seen: dict = {}
    monkeypatch.setattr(server_module, "create_app", lambda model, **kw: seen.update(kw) or "app")
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(served=app))
    assert main(["serve", "--engine-process", "--device", "cpu", "--log-level", "warning"]) == 0
    assert seen["engine_process"] is True and seen["served"] == "app"
    seen.clear()
    assert main(["serve", "--device", "cpu", "--log-level", "warning"]) == 0
    assert seen["engine_process"] is False                  # the default on the CPU: the engine thread
    seen.clear()
    assert main(["serve", "--device", "cuda", "--log-level", "warning"]) == 0
    assert seen["engine_process"] is True                   # the default on a GPU: the engine process
    seen.clear()
    assert main(["serve", "--device", "cuda", "--no-engine-process", "--log-level", "warning"]) == 0
    assert seen["engine_process"] is False
    capsys.readouterr()
    assert main(["serve", "--engine-process", "--replicas", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--engine-process" in err and "--replicas" in err


def test_bench_serve_passes_the_flag_to_its_in_process_server(monkeypatch, tmp_path):
    import contextlib
    import types

    import sala.bench.serve as bench
    from sala.cli import main

    started: list[dict] = []

    @contextlib.contextmanager
    def fake_server(core, name, **kw):                  # what `sala bench serve --model` would serve
        started.append({"core": core, "name": name, **kw})
        engine = types.SimpleNamespace(stats=lambda: {"requests_finished": 3})
        yield types.SimpleNamespace(url="http://127.0.0.1:9", app=types.SimpleNamespace(
            state=types.SimpleNamespace(engine=engine)))

    monkeypatch.setattr(bench, "in_process_server", fake_server)
    monkeypatch.setattr(bench, "_measure_in_child", lambda url, args, vocab: {"turns": [], "answers": []})
    out = tmp_path / "b.json"
    assert main(["bench", "serve", "--model", MODEL_DIR, "--scenario", "document", "--doc-len", "100",
                 "--questions", "1", "--output-len", "2", "--device", "cpu", "--engine-process", "--out", str(out),
                 "--plot", "none"]) == 0
    [run] = started
    assert run["core"] is None and run["engine_process"] is True and run["name"] == MODEL_DIR
    assert run["engine_kwargs"]["device"] == "cpu" and run["engine_kwargs"]["max_model_len"] >= 100
    payload = json.loads(out.read_text())
    assert payload["setup"]["engine_process"] is True and payload["engine"] == {"requests_finished": 3}


class _FakeCore:
    """Just enough of EngineCore for the child's step loop: its second step raises."""

    def __init__(self) -> None:
        self.queued: list[str] = []
        self.aborted: list[str] = []
        self.steps = 0

    def add_request(self, request) -> None:
        from sala.engine.requests import QueueFullError, RequestError

        if request == "too long":
            raise RequestError("the prompt is too long")
        if request == "one too many":
            raise QueueFullError("the waiting queue is full")
        self.queued.append(request)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.queued)

    def stats(self) -> dict:
        return {"waiting": len(self.queued), "steps": self.steps}

    def step(self) -> list:
        import types

        self.steps += 1
        if self.steps == 2:
            raise RuntimeError("device lost")
        return [types.SimpleNamespace(request_id=r, finished=False) for r in self.queued]


def test_the_child_loop_sends_verdicts_then_one_message_per_step_and_reports_a_failed_step():
    from sala.serve.engine_process import _step_loop

    inbox_r, inbox_w = multiprocessing.Pipe(duplex=False)
    out_r, out_w = multiprocessing.Pipe(duplex=False)
    for msg in [("add", 0, "a"), ("add", 1, "too long"), ("add", 2, "one too many"), ("abort", "x")]:
        inbox_w.send(msg)
    core = _FakeCore()
    _step_loop(core, inbox_r, out_w, stats_interval_s=0.0)     # returns after the failed step
    messages = []
    while out_r.poll(0):
        messages.append(out_r.recv())
    assert messages[0] == ("admitted", [(0, None), (1, ("request", "the prompt is too long")),
                                        (2, ("queue_full", "the waiting queue is full"))])
    kind, steps, outputs, stats = messages[1]
    assert (kind, steps, [o.request_id for o in outputs], stats) == ("step", 1, ["a"], {"waiting": 1, "steps": 1})
    assert messages[2] == ("dead", "engine step failed: device lost") and len(messages) == 3
    assert core.aborted == ["x"]


def test_the_parent_fails_waiting_requests_when_the_child_reports_a_dead_engine():
    import concurrent.futures

    from sala.serve.async_engine import RequestStream
    from sala.serve.engine_process import EngineProcessError, ProcessEngine

    engine = ProcessEngine("unused", start=False)
    from_child, child_out = multiprocessing.Pipe(duplex=False)
    engine._closed = False
    loop = asyncio.new_event_loop()
    try:
        stream = RequestStream("a")
        engine._streams["a"] = (stream, loop)
        admitted: concurrent.futures.Future = concurrent.futures.Future()
        engine._pending[7] = admitted
        child_out.send(("step", 3, [], {"running": 1}))
        child_out.send(("dead", "engine step failed: device lost"))
        child_out.close()
        engine._read(from_child, proc=None)              # returns at EOF
        assert isinstance(engine.dead, EngineProcessError) and str(engine.dead) == "engine step failed: device lost"
        assert engine.steps == 3 and engine.stats() == {"running": 1} and not engine.is_running
        assert str(admitted.exception()) == "engine step failed: device lost"
        loop.run_until_complete(asyncio.sleep(0))
        error = stream.queue.get_nowait()
        assert isinstance(error, RuntimeError) and "device lost" in str(error)
    finally:
        loop.close()
