"""`sala generate` and `sala info` through sala.cli.main on a tiny random model saved with a trained BPE."""
from __future__ import annotations

import json

import pytest
import torch

from sala.cli import main
from sala.commands.generate import BUNDLED_MODEL
from sala.engine import SalaEngine, SamplingParams
from sala.modeling import SalaConfig, SalaForCausalLM
from sala.modeling.tokenizer import train_bpe

TEXTS = ["the quick brown fox jumps over the lazy dog", "a long context model reads whole books",
         "sparse and linear attention layers", "hello world, hello sala"] * 20


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_model")
    tok = train_bpe(TEXTS, vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    cfg = SalaConfig.from_preset("sala-tiny", bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                                 pad_token_id=tok.pad_id)
    SalaForCausalLM(cfg).save_pretrained(folder)
    tok.save(folder)
    return folder


def test_generate_streams_the_engines_text(model_dir, capsys):
    rc = main(["generate", "--model", str(model_dir), "--prompt", "hello world", "--max-new-tokens", "12",
               "--device", "cpu", "--ignore-eos", "--stats"])
    assert rc == 0
    out = capsys.readouterr()
    expected = SalaEngine.from_pretrained(model_dir, device="cpu").generate(
        "hello world", SamplingParams(max_new_tokens=12, ignore_eos=True))[0]
    assert len(expected.token_ids) == 12
    assert out.out == expected.text + "\n"
    assert "TTFT" in out.err and "generated 12" in out.err


def test_generate_stop_string_cuts_the_output(model_dir, capsys):
    engine = SalaEngine.from_pretrained(model_dir, device="cpu")
    full = engine.generate("the quick", SamplingParams(max_new_tokens=16, ignore_eos=True))[0].text
    stop = full.strip()[2:4] if len(full.strip()) >= 4 else full.strip()[:1]
    assert stop
    rc = main(["generate", "--model", str(model_dir), "--prompt", "the quick", "--max-new-tokens", "16",
               "--device", "cpu", "--ignore-eos", "--stop", stop])
    assert rc == 0
    out = capsys.readouterr().out
    assert out == full[:full.find(stop)] + "\n"


def test_generate_prompt_file_and_sampling_options(model_dir, tmp_path, capsys):
    f = tmp_path / "prompt.txt"
    f.write_text("sparse and linear")
    args = ["generate", "--model", str(model_dir), "--prompt-file", str(f), "--max-new-tokens", "6", "--device",
            "cpu", "--temperature", "0.9", "--top-p", "0.8", "--top-k", "20", "--seed", "3", "--chunk-size", "2"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first          # seeded sampling is reproducible


def test_generate_errors_are_clear(model_dir, tmp_path, capsys):
    assert main(["generate", "--preset", "sala-tiny", "--prompt", "x"]) == 2
    assert "--random-weights" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path), "--prompt", "x"]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["generate", "--model", str(model_dir), "--prompt-file", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err
    if not (BUNDLED_MODEL / "config.json").exists():
        assert main(["generate", "--prompt", "x"]) == 2
        assert "pass --model" in capsys.readouterr().err


def test_generate_preset_with_random_weights(capsys):
    rc = main(["generate", "--preset", "sala-small", "--random-weights", "--prompt", "hi", "--max-new-tokens", "3",
               "--device", "cpu", "--ignore-eos", "--stats"])
    assert rc == 0
    assert "generated 3" in capsys.readouterr().err
    # the shipped tokenizer does not fit sala-tiny's 512-token vocabulary: a clear refusal
    assert main(["generate", "--preset", "sala-tiny", "--random-weights", "--prompt", "hi", "--device", "cpu"]) == 2
    assert "vocabulary (512)" in capsys.readouterr().err


def test_info_prints_parameters_and_plan(model_dir, capsys):
    assert main(["info", "minicpm-sala-9b", "--context", "1M"]) == 0
    out = capsys.readouterr().out
    assert "9,477,203,968" in out and "sparse KV cache" in out and "8.00 GiB" in out and "17.65 GiB" in out
    assert main(["info", str(model_dir), "--context", "4K", "--batch", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["plan"]["batch"] == 2 and data["plan"]["context"] == 4096
    assert data["plan"]["sparse_kv"] == 2 * 2 * 2 * 2 * 16 * 2 * 4096      # 2 layers, k+v, batch 2, 2 heads, d 16
    assert main(["info", "no-such-model"]) == 2
    assert "neither a model directory nor a preset" in capsys.readouterr().err
