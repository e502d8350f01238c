"""`sala serve` as a command (subprocess, bundled model by default) and `sala bench serve`."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from sala.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sala_serve_command_answers_with_the_bundled_model():
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.Popen([sys.executable, "-m", "sala.cli", "serve", "--port", str(port), "--max-model-len",
                             "512", "--max-num-seqs", "2", "--device", "cpu", "--served-model-name", "tiny",
                             "--log-level", "warning"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):                     # hang guard while the model loads
            if proc.poll() is not None:
                pytest.fail(f"sala serve exited: {proc.stdout.read()}")
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "def f(x):", "max_tokens": 4,
                                                      "temperature": 0}, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] >= 1
        assert httpx.get(url + "/v1/models").json()["data"][0]["max_model_len"] == 512
    finally:
        proc.terminate()
        proc.wait(60)


def test_missing_serve_extra_is_one_clear_line(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    assert main(["serve"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "uvicorn" in err and "sala-lm[serve]" in err


def test_bench_serve_document_in_process(tmp_path, capsys):
    out = tmp_path / "doc.json"
    assert main(["bench", "serve", "--model", os.path.join(ROOT, "sala", "assets", "model"), "--scenario",
                 "document", "--doc-len", "330", "--questions", "3", "--question-len", "8", "--output-len", "4",
                 "--compare-no-cache", "--device", "cpu", "--out", str(out), "--plot", "none"]) == 0
    payload = json.loads(out.read_text())
    turns = payload["results"]["turns"]
    assert [t["cached_tokens"] for t in turns] == [0, 320, 320]          # five full 64-token pages of the document
    assert [t["output_tokens"] for t in turns] == [4, 4, 4]
    assert payload["same_answers_as_no_cache"] is True
    assert all(len(a) == 4 for a in payload["results"]["answers"])
    assert payload["results"]["prefix_cache_hit_rate"] == pytest.approx(640 / (3 * 338))
    for key in ("device", "git_commit", "torch", "command"):
        assert key in payload["meta"]


def test_bench_serve_load_against_a_running_server(server, tmp_path):
    out = tmp_path / "load.json"
    vocab = server.app.state.engine.config.vocab_size
    assert main(["bench", "serve", "--url", server.url, "--vocab", str(vocab), "--num-requests", "6",
                 "--concurrency", "3", "--prompt-len", "8:40", "--output-len", "3:6", "--out", str(out),
                 "--plot", str(tmp_path / "load.png")]) == 0
    res = json.loads(out.read_text())["results"]
    assert res["requests"] == 6 and res["failed"] == 0
    shapes = res["per_request"]
    assert all(8 <= r["prompt_tokens"] <= 40 and r["output_tokens"] == r["max_tokens"] for r in shapes)
    assert res["output_tokens"] == sum(r["max_tokens"] for r in shapes)
    assert res["ttft_s"]["count"] == 6 and res["itl_s"]["count"] == res["output_tokens"] - 6
    assert (tmp_path / "load.png").stat().st_size > 0


def test_bench_serve_poisson_arrivals(server, tmp_path):
    out = tmp_path / "rate.json"
    vocab = server.app.state.engine.config.vocab_size
    assert main(["bench", "serve", "--url", server.url, "--vocab", str(vocab), "--num-requests", "5", "--rate", "20",
                 "--prompt-len", "16", "--output-len", "4", "--seed", "3", "--out", str(out), "--plot", "none"]) == 0
    res = json.loads(out.read_text())["results"]
    starts = [r["start_s"] for r in res["per_request"]]
    assert res["failed"] == 0 and res["output_tokens"] == 20
    assert starts == sorted(starts) and starts[-1] > starts[0]           # arrivals spread out in order
    with pytest.raises(SystemExit):                                      # --url or --model is required
        main(["bench", "serve"])
    assert main(["bench", "serve", "--url", server.url, "--rate", "0", "--vocab", "100", "--out", str(out)]) == 2
