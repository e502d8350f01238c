"""Hand a converted SALA checkpoint over to the trainer: continual training (HALO's last step, the paper's
stages 2-4: longer sequences, sparse attention on) with `sala.train.Trainer`, from one training config."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

DEFAULT_OUT_SUFFIX = "-continued"


def continue_training(sala_dir: str | Path, train_config: str | Path, overrides: list[str] | tuple[str, ...] = (),
                      log: Callable[[str], None] = print) -> dict:
    """Train the converted model in `sala_dir` with the stages of `train_config` (YAML/JSON, as for
    `sala train`) plus `overrides` (KEY=VALUE). The model comes from `sala_dir` (model.kind=pretrained); the
    run writes to the config's `out_dir`, or `<sala_dir>-continued` when it names none, never into `sala_dir`.
    Returns the trainer's summary (its `final_model` is the continued checkpoint)."""
    from sala.train import Trainer, load_config
    from sala.train.config import TrainConfig

    sala_dir = Path(sala_dir)
    if not (sala_dir / "config.json").is_file():
        raise FileNotFoundError(f"continue_training: {sala_dir} has no config.json (not a converted checkpoint)")
    if not Path(train_config).is_file():
        raise FileNotFoundError(f"continue_training: training config {train_config} does not exist")
    cfg = load_config(str(train_config), [*overrides, "model.kind=pretrained", f"model.path={sala_dir}"])
    if cfg.out_dir == TrainConfig().out_dir and not any(o.startswith("out_dir=") for o in overrides):
        cfg.out_dir = str(sala_dir.parent / (sala_dir.name + DEFAULT_OUT_SUFFIX))
    if Path(cfg.out_dir).resolve() == sala_dir.resolve():
        raise ValueError(f"continue_training: out_dir {cfg.out_dir} is the converted checkpoint itself; "
                         f"choose another folder (out_dir=...)")
    log(f"continual training of {sala_dir} with {train_config}: {len(cfg.stages)} stage(s), "
        f"{cfg.total_steps()} steps, writing to {cfg.out_dir}")
    summary = Trainer(cfg, log=log).fit()
    if summary.get("final_model"):
        log(f"continued model: {summary['final_model']}")
    return summary
