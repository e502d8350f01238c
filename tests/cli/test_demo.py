"""`sala demo`: runs end to end on the CPU (random-weights fallback and an explicit model folder)."""
from __future__ import annotations

import torch

from sala.cli import main as cli_main
from sala.modeling.configuration_sala import SalaConfig
from sala.modeling.modeling_sala import SalaForCausalLM


def test_demo_runs_with_a_model_folder(tmp_path, capsys):
    from sala.modeling.tokenizer import load_tokenizer

    tok = load_tokenizer(None)
    torch.manual_seed(0)
    cfg = SalaConfig.from_preset("sala-tiny", vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                                 eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    SalaForCausalLM(cfg).save_pretrained(str(tmp_path))
    assert cli_main(["demo", "--model", str(tmp_path), "--length", "300"]) == 0
    out = capsys.readouterr().out
    assert "gold answer:" in out and "answer:" in out
    assert "SALA (2 sparse + 2 lightning layers)" in out
    assert "dense stand-in" in out and "prefill" in out


def test_demo_rejects_bad_arguments(tmp_path, capsys):
    assert cli_main(["demo", "--model", str(tmp_path), "--length", "300"]) == 2
    assert "no config.json" in capsys.readouterr().err
