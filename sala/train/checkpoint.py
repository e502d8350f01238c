"""Training checkpoints: model, optimizer, trainer state (schedule position, data position) and RNG.

Layout: `{out_dir}/checkpoints/step_{N:08d}/` with `model.pt`, `optim.pt` (full, unsharded state dicts),
`trainer.json` and `rng_rank{r}.pt`; `{out_dir}/checkpoints/latest` names the newest. A checkpoint is
written into `.tmp-step_{N:08d}` and renamed when complete, so a crash never leaves a half checkpoint
under a real name; `latest` is replaced atomically too.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from sala.train.distributed import DistEnv, barrier


def _state_dict_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kw)


def rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished folder `tmp` to `final`, replacing an older `final`."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def copy_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy checkpoint folder `src` to `dst` (written beside it, then renamed; an older `dst` is replaced)."""
    dst = Path(dst)
    tmp = dst.with_name(f".tmp-{dst.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, tmp)
    replace_dir(tmp, dst)
    return dst


def save_checkpoint(ckpt_root: str | os.PathLike, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, trainer_state: dict, env: DistEnv, keep: int = 2) -> Path:
    """Write checkpoint `step` (all ranks must call this) and prune all but the newest `keep`."""
    root = Path(ckpt_root)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    if env.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier(env)
    if env.distributed:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        opts = _state_dict_options(full_state_dict=True, cpu_offload=True)
        msd = get_model_state_dict(model, options=opts)
        osd = get_optimizer_state_dict(model, optimizer, options=opts)
    else:
        msd = model.state_dict()
        osd = optimizer.state_dict()
    if env.is_main:
        torch.save(msd, tmp / "model.pt")
        torch.save(osd, tmp / "optim.pt")
        (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=2) + "\n")
    torch.save(rng_state(), tmp / f"rng_rank{env.rank}.pt")
    barrier(env)
    if env.is_main:
        replace_dir(tmp, final)
        _atomic_write_text(root / "latest", final.name + "\n")
        done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(env)
    return final


def latest_checkpoint(ckpt_root: str | os.PathLike) -> Path | None:
    """The checkpoint named by `latest`, or None when there is none."""
    root = Path(ckpt_root)
    ptr = root / "latest"
    if not ptr.is_file():
        return None
    path = root / ptr.read_text().strip()
    if not (path / "trainer.json").is_file():
        raise RuntimeError(f"{ptr} names {path}, which is not a complete checkpoint")
    return path


def read_trainer_state(path: str | os.PathLike) -> dict:
    """The trainer's record of checkpoint folder `path` (trainer.json: {"state": position, counters; "config"}),
    without loading weights."""
    return json.loads((Path(path) / "trainer.json").read_text())


def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    env: DistEnv) -> dict:
    """Restore model, optimizer and this rank's RNG from checkpoint folder `path`; returns the trainer state."""
    path = Path(path)
    state = read_trainer_state(path)
    if env.distributed:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        opts = _state_dict_options(full_state_dict=True, broadcast_from_rank0=True, cpu_offload=True)
        msd = torch.load(path / "model.pt", map_location="cpu", weights_only=False) if env.is_main else {}
        set_model_state_dict(model, msd, options=opts)
        osd = torch.load(path / "optim.pt", map_location="cpu", weights_only=False) if env.is_main else {}
        set_optimizer_state_dict(model, optimizer, osd, options=opts)
    else:
        model.load_state_dict(torch.load(path / "model.pt", map_location="cpu", weights_only=False))
        optimizer.load_state_dict(torch.load(path / "optim.pt", map_location="cpu", weights_only=False))
    rng_file = path / f"rng_rank{env.rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    if env.distributed:
        dist.barrier()
    return state
