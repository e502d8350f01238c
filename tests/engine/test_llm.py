"""LLM (offline batches through EngineCore) and `sala generate --input/--output` on the bundled model, CPU."""
from __future__ import annotations

import json

import pytest
import torch

from sala.cli import main
from sala.engine import SalaEngine, SamplingParams
from sala.engine.llm import LLM, run_jsonl
from sala.utils.bundled import bundled_model_dir

MODEL = bundled_model_dir()
pytestmark = pytest.mark.skipif(MODEL is None, reason="no bundled model in this installation")

PROMPTS = ["Once upon a time", "The capital of France is", "def add(a, b):", "Hello"]


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    return SalaEngine.from_pretrained(MODEL, device="cpu")


@pytest.fixture(scope="module")
def llm(engine):
    return LLM(engine.model, engine.tokenizer, max_num_seqs=3, max_model_len=128, chunk_size=64)


def test_generate_matches_the_engine_alone_in_prompt_order(engine, llm, capsys):
    sp = SamplingParams(max_new_tokens=5)
    got = llm.generate(PROMPTS + [[1, 50, 60, 70]], sp, progress=True)
    err = capsys.readouterr().err
    assert "5/5" in err                                               # the progress bar, on stderr
    for p, r in zip(PROMPTS + [[1, 50, 60, 70]], got):
        alone = engine.generate([p], sp, add_bos=isinstance(p, str))[0]
        assert r.token_ids == alone.token_ids and r.text == alone.text
        assert r.prompt_tokens == alone.prompt_tokens and r.finish_reason in ("stop", "length")
    # one SamplingParams per prompt
    per = llm.generate(PROMPTS[:2], [SamplingParams(max_new_tokens=2, ignore_eos=True),
                                     SamplingParams(max_new_tokens=4, ignore_eos=True)], progress=False)
    assert [len(r.token_ids) for r in per] == [2, 4]
    with pytest.raises(ValueError, match="2 SamplingParams for 3 prompts"):
        llm.generate(PROMPTS[:3], [SamplingParams()] * 2, progress=False)


def test_jsonl_in_order_resumable(engine, llm, tmp_path):
    inp, out = tmp_path / "prompts.jsonl", tmp_path / "results.jsonl"
    rows = [{"prompt": PROMPTS[0]}, {"id": "b", "prompt": PROMPTS[1], "max_tokens": 2},
            {"prompt": PROMPTS[2], "temperature": 0.0}, {"id": "d", "prompt": [1, 50, 60, 70]}]
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = SamplingParams(max_new_tokens=4, ignore_eos=True)
    assert run_jsonl(llm, inp, out, base, progress=False) == 4
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["id"] for x in lines] == [0, "b", 2, "d"]
    assert [x["completion_tokens"] for x in lines] == [4, 2, 4, 4]
    assert lines[0]["text"] == engine.generate(PROMPTS[0], base)[0].text
    # An interrupted run: two whole lines and a torn one. The re-run keeps them and writes only the rest.
    full = out.read_text().splitlines(keepends=True)
    out.write_text(full[0] + full[1] + full[2][:10])
    assert run_jsonl(llm, inp, out, base, progress=False) == 2
    assert out.read_text() == "".join(full)
    assert run_jsonl(llm, inp, out, base, progress=False) == 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*\"prompt\""):
        run_jsonl(llm, bad, tmp_path / "o.jsonl", base, progress=False)
    bad.write_text('{"prompt": "a", "temperature": -1}\n')
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        run_jsonl(llm, bad, tmp_path / "o.jsonl", base, progress=False)


def test_sala_generate_input_output(tmp_path, capsys):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(json.dumps({"prompt": "Hello there"}) + "\n" + json.dumps({"prompt": "Once"}) + "\n")
    rc = main(["generate", "--input", str(inp), "--output", str(out), "--max-new-tokens", "3", "--ignore-eos",
               "--device", "cpu"])
    assert rc == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["id"] for x in lines] == [0, 1] and all(x["completion_tokens"] == 3 for x in lines)
    assert main(["generate", "--input", str(inp), "--device", "cpu"]) != 0
    assert "--input and --output go together" in capsys.readouterr().err


def test_a_prompt_that_never_fits_is_refused_before_anything_runs(llm):
    from sala.engine.requests import RequestError

    before = llm.engine.stats()["prompt_tokens_total"]
    with pytest.raises(RequestError, match=r"\(130 tokens\) plus max_new_tokens \(4\) is 134 .* 128"):
        llm.generate(["Hello", [5] * 130], SamplingParams(max_new_tokens=4), progress=False)
    assert not llm.engine.has_unfinished() and llm.engine.stats()["prompt_tokens_total"] == before
