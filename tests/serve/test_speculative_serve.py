"""`sala serve --speculative ngram` through the openai client on the bundled model: greedy texts equal plain
decoding (concurrent requests, one crossing the dense/sparse threshold of 2048 tokens), the per-response
"speculative" counts and the /metrics counters."""
from __future__ import annotations

import concurrent.futures as cf

import httpx
import pytest

openai = pytest.importorskip("openai")

from sala.engine.requests import Request  # noqa: E402  (after pytest.importorskip)
from sala.engine.sampling import SamplingParams  # noqa: E402  (after pytest.importorskip)
from tests.serve.live import make_core, serving  # noqa: E402  (after pytest.importorskip)

MAX_LEN = 2304
PASSAGE = ("The river keeper opened the gate at dawn, counted the boats, and wrote the number in the ledger. "
           "Then the keeper closed the gate and walked home along the northern bank. ")


def _prompts(tok) -> list[str]:
    long_text = ""
    while len(tok.encode(long_text + PASSAGE, add_bos=True)) < 2010:      # decoding crosses 2048
        long_text += PASSAGE
    return [PASSAGE * 3 + "The river keeper", "def add(a, b):\n    return a + b\n\ndef add(", long_text,
            "Quote the passage: " + PASSAGE + "\nQuote: The river"]


@pytest.fixture(scope="module")
def spec_server():
    with serving(max_model_len=MAX_LEN, max_num_seqs=4, speculative="ngram", num_speculative_tokens=5) as s:
        yield s


@pytest.fixture(scope="module")
def plain_texts(spec_server):
    tok = spec_server.app.state.engine.tokenizer
    core = make_core(max_model_len=MAX_LEN, max_num_seqs=4)
    prompts = _prompts(tok)
    for i, p in enumerate(prompts):
        core.add_request(Request(str(i), tok.encode(p, add_bos=True), SamplingParams(max_new_tokens=48,
                                                                                      ignore_eos=True)))
    texts = {str(i): "" for i in range(len(prompts))}
    for o in core.run_until_done():
        texts[o.request_id] += o.new_text
    return prompts, [texts[str(i)] for i in range(len(prompts))]


def _metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=60).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_concurrent_greedy_completions_equal_plain_decoding(spec_server, plain_texts):
    prompts, plain = plain_texts
    client = openai.OpenAI(base_url=spec_server.url + "/v1", api_key="unused", max_retries=0, timeout=600)
    drafted0 = _metric(spec_server.url, "sala_spec_draft_tokens_total")

    def ask(p: str):
        return client.completions.create(model="sala-test", prompt=p, max_tokens=48, temperature=0,
                                         extra_body={"ignore_eos": True})

    with cf.ThreadPoolExecutor(len(prompts)) as ex:
        resps = list(ex.map(ask, prompts))
    assert [r.choices[0].text for r in resps] == plain
    stats = [r.model_extra["speculative"] for r in resps]
    assert all(s["draft_tokens"] >= s["accepted_tokens"] >= 0 for s in stats)
    assert sum(s["accepted_tokens"] for s in stats) > 0
    drafted = _metric(spec_server.url, "sala_spec_draft_tokens_total") - drafted0
    assert drafted == sum(s["draft_tokens"] for s in stats)
    assert _metric(spec_server.url, "sala_spec_accepted_tokens_total") >= sum(s["accepted_tokens"] for s in stats)


def test_streamed_chat_reports_speculative_counts_with_usage(spec_server):
    r = httpx.post(spec_server.url + "/v1/chat/completions", timeout=600, json={
        "model": "sala-test", "messages": [{"role": "user", "content": PASSAGE * 2}], "max_tokens": 16,
        "temperature": 0, "stream": True, "stream_options": {"include_usage": True}})
    import json

    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    final = events[-1]
    assert final["usage"]["completion_tokens"] >= 1
    assert set(final["speculative"]) >= {"draft_tokens", "accepted_tokens", "acceptance_rate",
                                         "mean_accepted_length"}


def test_serve_flags_reach_the_engine():
    from sala.cli import build_parser
    from sala.commands.serve import engine_kwargs

    args = build_parser().parse_args(["serve", "--speculative", "ngram", "--num-speculative-tokens", "6"])
    kw = engine_kwargs(args)
    assert kw["speculative"] == "ngram" and kw["num_speculative_tokens"] == 6
    assert "speculative" not in engine_kwargs(build_parser().parse_args(["serve"]))
    kw = engine_kwargs(build_parser().parse_args(["serve", "--chunk-size", "512", "--max-tokens-per-step", "256"]))
    assert kw["chunk_size"] == 512 and kw["max_tokens_per_step"] == 256
    assert "chunk_size" not in engine_kwargs(build_parser().parse_args(["serve"]))


def test_serve_refuses_a_non_positive_step_budget(capsys):
    from sala.cli import main

    assert main(["serve", "--max-tokens-per-step", "0"]) == 2
    assert "--max-tokens-per-step must be >= 1, got 0" in capsys.readouterr().err


def test_sala_generate_with_ngram_drafts_prints_the_plain_greedy_text(capsys):
    from sala.cli import main

    prompt = PASSAGE * 2 + "The river keeper"
    outs = []
    for extra in ([], ["--speculative", "ngram", "--num-speculative-tokens", "5", "--stats"]):
        assert main(["generate", "--prompt", prompt, "--max-new-tokens", "24", "--device", "cpu", "--ignore-eos",
                     *extra]) == 0
        cap = capsys.readouterr()
        outs.append(cap.out)
    assert outs[0] == outs[1] and len(outs[0].strip()) > 0
    assert "acceptance" in cap.err
    with pytest.raises(ValueError, match="ngram"):
        main(["generate", "--prompt", "x", "--speculative", "bogus", "--device", "cpu", "--debug"])
