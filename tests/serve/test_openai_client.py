"""The official `openai` client against a live `sala serve` (bundled model, CPU, loopback)."""
from __future__ import annotations

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")

from tests.serve.live import MODEL_DIR  # noqa: E402  (after pytest.importorskip)

PROMPT = "def fibonacci(n):\n    "


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def tokenizer(server):
    return server.app.state.engine.tokenizer


def _metrics(server) -> dict[str, float]:
    out = {}
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith("sala_") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_models_health_metrics(server, client):
    assert [m.id for m in client.models.list().data] == ["sala-test"]
    assert httpx.get(server.url + "/health").status_code == 200
    before = _metrics(server)
    r = client.completions.create(model="sala-test", prompt=PROMPT, max_tokens=5, temperature=0,
                                  extra_body={"ignore_eos": True})
    after = _metrics(server)
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    assert delta["sala_generation_tokens_total"] == r.usage.completion_tokens == 5
    assert delta["sala_prompt_tokens_total"] == r.usage.prompt_tokens
    assert delta["sala_time_to_first_token_seconds_count"] == 1
    assert delta["sala_inter_token_latency_seconds_count"] == 4
    assert delta["sala_request_latency_seconds_count"] == 1
    assert after["sala_num_requests_running"] == after["sala_num_requests_waiting"] == 0
    text = httpx.get(server.url + "/metrics").text
    for name in ("sala_num_requests_running", "sala_num_requests_waiting", "sala_prompt_tokens_total",
                 "sala_generation_tokens_total", "sala_cache_pages_used", "sala_prefix_cache_hit_rate",
                 "sala_request_latency_seconds_bucket", "sala_time_to_first_token_seconds_bucket",
                 "sala_inter_token_latency_seconds_bucket"):
        assert name in text, name


def test_completion_usage_and_stream_agree(client, tokenizer):
    r = client.completions.create(model="sala-test", prompt=PROMPT, max_tokens=10, temperature=0)
    choice = r.choices[0]
    n_prompt = len(tokenizer.encode(PROMPT)) + 1            # + BOS
    assert r.object == "text_completion" and choice.finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens == n_prompt
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    if choice.finish_reason == "length":
        assert r.usage.completion_tokens == 10
    assert r.usage.prompt_tokens_details.cached_tokens >= 0
    chunks = list(client.completions.create(model="sala-test", prompt=PROMPT, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason


def test_token_id_prompts_lists_and_n(client, tokenizer):
    ids = tokenizer.encode(PROMPT, add_bos=True)
    by_text = client.completions.create(model="sala-test", prompt=PROMPT, max_tokens=6, temperature=0)
    by_ids = client.completions.create(model="sala-test", prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    many = client.completions.create(model="sala-test", prompt=[PROMPT, "import os\n"], max_tokens=4,
                                     temperature=0, n=2)
    assert sorted(c.index for c in many.choices) == [0, 1, 2, 3]
    texts = {c.index: c.text for c in many.choices}
    assert texts[0] == texts[1] == by_text.choices[0].text[:len(texts[0])]
    assert many.usage.prompt_tokens == len(ids) + len(tokenizer.encode("import os\n")) + 1


def test_stop_strings(client):
    full = client.completions.create(model="sala-test", prompt=PROMPT, max_tokens=16, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert stop.strip(), f"pick a printable stop string from {full!r}"
    cut = client.completions.create(model="sala-test", prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True}).choices[0]
    assert cut.text == full[:full.find(stop)] and cut.finish_reason == "stop"
    streamed = client.completions.create(model="sala-test", prompt=PROMPT, max_tokens=16, temperature=0, stop=stop,
                                         stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed) == cut.text


def test_seeds(client):
    def sample(seed):
        return client.completions.create(model="sala-test", prompt=PROMPT, max_tokens=12, temperature=1.0,
                                         seed=seed, extra_body={"ignore_eos": True}).choices[0].text

    first = sample(1234)
    assert sample(1234) == first
    assert len({first, sample(1), sample(2), sample(3)}) > 1


def test_echo_logprobs_match_the_model(client, tokenizer):
    from sala.engine.loading import load_model_dir

    r = client.completions.create(model="sala-test", prompt=PROMPT, max_tokens=0, echo=True, logprobs=1,
                                  temperature=0)
    lp = r.choices[0].logprobs
    ids = tokenizer.encode(PROMPT, add_bos=True)
    assert r.choices[0].text == PROMPT and r.usage.completion_tokens == 0
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.tokens[0] == "<|bos|>" and lp.text_offset[:2] == [0, 0]       # BOS: shown, no text
    for tok, off in zip(lp.tokens[1:], lp.text_offset[1:]):
        assert r.choices[0].text[off:off + len(tok)] == tok
    model = load_model_dir(MODEL_DIR, device=torch.device("cpu"), dtype=torch.float32)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(float(ref[i - 1, ids[i]]), abs=1e-3)
        assert max(lp.top_logprobs[i].values()) == pytest.approx(float(ref[i - 1].max()), abs=1e-3)
    # generated tokens' logprobs too: the greedy token is the most likely one
    g = client.completions.create(model="sala-test", prompt=PROMPT, max_tokens=3, logprobs=2, temperature=0)
    glp = g.choices[0].logprobs
    assert len(glp.tokens) == g.usage.completion_tokens
    for tok_lp, top in zip(glp.token_logprobs, glp.top_logprobs):
        assert len(top) >= 2 and tok_lp == pytest.approx(max(top.values()))


def test_chat(client):
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Sort a list."}]
    r = client.chat.completions.create(model="sala-test", messages=messages, max_tokens=8, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens > 10 and 1 <= r.usage.completion_tokens <= 8
    chunks = list(client.chat.completions.create(model="sala-test", messages=messages, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == r.usage.total_tokens
    lp = client.chat.completions.create(model="sala-test", messages=messages, max_tokens=3, temperature=0,
                                        logprobs=True, top_logprobs=2)
    content = lp.choices[0].logprobs.content
    assert len(content) == lp.usage.completion_tokens and all(len(c.top_logprobs) == 2 for c in content)
