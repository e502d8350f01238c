"""Continual training of a saved model folder (a converted or released SALA model) in one call: the step
the paper runs after HALO conversion.

    from sala.train.continual import continue_training
    run = continue_training("sala/assets/model", "train_data/stdlib-bpe8k-synth", "runs/continued",
                            tokens=45_000_000, seq_len=2048, micro_batch=32, lr=1e-3)
    run["final"]   # the continued model folder (save_pretrained layout, loadable by `sala eval`, `sala demo`)

One stage: linear warmup, then the paper's exponential decay from `lr` to `lr * lr_end_ratio`, sparse
attention on (sparse layers select blocks wherever a document is longer than `dense_len`). The budget is
`tokens` (exact step count) or `seconds` (throughput measured by a short calibration run first; the run
also stops at the time limit and saves what it has).
"""
from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Callable

from sala.train.config import DataConfig, ModelConfig, OptimConfig, StageConfig, TrainConfig


def continual_config(model_dir: str | Path, data: str | Path, out_dir: str | Path, steps: int, seq_len: int,
                     micro_batch: int, lr: float, lr_end_ratio: float = 0.05, warmup_steps: int | None = None,
                     sparse: bool = True, precision: str = "auto", time_limit_s: float | None = None,
                     eval_windows: int = 16, progress: bool = True) -> TrainConfig:
    """The TrainConfig of one continual-training stage of `steps` optimizer steps (see module docstring)."""
    if steps < 1:
        raise ValueError(f"continual training needs at least 1 step, got {steps}")
    if not 0.0 < lr_end_ratio <= 1.0:
        raise ValueError(f"lr_end_ratio must be in (0, 1], got {lr_end_ratio}")
    warm = min(50, steps // 10) if warmup_steps is None else warmup_steps
    stage = StageConfig(name="continue", steps=steps, seq_len=seq_len, micro_batch=micro_batch, lr=lr,
                        lr_end=lr * lr_end_ratio, warmup_steps=warm, decay="exponential",
                        decay_steps=max(1, steps - warm), sparse=sparse)
    return TrainConfig(model=ModelConfig(kind="pretrained", preset=None, path=str(model_dir)),
                       data=DataConfig(path=str(data)), optim=OptimConfig(lr=lr), stages=[stage],
                       out_dir=str(out_dir), precision=precision, resume=False, time_limit_s=time_limit_s,
                       eval_every=max(1, steps // 4), eval_windows=eval_windows, keep_checkpoints=1,
                       progress=progress, log_every=10)


def continue_training(model_dir: str | Path, data: str | Path, out_dir: str | Path, *, tokens: int | None = None,
                      seconds: float | None = None, seq_len: int = 2048, micro_batch: int = 32, lr: float = 1e-3,
                      lr_end_ratio: float = 0.05, warmup_steps: int | None = None, sparse: bool = True,
                      precision: str = "auto", progress: bool = True,
                      log: Callable[[str], None] = print) -> dict:
    """Train the model in `model_dir` on the packed dataset `data` for `tokens` tokens or `seconds` of wall
    time; the result goes to `out_dir/final` (the input folder is never written). Returns a summary dict:
    final (folder), steps, tokens, seconds, tokens_per_s_calibration, heldout_curve [(step, loss)], config."""
    from sala.train.trainer import Trainer

    if (tokens is None) == (seconds is None):
        raise ValueError("give exactly one budget: tokens=... or seconds=...")
    if not (Path(model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a model folder (no config.json)")
    out = Path(out_dir)
    if out.resolve() == Path(model_dir).resolve():
        raise ValueError(f"out_dir {out} is the model folder itself; continual training never overwrites its input")
    per_step = seq_len * micro_batch
    tps = None
    if tokens is not None:
        if tokens < per_step:
            raise ValueError(f"tokens={tokens:,} is less than one step "
                             f"({micro_batch} x {seq_len} = {per_step:,} tokens)")
        steps = math.ceil(tokens / per_step)
        limit = None
    else:
        if seconds <= 0:
            raise ValueError(f"seconds must be positive, got {seconds}")
        calib = continual_config(model_dir, data, out / "calib", 20, seq_len, micro_batch, lr * 0.1,
                                 warmup_steps=0, sparse=sparse, precision=precision, eval_windows=1, progress=False)
        calib.save_final = False
        tr = Trainer(calib, log=log)
        tr.fit()
        tps = [r["tokens_per_s"] for r in tr.history if "tokens_per_s" in r][-1]
        del tr
        shutil.rmtree(out / "calib", ignore_errors=True)   # its checkpoint is of no further use
        steps = max(1, int(0.9 * seconds * tps / per_step))
        limit = seconds * 1.15
    cfg = continual_config(model_dir, data, out, steps, seq_len, micro_batch, lr, lr_end_ratio, warmup_steps,
                           sparse, precision, limit, progress=progress)
    t0 = time.time()
    tr = Trainer(cfg, log=log)
    summary = tr.fit()
    curve = [(r["step"], r["val_loss"]) for r in tr.history if "val_loss" in r]
    return {"final": str(out / "final"), "steps": summary["global_step"], "tokens": summary["tokens"],
            "seconds": time.time() - t0, "tokens_per_s_calibration": tps, "heldout_curve": curve,
            "config": cfg.to_dict()}
