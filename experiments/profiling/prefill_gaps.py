"""Where a long prefill's wall time goes beyond its GPU time: host syncs and idle gaps.

For one prefill of N tokens (9B shape, random weights, after `SalaEngine.warmup` and an untimed warm prefill):
- wall time (synchronised before and after);
- GPU busy time: the union of all CUDA kernel and memcpy intervals under torch.profiler, so the idle
  fraction = 1 - busy / wall (a second, profiled run);
- device time by kernel family (GEMM, lightning, sparse selection, sparse attention, ...) and the top
  kernels, from the same profiled run;
- host syncs: the number of synchronising CUDA calls, by call site, caught with
  `torch.cuda.set_sync_debug_mode("warn")` during a third run;
- with --other-chunk-sizes, the wall time of the same prefill at other prefill chunk sizes (same engine, one
  untimed warm run each).

    python experiments/profiling/prefill_gaps.py --length 256K --out gaps.json [--other-chunk-sizes 32768,65536]
        [--quantization fp8]

Needs a CUDA GPU.
"""
from __future__ import annotations

import argparse
import collections
import re
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sala.bench.common import run_metadata, write_json  # noqa: E402
from sala.utils.lengths import parse_lengths  # noqa: E402


def device_events(events):
    """The profiler events that ran on the GPU (kernels, copies) for a non-empty interval."""
    return [e for e in events if getattr(e, "device_type", None) is not None and str(e.device_type).endswith("CUDA")
            and e.time_range.end > e.time_range.start]


def busy_ms(events) -> float:
    """Union of the device intervals (kernels, copies) of profiler events, in ms."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in device_events(events))
    total, cur_s, cur_e = 0.0, None, None
    for s, e in spans:
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total / 1e3          # profiler times are in µs


# Kernel families of a SALA prefill, matched in this order against CUDA kernel names (first match wins).
KERNEL_FAMILIES = (
    ("sparse_selection", r"_block_scores|_topk|mbtopk|gatherTopK|radixSort|DigitCounts|DigitCumSum|WithinK"),
    ("sparse_attention", r"_sparse_|_splitk_"),
    ("key_compression", r"_compress"),
    ("lightning", r"_segment_|_decode_step"),
    ("fused_elementwise", r"_rms_norm_rows|_qk_norm_rope|_silu_mul"),
    ("dense_attention", r"flash|fmha|attention"),
    ("gemm", r"gemm|cutlass|xmma|nvjet|cublas|sm90_"),
    ("copy_cast_fill", r"copy|cast|fill|cat|index|elementwise"),
)


def kernel_breakdown(events, top: int = 25) -> dict:
    """Device time (ms) of profiler CUDA kernel events by family (`KERNEL_FAMILIES`, else "other") and the
    `top` kernels by total time (name cut to 120 characters, calls, ms)."""
    by_name: dict[str, list] = {}
    for e in device_events(events):
        rec = by_name.setdefault(e.name, [0, 0.0])
        rec[0] += 1
        rec[1] += (e.time_range.end - e.time_range.start) / 1e3
    families: collections.Counter = collections.Counter()
    for name, (_, ms) in by_name.items():
        fam = next((f for f, pat in KERNEL_FAMILIES if re.search(pat, name)), "other")
        families[fam] += ms
    kernels = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]
    return {"families_ms": {k: round(v, 1) for k, v in families.most_common()},
            "top_kernels": [{"name": n[:120], "calls": c, "ms": round(ms, 2)} for n, (c, ms) in kernels]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", default="256K")
    ap.add_argument("--chunk-size", type=int, default=None)
    ap.add_argument("--other-chunk-sizes", default="", help="comma-separated prefill chunk sizes to time too")
    ap.add_argument("--preset", default="minicpm-sala-9b")
    ap.add_argument("--quantization", default=None, choices=["fp8"], help="FP8 projections and LM head")
    ap.add_argument("--profiled-only", action="store_true",
                    help="one profiled prefill only (no warm, timed or sync-check runs): for 1M within one call")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    (n,) = parse_lengths(a.length)
    try:
        others = [int(x) for x in a.other_chunk_sizes.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--other-chunk-sizes must be integers, got {a.other_chunk_sizes!r}")
    if any(c < 1 for c in others):
        ap.error(f"--other-chunk-sizes must be >= 1, got {others}")

    import torch

    from sala.engine import SalaEngine

    if not torch.cuda.is_available():
        raise SystemExit("experiments/profiling/prefill_gaps.py needs a CUDA GPU")
    kw = {} if a.chunk_size is None else {"chunk_size": a.chunk_size}
    if a.quantization:
        kw["quantization"] = a.quantization
    engine = SalaEngine.from_preset(a.preset, random_weights=True, device="cuda", dtype="bf16", seed=0, **kw)
    engine.warmup(n + 16)
    ids = torch.randint(3, engine.config.vocab_size, (n,), generator=torch.Generator().manual_seed(0)).tolist()

    def prefill() -> float:
        engine.cache = None
        torch.cuda.synchronize()
        t = time.perf_counter()
        engine.prefill([ids], n + 16)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    wall = None                                                  # --profiled-only: the profiled run's
    if not a.profiled_only:
        prefill()                                                # warm (allocator, cuBLAS plans)
        wall = prefill()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        wall_profiled = prefill()
    events = prof.events()
    busy = busy_ms(events)
    breakdown = kernel_breakdown(events)
    print("device ms by kernel family:", breakdown["families_ms"], flush=True)
    sites: collections.Counter = collections.Counter()
    caught = []
    if not a.profiled_only:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                prefill()
            finally:
                torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" in str(w.message).lower():
            sites[f"{Path(w.filename).name}:{w.lineno}"] += 1
    first_chunk = engine.chunk_size
    wall = wall_profiled if wall is None else wall
    by_chunk = {str(first_chunk): round(wall, 3)}
    for c in others:
        engine.chunk_size = c
        prefill()                                                # untimed: first use of this chunk size
        by_chunk[str(c)] = round(prefill(), 3)
        print(f"chunk {c}: {by_chunk[str(c)]} s", flush=True)
    engine.chunk_size = first_chunk
    payload = {"meta": run_metadata(), "benchmark": "prefill_gaps", "preset": a.preset, "length": n,
               "quantization": a.quantization,
               "chunk_size": first_chunk, "wall_s": round(wall, 3), "wall_profiled_s": round(wall_profiled, 3),
               "gpu_busy_s": round(busy / 1e3, 3), "idle_fraction": round(1 - busy / 1e3 / wall_profiled, 4),
               "profiled_only": a.profiled_only,
               "syncs": None if a.profiled_only else sum(sites.values()), "sync_sites": dict(sites.most_common(20)),
               "wall_s_by_chunk_size": by_chunk, "kernel_breakdown": breakdown}
    print({k: v for k, v in payload.items() if k != "meta"}, flush=True)
    if a.out:
        write_json(a.out, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
