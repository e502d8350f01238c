"""`sala serve --replicas` on a local Ray cluster: two CPU replicas of the bundled model behind one endpoint.

One Ray cluster for the module (2 CPUs: one per replica; the ingress and the offline workers reserve none); the
offline batch runs first, Serve's application after it.
Waits are bounded loops of short polls, never fixed sleeps.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import time

import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from sala.utils.bundled import BUNDLED_MODEL_DIR  # noqa: E402  (after pytest.importorskip)

MODEL = str(BUNDLED_MODEL_DIR)
NAME = os.path.basename(MODEL.rstrip("/"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(cond, what: str, polls: int = 600, step_s: float = 0.25):
    """Poll `cond()` up to `polls` times (a bound on the loop, not a latency budget)."""
    for _ in range(polls):
        value = cond()
        if value:
            return value
        time.sleep(step_s)
    raise AssertionError(f"{what}: not reached after {polls} polls")


@pytest.fixture(scope="module")
def ray_cluster():
    """The module's local Ray (the offline batch runs on it before Serve starts, without Serve's polling beside
    it); shutting it down stops everything started on it, Serve's actors included (no graceful drain)."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def cluster(ray_cluster):
    from sala.serve.replicas import APP_NAME, build

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build(MODEL, replicas=2, replica_cpus=1, replica_gpus=0, poll_s=0.25, health_check_period_s=1.0,
                health_check_timeout_s=10.0, max_inflight=8)
    serve.run(app, name=APP_NAME, route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    ingress = serve.get_deployment_handle("SalaIngress", app_name=APP_NAME)
    replicas = [serve.get_deployment_handle(f"SalaReplica{i}", app_name=APP_NAME) for i in range(2)]
    yield {"url": url, "ingress": ingress, "replicas": replicas,
           "client": openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)}


def _state(cluster) -> dict:
    return cluster["ingress"].router_state.remote().result()


def test_offline_batch_over_two_replicas_is_resumable(ray_cluster, tmp_path):
    """Resumable both ways: after lines written by the single-process `run_jsonl`, the replicas generate only the
    rest (in input order, over both replicas); a re-run over what the replicas wrote generates nothing."""
    from sala.engine.llm import LLM, run_jsonl
    from sala.engine.sampling import SamplingParams
    from sala.serve.offline_replicas import run_jsonl_replicas

    inp, out = tmp_path / "prompts.jsonl", tmp_path / "results.jsonl"
    prompts = [{"id": f"p{i}", "prompt": f"Item {i}: a short prompt"} for i in range(6)]
    inp.write_text("".join(json.dumps(p) + "\n" for p in prompts[:2]))
    assert run_jsonl(LLM(MODEL, device="cpu"), inp, out, SamplingParams(max_new_tokens=3), progress=False) == 2
    first = [json.loads(ln) for ln in out.read_text().splitlines()]
    # more prompts: the replicas keep what was written and generate only the new ones (4 prompts over 2 replicas:
    # chunks of one prompt, two per replica, written in input order whichever finishes first)
    inp.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    kw = {"replicas": 2, "replica_cpus": 0, "replica_gpus": 0, "progress": False}
    assert run_jsonl_replicas(MODEL, inp, out, SamplingParams(max_new_tokens=3), **kw) == 4
    lines = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert lines[:2] == first and [r["id"] for r in lines] == [p["id"] for p in prompts]
    assert all(r["completion_tokens"] == 3 and r["prompt"] == p["prompt"] for r, p in zip(lines, prompts))
    assert set(lines[2]) == set(first[0])                       # the same fields as `run_jsonl` writes
    assert run_jsonl_replicas(MODEL, inp, out, SamplingParams(max_new_tokens=3), **kw) == 0


def test_openai_client_completions_chat_and_streaming(cluster):
    client = cluster["client"]
    assert [m.id for m in client.models.list().data] == [NAME]
    full = client.completions.create(model=NAME, prompt="The capital of France is", max_tokens=6, temperature=0)
    assert full.usage.completion_tokens == 6 and full.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(model=NAME, prompt="The capital of France is", max_tokens=6,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi there"}],
                                          max_tokens=5, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 5
    # the same errors as the single-process server
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="context_length_exceeded|length"):
        client.completions.create(model=NAME, prompt=[5] * 100_000, max_tokens=2)


