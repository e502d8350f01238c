"""CPU prefill of the bundled model: seconds and tokens/s per prompt length, against the previous sparse CPU path.

The model (`sala/assets/model` unless --model) runs in fp32 on the CPU through `SalaEngine` (chunked prefill into
its cache, the product path). Its sparse layers use the block-grouped attention and selection of
`sala.ops.infllmv2.blockwise_reference` on long inputs; the baseline, at the lengths up to --baseline-max, runs
the same prefill with the previous path: `sparse_attention_flat_ref` (a per-query gather of the selected keys) and
`select_blocks_ref`. Each length is timed `--repeats` times (median; one run above 16K tokens, and with the previous
path above 8K) after a short warm-up prefill.

    python -m sala.bench.cpu_prefill --lengths 4096,8192,16384,65536 --out bench/results/cpu_prefill_cpu.json
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import statistics
import time
from typing import Any, Iterator
from unittest import mock

import torch

from sala.bench.common import run_metadata, write_json

log = logging.getLogger(__name__)

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "model")
DEFAULT_LENGTHS = (4096, 8192, 16384, 65536)
MANY_REPEATS_MAX = 16384     # longer prompts are timed once
BASELINE_REPEATS_MAX = 8192  # the previous path is slow: longer prompts are timed once with it


@contextlib.contextmanager
def previous_sparse_path() -> Iterator[None]:
    """The sparse layers' CPU path before the block-grouped one, for this benchmark's baseline only: the flat
    per-query gather for inputs above the masked reference's limit and the reference selection. Restored on exit."""
    from sala.ops.infllmv2 import reference as ref
    from sala.ops.infllmv2 import selection, sparse_attention

    def flat(q, k, v, block_idx, q_offset, block_size, scale):
        B, Tq, Hq, D = q.shape
        Tk, Hkv = k.shape[1], k.shape[2]
        pos = (q_offset + torch.arange(Tq, device=q.device)).repeat(B)
        kbase = torch.arange(B, device=q.device).repeat_interleave(Tq) * Tk
        idx = block_idx.permute(0, 2, 1, 3).reshape(B * Tq, Hkv, block_idx.shape[-1])
        o = ref.sparse_attention_flat_ref(q.reshape(B * Tq, Hq, D), k.reshape(B * Tk, Hkv, D),
                                          v.reshape(B * Tk, Hkv, D), idx, pos, kbase, block_size, scale)
        return o.reshape(B, Tq, Hq, D)

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(sparse_attention, "sparse_attention_blockwise_ref", flat))
        if hasattr(selection, "select_blocks_blockwise"):
            stack.enter_context(mock.patch.object(selection, "select_blocks_blockwise", ref.select_blocks_ref))
        yield


def _time_prefill(engine, ids: list[int], repeats: int) -> tuple[list[float], list[float]]:
    """Wall-clock and process CPU seconds of `repeats` prefills of ids. CPU seconds stay meaningful on a machine
    shared with other work (wall-clock then also counts the time other processes held the cores)."""
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        engine.prefill([ids], len(ids))
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return wall, cpu


def run(lengths: list[int] = DEFAULT_LENGTHS, out_path: str = "cpu_prefill_cpu.json", model: str = DEFAULT_MODEL,
        repeats: int = 3, baseline_max: int = 16384, baseline: bool = True, seed: int = 0,
        threads: int | None = None) -> dict:
    """Time CPU prefill per length (ours, and the previous path up to baseline_max), write JSON, return it.
    threads: torch's intra-op threads (None: torch's default)."""
    from sala.engine import SalaEngine
    from sala.modeling.modeling_sala import sparse_params_from_config

    if threads is not None:
        torch.set_num_threads(threads)
    engine = SalaEngine.from_pretrained(model, device="cpu", dtype=torch.float32)
    vocab = engine.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    # warm-up past the dense positions, so the sparse layers' paths have run once before the first timed prefill
    warm = sparse_params_from_config(engine.config).dense_positions + 512
    engine.prefill([torch.randint(3, vocab, (warm,), generator=gen).tolist()], warm)
    rows: list[dict[str, Any]] = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=gen).tolist()
        reps = repeats if n <= MANY_REPEATS_MAX else 1
        times, cpu = _time_prefill(engine, ids, reps)
        row: dict[str, Any] = {"tokens": n, "runs": reps, "seconds": statistics.median(times), "all_seconds": times,
                               "cpu_seconds": statistics.median(cpu)}
        row["tokens_per_s"] = n / row["seconds"]
        if baseline and n <= baseline_max:
            with previous_sparse_path():
                base, base_cpu = _time_prefill(engine, ids, reps if n <= BASELINE_REPEATS_MAX else 1)
            row["previous_seconds"] = statistics.median(base)
            row["previous_all_seconds"] = base
            row["previous_cpu_seconds"] = statistics.median(base_cpu)
            row["previous_tokens_per_s"] = n / row["previous_seconds"]
            row["speedup_vs_previous"] = row["previous_seconds"] / row["seconds"]
            row["cpu_speedup_vs_previous"] = row["previous_cpu_seconds"] / row["cpu_seconds"]
        log.info("%s", row)
        rows.append(row)
    payload = {
        "benchmark": "cpu_prefill",
        "meta": run_metadata() | {"cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                                  "load_average_1_5_15min": list(os.getloadavg())},
        "model": os.path.relpath(model) if os.path.isabs(model) else model,
        "dtype": "float32",
        "path": "SalaEngine.prefill (chunk size %d), batch 1, random token ids" % engine.chunk_size,
        "previous_path": "sparse_attention_flat_ref + select_blocks_ref (the sparse CPU path before "
                         "sala.ops.infllmv2.blockwise_reference)",
        "notes": ["seconds: median of `runs` prefills (wall clock); cpu_seconds: process CPU time of the same runs",
                  "speedup_vs_previous = previous_seconds / seconds"],
        "rows": rows,
    }
    write_json(out_path, payload)
    return payload


def main(args: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)), help="prompt lengths in tokens")
    p.add_argument("--out", required=True, help="JSON output path")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model folder (default: the bundled model)")
    p.add_argument("--repeats", type=int, default=3, help=f"timed runs per length up to {MANY_REPEATS_MAX} tokens")
    p.add_argument("--baseline-max", type=int, default=16384, help="longest prompt timed with the previous path")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    a = p.parse_args(args)
    lengths = [int(x) for x in a.lengths.split(",") if x]
    if not lengths or min(lengths) < 1 or a.repeats < 1:
        p.error(f"--lengths must be positive integers and --repeats >= 1, got {a.lengths!r}, {a.repeats}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run(lengths, a.out, a.model, a.repeats, a.baseline_max, not a.no_baseline, threads=a.threads)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
