"""sala.train.continual: continual training of a saved model folder (CPU, tiny model)."""
from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch

from sala.data.packed import read_meta
from sala.modeling import SalaConfig, SalaForCausalLM
from sala.train.continual import continual_config, continue_training
from sala.train.model_factory import load_model_dir
from sala.train.schedule import stage_lr


@pytest.fixture(scope="module")
def setup(tmp_path_factory, prepare_in):
    root = tmp_path_factory.mktemp("continual")
    (root / "docs").mkdir()
    rng = np.random.default_rng(0)
    for i in range(30):
        n = int(rng.integers(20, 80))
        (root / "docs" / f"d{i}.txt").write_text(" ".join(["one two three four five"] * n) + f" end {i}\n")
    prepare_in(root, "packed", ["docs"], val_fraction=0.15, seed=0)
    torch.manual_seed(0)
    model = SalaForCausalLM(SalaConfig.from_preset("sala-tiny", vocab_size=read_meta(root / "packed")["vocab_size"]))
    model.save_pretrained(root / "model")
    return root


def _digest(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_token_budget_trains_a_copy_and_leaves_the_input_alone(setup, tmp_path):
    before = _digest(setup / "model")
    run = continue_training(setup / "model", setup / "packed", tmp_path / "run", tokens=10 * 4 * 64, seq_len=64,
                            micro_batch=4, lr=3e-3, lr_end_ratio=0.1, warmup_steps=2, progress=False,
                            log=lambda s: None)
    assert run["steps"] == 10 and run["tokens"] == 10 * 4 * 64
    assert _digest(setup / "model") == before
    old = load_model_dir(str(setup / "model"), dtype=torch.float32, device=torch.device("cpu")).state_dict()
    new = load_model_dir(run["final"], dtype=torch.float32, device=torch.device("cpu")).state_dict()
    assert old.keys() == new.keys()
    assert any(not torch.equal(old[k], new[k]) for k in old)
    assert run["heldout_curve"] and all(math.isfinite(v) for _, v in run["heldout_curve"])
    st = run["config"]["stages"][0]
    assert st["sparse"] is True and st["decay"] == "exponential" and st["lr_end"] == pytest.approx(3e-4)


def test_schedule_warms_up_then_decays_exponentially_to_the_end_lr():
    cfg = continual_config("m", "d", "o", steps=100, seq_len=64, micro_batch=2, lr=1e-3, lr_end_ratio=0.05)
    st = cfg.stages[0]
    lrs = [stage_lr(st, i, cfg.optim.lr) for i in range(st.steps)]
    assert st.warmup_steps == 10 and max(lrs) == pytest.approx(1e-3)
    assert lrs[-1] == pytest.approx(5e-5, rel=0.1)
    assert all(b <= a + 1e-12 for a, b in zip(lrs[10:], lrs[11:]))   # monotone decay after warmup
    mid = lrs[10 + 45]   # exponential: the geometric mean of the peak and the end near the middle of the decay
    assert mid == pytest.approx(math.sqrt(1e-3 * 5e-5), rel=0.15)


def test_seconds_budget_calibrates_then_stops_in_time(setup, tmp_path, monkeypatch):
    """A seconds budget on the trainer's fake clock, which only optimizer steps and evaluations advance: 1 s a step
    and 5 s an evaluation in the calibration run (the speed leaves evaluations out), 2 s a step in the run itself (it
    turned out slower than calibrated). The run plans 90% of the
    budget at the calibrated throughput, and its time limit (1.15 x the budget) stops it first."""
    from types import SimpleNamespace

    from sala.train import trainer as trainer_module

    clock = [1000.0]
    monkeypatch.setattr(trainer_module, "time", SimpleNamespace(time=lambda: clock[0]))
    real_step = trainer_module.Trainer._optimizer_step

    def timed_step(self):
        clock[0] += 1.0 if self.out_dir.name == "calib" else 2.0
        return real_step(self)

    monkeypatch.setattr(trainer_module.Trainer, "_optimizer_step", timed_step)
    real_eval = trainer_module.Trainer._evaluate_and_log

    def timed_eval(self, *a, **kw):   # evaluations take 5 s: left out of the measured speed
        out = real_eval(self, *a, **kw)
        clock[0] += 5.0 if self.out_dir.name == "calib" else 0.0
        return out

    monkeypatch.setattr(trainer_module.Trainer, "_evaluate_and_log", timed_eval)
    run = continue_training(setup / "model", setup / "packed", tmp_path / "run", seconds=10.0, seq_len=64,
                            micro_batch=2, progress=False, log=lambda s: None)
    tps = run["tokens_per_s_calibration"]
    assert tps == pytest.approx(2 * 64 / 1.0)                           # the 128 tokens of a 1 s step
    planned = run["config"]["stages"][0]["steps"]
    assert planned == int(0.9 * 10.0 * tps / (2 * 64)) and planned > 6
    assert run["config"]["time_limit_s"] == pytest.approx(11.5)
    assert run["steps"] == 6 and run["tokens"] == 6 * 2 * 64           # 12 s > 11.5 s after the 6th step
    assert (tmp_path / "run" / "final" / "config.json").is_file()
    assert not (tmp_path / "run" / "calib").exists()


def test_bad_budgets_and_paths_are_clear_errors(setup, tmp_path):
    with pytest.raises(ValueError, match="exactly one budget"):
        continue_training(setup / "model", setup / "packed", tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="exactly one budget"):
        continue_training(setup / "model", setup / "packed", tmp_path / "a", tokens=10**6, seconds=5, progress=False)
    with pytest.raises(ValueError, match="less than one step"):
        continue_training(setup / "model", setup / "packed", tmp_path / "a", tokens=100, seq_len=64, micro_batch=4)
    with pytest.raises(ValueError, match="never overwrites its input"):
        continue_training(setup / "model", setup / "packed", setup / "model", tokens=10**5, seq_len=64, micro_batch=4)
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        continue_training(tmp_path, setup / "packed", tmp_path / "a", tokens=10**5)
