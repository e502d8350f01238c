"""Training checkpoints: model, optimizer, trainer state (schedule position, data position) and RNG.

Layout: `{out_dir}/checkpoints/step_{N:08d}/` with `model.pt`, `optim.pt` (full, unsharded state dicts),
`trainer.json` and `rng_rank{r}.pt`; `{out_dir}/checkpoints/latest` names the newest. A checkpoint is
written into `.tmp-step_{N:08d}` and renamed when complete, so a crash never leaves a half checkpoint
under a real name; `latest` is replaced atomically too. Resuming checks the newest checkpoint's files (JSON and
the zip archives torch writes, with their CRCs) and falls back to the previous one, with a warning, when the newest
is truncated or corrupt.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from sala.train.distributed import DistEnv, barrier
from sala.utils.errors import SalaError, disk_full_error, is_disk_full

logger = logging.getLogger(__name__)


def _save(obj, path: Path) -> None:
    """torch.save, with a full disk reported as such and naming the file (torch says "unexpected pos ...")."""
    try:
        torch.save(obj, path)
    except (OSError, RuntimeError) as e:
        if is_disk_full(e):
            raise disk_full_error(path, e) from None
        raise


def _load(path: Path):
    """torch.load of one checkpoint file, naming the file when it cannot be read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        raise SalaError(f"checkpoint file {path} cannot be read ({type(e).__name__}: {e}); it is truncated or "
                        f"corrupt: delete its folder to resume from an older checkpoint") from None


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
                    optimizer: torch.optim.Optimizer, trainer_state: dict, env: DistEnv, keep: int = 2,
                    stale: list[Path] | tuple[Path, ...] = ()) -> Path:
    """Write checkpoint `step` (all ranks must call this) and prune all but the newest `keep`. `stale`: folders
    of an earlier run (started again with overwrite), removed once this checkpoint is in place."""
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
        _save(msd, tmp / "model.pt")
        _save(osd, tmp / "optim.pt")
        try:
            (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=2) + "\n")
        except OSError as e:
            if is_disk_full(e):
                raise disk_full_error(tmp / "trainer.json", e) from None
            raise
    _save(rng_state(), tmp / f"rng_rank{env.rank}.pt")
    barrier(env)
    if env.is_main:
        replace_dir(tmp, final)
        _atomic_write_text(root / "latest", final.name + "\n")
        for old in stale:
            if Path(old).resolve() != final.resolve():
                shutil.rmtree(old, ignore_errors=True)
        done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(env)
    return final


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """What makes checkpoint folder `path` unusable (missing or unreadable trainer.json, a missing, truncated or
    corrupt .pt archive), or None when it reads whole. Reads every file once (CRC check), loads nothing."""
    path = Path(path)
    if not path.is_dir():
        return f"{path} does not exist"
    try:
        json.loads((path / "trainer.json").read_text())
    except FileNotFoundError:
        return f"{path / 'trainer.json'} is missing"
    except (OSError, ValueError) as e:
        return f"{path / 'trainer.json'} cannot be read ({e})"
    for name in ("model.pt", "optim.pt"):
        f = path / name
        if not f.is_file():
            return f"{f} is missing"
        try:
            with zipfile.ZipFile(f) as z:
                bad = z.testzip()
            if bad is not None:
                return f"{f} is corrupt (entry {bad} fails its CRC check)"
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            return f"{f} is truncated or corrupt ({e})"
    return None


def list_checkpoints(ckpt_root: str | os.PathLike) -> list[Path]:
    """Finished checkpoint folders under `ckpt_root`, oldest first."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))


def latest_checkpoint(ckpt_root: str | os.PathLike, warn=None) -> Path | None:
    """The newest usable checkpoint: the one `latest` names when it reads whole, else (with a warning through
    `warn`, default logging) the newest older one that does. None when there is none; SalaError naming every
    problem when checkpoints exist but none is usable."""
    warn = warn or logger.warning
    root = Path(ckpt_root)
    ptr = root / "latest"
    found = list_checkpoints(root)
    if not ptr.is_file() and not found:
        return None
    named = root / ptr.read_text().strip() if ptr.is_file() else None
    candidates = list(reversed(found))
    if named is not None:   # `latest` first, then the older ones
        candidates = [named] + [p for p in candidates if p.name < named.name]
    problems = []
    for path in candidates:
        problem = checkpoint_problem(path)
        if problem is None:
            if problems:
                warn(f"warning: the newest checkpoint is unusable ({'; '.join(problems)}); resuming from the "
                     f"previous one, {path}")
            return path
        problems.append(problem)
    raise SalaError(f"no usable checkpoint in {root}: {'; '.join(problems)}. Delete the broken folders to start "
                    f"over, or pass resume=false to train from scratch (the checkpoints stay until replaced)")


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
        msd = _load(path / "model.pt") if env.is_main else {}
        set_model_state_dict(model, msd, options=opts)
        osd = _load(path / "optim.pt") if env.is_main else {}
        set_optimizer_state_dict(model, optimizer, osd, options=opts)
    else:
        model.load_state_dict(_load(path / "model.pt"))
        optimizer.load_state_dict(_load(path / "optim.pt"))
    rng_file = path / f"rng_rank{env.rank}.pt"
    if rng_file.is_file():
        set_rng_state(_load(rng_file))
    if env.distributed:
        dist.barrier()
    return state
