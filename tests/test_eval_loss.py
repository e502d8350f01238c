"""`sala eval loss`: held-out LM loss of several models on the same windows (CPU)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sala.cli import main
from sala.eval.heldout import heldout_windows, model_heldout_loss, windows_of
from sala.modeling import SalaConfig, SalaForCausalLM


@pytest.fixture(scope="module")
def packed(tmp_path_factory, prepare_in):
    root = tmp_path_factory.mktemp("evalloss")
    (root / "docs").mkdir()
    for i in range(30):
        (root / "docs" / f"d{i}.txt").write_text(" ".join(f"word{j % 17} value{(i * j) % 11}" for j in range(200))
                                                 + "\n")
    prepare_in(root, "packed", ["docs"], val_fraction=0.2, seed=0)
    return root / "packed"


def _model(tmp_path, name, vocab, seed):
    torch.manual_seed(seed)
    m = SalaForCausalLM(SalaConfig.from_preset("sala-tiny", vocab_size=vocab)).eval()
    m.save_pretrained(tmp_path / name)
    return m, str(tmp_path / name)


def test_windows_are_evenly_spaced_and_refuse_short_splits():
    toks = np.arange(1000)
    w = windows_of(toks, 4, 100)
    assert w.shape == (4, 100) and w[1, 0].item() == 250 and w[3, 99].item() == 849
    with pytest.raises(ValueError, match="fewer than seq_len=2000"):
        windows_of(toks, 4, 2000)


def test_cli_reports_each_models_loss_on_the_same_windows(packed, tmp_path):
    a, pa = _model(tmp_path, "a", 8192, 0)
    b, pb = _model(tmp_path, "b", 8192, 1)
    out = tmp_path / "loss.json"
    assert main(["eval", "loss", "--data", str(packed), "--model", pa, "--model", pb, "--seq-len", "64",
                 "--windows", "5", "--dtype", "fp32", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    w = heldout_windows(packed, 5, 64)
    assert rep["windows"] == len(w) and rep["seq_len"] == 64
    for model, path in ((a, pa), (b, pb)):
        with torch.no_grad():
            logits = model(input_ids=w, use_cache=False).logits[:, :-1]
        ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1)).item()
        assert rep["losses"][path] == pytest.approx(ref, rel=1e-4)
    assert rep["losses"][pa] != rep["losses"][pb]


def test_vocabulary_mismatch_is_a_clear_error(packed, tmp_path, capsys):
    small, path = _model(tmp_path, "small", 64, 0)
    w = heldout_windows(packed, 3, 64)
    with pytest.raises(ValueError, match="vocabulary has 64 tokens"):
        model_heldout_loss(small, w)
    assert main(["eval", "loss", "--data", str(packed), "--model", path, "--seq-len", "64"]) != 0
    assert "vocabulary has 64 tokens" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no split 'test'"):
        heldout_windows(packed, 3, 64, split="test")
