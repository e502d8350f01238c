"""`sala convert` checks what it reuses: a finished conversion with other options is refused, listing them."""
from __future__ import annotations

import json

import pytest
import torch

from sala.cli import main

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SMALL)).save_pretrained(str(path))
    return path


def test_convert_refuses_other_options_and_restart_redoes_it(teacher, tmp_path, capsys):
    out = tmp_path / "sala"
    base = ["convert", "--teacher", str(teacher), "--out", str(out), "--data", "random", "--seq-len", "16",
            "--batch-size", "1", "--stage1-tokens", "16", "--stage2-tokens", "0", "--no-progress",
            "--softmax-layers", "0,3", "--dtype", "float32"]
    assert main(base) == 0
    first = json.loads((out / "config.json").read_text())["mixer_types"]
    capsys.readouterr()
    assert main(base) == 0
    assert "already holds a finished conversion with these options" in capsys.readouterr().out
    changed = [*base[:-4], "--softmax-layers", "none", "--dtype", "float32"]
    assert main(changed) == 2
    err = capsys.readouterr().err
    assert "softmax_layers: '0,3' -> 'none'" in err and "--restart" in err and len(err.strip().splitlines()) == 1
    assert json.loads((out / "config.json").read_text())["mixer_types"] == first     # the old model untouched
    assert main([*changed, "--overwrite"]) == 0
    assert "minicpm4" not in json.loads((out / "config.json").read_text())["mixer_types"]
