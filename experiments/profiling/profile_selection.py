"""Where InfLLM-V2 stage-1 selection's time goes: CUDA kernel times (torch.profiler) of `select_blocks` at the
released shape (32 query heads, 2 KV heads, d 128), split into the pooled-score kernel, the -inf fill,
`torch.topk` and the index sort, plus the whole call timed with CUDA events.

  python3 experiments/profiling/profile_selection.py --lengths 131072,1048576 --out runs/profile_selection.json
  python3 experiments/profiling/profile_selection.py --lengths 131072 --variant rows64=select_rows:64,select_warps:4

--variant NAME=KEY:VALUE[,KEY:VALUE...] (repeatable) also times `select_blocks` with those
`SparseKernelConfig` fields (passed as kernel_config=), in the same process on the same inputs, and records the
fraction of index rows that differ from the default's.
  (on the CPU, to check the script: TRITON_INTERPRET=1 SALA_KERNELS=triton ... --lengths 8192 --queries 64)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def _median_ms(fn, reps: int) -> float:
    """Median of `reps` CUDA-event timings of fn() in ms."""
    import torch

    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def parse_variant(text: str) -> tuple[str, dict]:
    """'name=key:value,key:value' -> (name, {key: value}); values are ints (0/1 for switches)."""
    from sala.ops.infllmv2 import SparseKernelConfig

    fields = sorted(SparseKernelConfig.__dataclass_fields__)
    name, sep, body = text.partition("=")
    if not sep or not name or not body:
        raise SystemExit(f"--variant needs NAME=KEY:VALUE[,KEY:VALUE...], got {text!r}")
    flips = {}
    for item in body.split(","):
        key, sep, value = item.partition(":")
        if not sep or key not in fields:
            raise SystemExit(f"--variant {text!r}: {key!r} is not a SparseKernelConfig field:value "
                             f"(fields: {', '.join(fields)})")
        try:
            flips[key] = int(value)
        except ValueError:
            raise SystemExit(f"--variant {text!r}: value {value!r} of {key} is not an integer") from None
    return name, flips


def main() -> None:
    import torch

    from sala.bench.common import device_kernel_table, run_metadata, write_json
    from sala.ops.infllmv2 import SparseParams, compress_keys, select_blocks

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="131072,1048576")
    ap.add_argument("--queries", type=int, default=0,
                    help="only the last N queries of each length (0: all); times scale with N")
    ap.add_argument("--out", default="runs/profile_selection.json")
    ap.add_argument("--variant", action="append", default=[], help="NAME=KEY:VALUE[,KEY:VALUE...] (see above)")
    args = ap.parse_args()
    from sala.ops.infllmv2 import SparseKernelConfig

    variants = [parse_variant(v) for v in args.variant]

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    p = SparseParams()
    results = []
    for T in (int(x) for x in args.lengths.split(",")):
        Tq = args.queries or T
        g = torch.Generator(device=dev).manual_seed(0)
        q = torch.randn(1, Tq, 32, 128, device=dev, dtype=dt, generator=g)
        k = torch.randn(1, T, 2, 128, device=dev, dtype=dt, generator=g)
        k1 = compress_keys(k, p.kernel_size, p.kernel_stride)
        k2 = compress_keys(k, p.k2_kernel, p.k2_stride)

        def run(config=None):
            return select_blocks(q, k1, k2, p, q_offset=T - Tq, kernel_config=config)

        base = run()                                           # compile; the default's indices
        reps = 3 if T <= 262144 else 1
        whole_ms = _median_ms(run, reps) if dev == "cuda" else None
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev == "cuda" else [])
        with torch.profiler.profile(activities=acts) as prof:
            run()
            if dev == "cuda":
                torch.cuda.synchronize()
        row = {"T": T, "queries": Tq, "select_ms": whole_ms, "kernels": device_kernel_table(prof)}
        for name, flips in variants:
            config = SparseKernelConfig(**flips)
            got = run(config)                                  # compile
            ms = _median_ms(lambda: run(config), reps) if dev == "cuda" else None
            differ = (got != base).any(dim=-1).float().mean().item()
            row[f"{name}_select_ms"] = ms
            row[f"{name}_rows_differing_from_default"] = differ
            row[f"{name}_tuning"] = flips
            print(f"T={T} {name}: {ms} ms (default {whole_ms}), rows differing {differ}", flush=True)
        print(row, flush=True)
        results.append(row)
        q = k = k1 = k2 = base = None  # free the memory
    write_json(args.out, {"meta": run_metadata(), "op": "infllmv2 select_blocks",
                          "shape": {"Hq": 32, "Hkv": 2, "head_dim": 128, "dtype": str(dt)},
                          "results": results})


if __name__ == "__main__":
    main()
