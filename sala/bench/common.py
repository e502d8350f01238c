"""Shared benchmark helpers: GPU timing, profiler kernel tables, run metadata and atomic JSON output."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import torch


def bench_ms(fn: Callable[[], Any], warmup: int = 3, rep: int = 10, setup: Callable[[], Any] | None = None) -> float:
    """Median wall time of `fn()` in milliseconds.

    On CUDA each repetition is timed with a pair of CUDA events (device time between the
    events, host launch overhead included when the GPU waits for it); on CPU with
    time.perf_counter. `warmup` untimed calls come first (compilation, autotuning, caches).
    `setup()`, if given, runs before every call (warm-up ones too), outside the timing (e.g. a state reset).
    """
    if rep < 1:
        raise ValueError(f"bench_ms: rep must be >= 1, got {rep}")
    setup = setup or (lambda: None)
    for _ in range(max(0, warmup)):
        setup()
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        times = []
        for _ in range(rep):
            setup()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return float(statistics.median(times))
    times = []
    for _ in range(rep):
        setup()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(statistics.median(times))


def device_kernel_table(prof, top: int = 12) -> list[dict]:
    """The `top` ops of a torch.profiler run by device (CUDA) self time: name (120 chars), calls, device_ms."""
    rows = []
    for e in prof.key_averages():
        dev_us = getattr(e, "self_device_time_total", None)
        if dev_us is None:
            dev_us = getattr(e, "self_cuda_time_total", 0.0)
        if dev_us > 0:
            rows.append({"name": e.key[:120], "calls": e.count, "device_ms": dev_us / 1e3})
    rows.sort(key=lambda r: -r["device_ms"])
    return rows[:top]


def _git_commit() -> str:
    """$SALA_GIT_COMMIT when set (a copied tree, such as the lent GPU machine's, whose .git, if any, is not the
    tree that runs: pass it in the command); else `git rev-parse HEAD` of the working tree; else "uncommitted"."""
    if os.environ.get("SALA_GIT_COMMIT"):
        return os.environ["SALA_GIT_COMMIT"]
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        )
        sha = out.stdout.strip()
        if out.returncode == 0 and sha:
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=here, capture_output=True, text=True, timeout=10,
            )
            return sha + ("-dirty" if dirty.stdout.strip() else "")
    except Exception:
        pass
    return "uncommitted"


def run_metadata() -> dict:
    """Where and how a benchmark ran: device, versions, command line, git commit, UTC timestamp."""
    meta: dict[str, Any] = {
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
    }
    try:
        import triton

        meta["triton"] = triton.__version__
    except Exception:
        meta["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        meta["device"] = torch.cuda.get_device_name(0)
        meta["device_memory_gib"] = round(props.total_memory / 2**30, 1)
        meta["device_count"] = torch.cuda.device_count()
        meta["cuda"] = torch.version.cuda
    else:
        meta["device"] = "cpu: " + (platform.processor() or platform.machine())
    meta["env"] = {k: v for k, v in os.environ.items()
                   if (k.startswith("SALA_") and k != "SALA_GIT_COMMIT") or k == "TRITON_INTERPRET"}
    return meta


def write_json(path: str, payload: Any) -> None:
    """Write `payload` as indented JSON to `path` atomically (temp file in the same folder + rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2, sort_keys=False, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