def test_multi_turn_conversation_stays_on_one_replica_and_hits_its_cache(cluster):
    client = cluster["client"]
    doc = " ".join(f"Paragraph {i}: the river crosses the valley near the old mill." for i in range(40))
    messages = [{"role": "user", "content": doc + "\nWhere does the river cross?"}]
    before = _state(cluster)
    first = client.chat.completions.create(model=NAME, messages=messages, max_tokens=6, temperature=0)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And what is near it?"}]
    follow = []
    for _ in range(2):
        follow.append(client.chat.completions.create(model=NAME, messages=messages, max_tokens=6, temperature=0))
    after = _state(cluster)
    assert after["routed"]["affinity"] - before["routed"]["affinity"] == 2       # both follow-ups by affinity
    assert first.usage.prompt_tokens > 256
    for r in follow:
        assert r.usage.prompt_tokens_details.cached_tokens >= 256                 # the document's pages reused
    assert follow[0].choices[0].message.content == follow[1].choices[0].message.content
    metrics = httpx.get(cluster["url"] + "/metrics").text
    line = next(ln for ln in metrics.splitlines() if ln.startswith('sala_router_requests_total{reason="affinity"}'))
    assert float(line.split()[-1]) >= 2


def test_killed_replica_endpoint_keeps_answering_and_replica_restarts(cluster):
    client = cluster["client"]
    # a long streamed request; once its first tokens arrived, kill the process of the replica serving it
    stream = iter(client.completions.create(model=NAME, prompt="Tell me a very long story:", max_tokens=4000,
                                            temperature=0, stream=True, extra_body={"ignore_eos": True}))
    assert next(stream).choices[0].text is not None
    inflight = _state(cluster)["inflight"]
    assert sorted(inflight) == [0, 1]
    index = inflight.index(1)
    victim = cluster["replicas"][index]
    old_pid = victim.pid.remote().result()
    os.kill(old_pid, signal.SIGKILL)
    # tokens were sent: the stream ends with a clear retryable error event (no hang, bounded by max_tokens)
    with pytest.raises(openai.APIError, match="retry"):
        for _ in stream:
            pass
    assert _state(cluster)["failures"] >= 1
    # the endpoint answers at once (requests routed to the dead replica are resubmitted to the other one)
    for i in range(4):
        r = client.completions.create(model=NAME, prompt=f"Request {i} after the failure:", max_tokens=3,
                                      temperature=0)
        assert r.usage.completion_tokens == 3

    def restarted():
        status = serve.status().applications["sala"]
        if status.status != "RUNNING" or status.deployments[f"SalaReplica{index}"].status != "HEALTHY":
            return None
        try:
            pid = victim.pid.remote().result(timeout_s=5)
        except Exception:  # noqa: BLE001 - still restarting
            return None
        return pid if pid != old_pid else None

    new_pid = _wait(restarted, f"replica {index} restarted by Ray Serve")
    assert new_pid != old_pid
    _wait(lambda: not _state(cluster)["down"], "the ingress sees every replica up again")
    # the restarted replica (a fresh process: its counters start at 0) takes its share of new prompts
    for i in range(4):
        r = client.completions.create(model=NAME, prompt=f"Fresh prompt number {i} here", max_tokens=2,
                                      temperature=0)
        assert r.usage.completion_tokens == 2
    assert victim.stats.remote().result()["requests_finished"] >= 1


def test_config_file_and_cli_arguments(capsys):
    import yaml

    from sala.cli import main
    from sala.serve.replicas import build_app

    with open(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "serve", "ray_serve.yaml")) as f:
        app_cfg = yaml.safe_load(f)["applications"][0]
    assert app_cfg["import_path"] == "sala.serve.replicas:build_app"
    args = dict(app_cfg["args"], model=MODEL)
    assert type(build_app(args)).__name__ == "Application"          # every documented key is accepted
    with pytest.raises(ValueError, match=r"unknown sala.serve.replicas:build_app arguments \['bogus'\]"):
        build_app({"bogus": 1})
    assert main(["serve", "--replicas", "-1"]) == 2
    assert "--replicas must be >= 1, got -1" in capsys.readouterr().err
    assert main(["serve", "--replicas", "2", "--device", "cpu"]) == 2
    assert "--device does not go with --replicas" in capsys.readouterr().err
    assert main(["generate", "--prompt", "x", "--replicas", "2"]) == 2
    assert "--replicas goes with --input and --output" in capsys.readouterr().err
