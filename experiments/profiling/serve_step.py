"""Where a serving step's time goes while a long prompt prefills next to decoding streams (the interference target).

`EngineCore` (9B shape, random weights, prefix cache off): `--streams` short requests decode; their decode-only
steps are timed first. Then one long prompt is admitted and prefilled with big chunks (untimed) up to each of
`--contexts`; there `--steps` serving steps (the decode step + one `--chunk-size` chunk of the long prompt) are
timed one by one (synchronised), split into the decode part and the prefill part, and 3 more are profiled: GPU
busy time against wall time, device time by kernel family, top kernels, host syncs by call site.

    python experiments/profiling/serve_step.py --contexts 32K,256K,1M --chunk-size 512 --out serve_step.json

Needs a CUDA GPU.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from prefill_gaps import busy_ms, kernel_breakdown  # noqa: E402

from sala.bench.common import run_metadata, write_json  # noqa: E402
from sala.utils.lengths import parse_lengths  # noqa: E402


def summary(ms: list[float]) -> dict:
    s = sorted(ms)
    return {"median_ms": round(statistics.median(s), 3), "p90_ms": round(s[int(0.9 * (len(s) - 1))], 3),
            "max_ms": round(s[-1], 3), "n": len(s)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="32K,256K,1M", help="long-prompt contexts at which to time steps")
    ap.add_argument("--chunk-size", type=int, default=512, help="the serving prefill chunk")
    ap.add_argument("--fill-chunk", type=int, default=8192, help="chunk of the untimed fill between contexts")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--stream-prompt", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--preset", default="minicpm-sala-9b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    contexts = sorted(parse_lengths(a.contexts))

    import torch

    from sala.engine import SalaEngine
    from sala.engine.requests import Request
    from sala.engine.sampling import SamplingParams
    from sala.engine.scheduler import EngineCore

    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("experiments/profiling/serve_step.py needs a CUDA GPU (--device cpu: a smoke run)")
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    longest = -(-(contexts[-1] + a.fill_chunk + a.chunk_size * (a.steps + 8)) // 64) * 64
    dtype = "bf16" if a.device == "cuda" else "fp32"
    core = EngineCore.from_pretrained(a.preset, device=a.device, dtype=dtype, max_num_seqs=a.streams + 1,
                                      max_model_len=longest, chunk_size=a.fill_chunk, enable_prefix_cache=False)
    warm_s = SalaEngine(core.model, core.tokenizer).warmup(longest, a.streams + 1)
    gen = torch.Generator().manual_seed(0)
    V = core.config.vocab_size

    def rand(n: int) -> list[int]:
        return torch.randint(3, V, (n,), generator=gen).tolist()

    parts = {"decode": 0.0, "prefill": 0.0, "prefill_host": 0.0}

    def timed(name, fn):
        """fn timed from an idle GPU to its work done; for the prefill also until its call returned (the host's
        launch time: where the GPU keeps up, the host is the bound)."""
        def wrapper(*args, **kw):
            sync()
            t = time.perf_counter()
            out = fn(*args, **kw)
            if name == "prefill":
                parts["prefill_host"] += (time.perf_counter() - t) * 1e3
            sync()
            parts[name] += (time.perf_counter() - t) * 1e3
            return out
        return wrapper

    core._decode = timed("decode", core._decode)
    core._prefill = timed("prefill", core._prefill)

    def step_ms() -> tuple[float, float, float]:
        parts["decode"] = parts["prefill"] = parts["prefill_host"] = 0.0
        sync()
        t = time.perf_counter()
        core.step()
        sync()
        return (time.perf_counter() - t) * 1e3, parts["decode"], parts["prefill"], parts["prefill_host"]

    def measure(n: int) -> dict:
        rows = [step_ms() for _ in range(n)]
        out = {"step": summary([r[0] for r in rows]), "decode": summary([r[1] for r in rows]),
               "prefill": summary([r[2] for r in rows]), "prefill_host": summary([r[3] for r in rows])}
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if a.device == "cuda" else [])
        with profile(activities=acts) as prof:
            walls = [step_ms()[0] for _ in range(3)]
        events = prof.events()
        out["profiled_wall_ms"] = round(sum(walls), 2)
        out["profiled_busy_ms"] = round(busy_ms(events), 2)
        out["kernels_3_steps"] = kernel_breakdown(events, top=15)
        # host side: launches and operator calls per step, the operators costing the most CPU time
        ka = prof.key_averages()
        launches = sum(e.count for e in ka if "LaunchKernel" in e.key or "GraphLaunch" in e.key)
        aten = [e for e in ka if e.key.startswith("aten::")]
        out["host_per_step"] = {
            "kernel_launches": round(launches / 3, 1),
            "aten_calls": round(sum(e.count for e in aten) / 3, 1),
            "top_cpu_self_ms": [{"op": e.key[:80], "calls": round(e.count / 3, 1),
                                 "self_cpu_ms": round(e.self_cpu_time_total / 3e3, 2)}
                                for e in sorted(ka, key=lambda e: -e.self_cpu_time_total)[:20]]}
        sites: dict[str, int] = {}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if a.device == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
            try:
                step_ms()
            finally:
                if a.device == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
        for w in caught:
            if "synchroniz" in str(w.message).lower():
                key = f"{Path(w.filename).name}:{w.lineno}"
                sites[key] = sites.get(key, 0) + 1
        out["sync_sites_one_step"] = sites
        return out

    budget = a.steps * 2 + 8 + (len(contexts) + 1) * (a.steps + 4) + longest // a.fill_chunk + 64
    for i in range(a.streams):
        core.add_request(Request(f"s{i}", rand(a.stream_prompt),
                                 SamplingParams(max_new_tokens=budget, ignore_eos=True, temperature=0.0)))
    core.chunk_size = core.max_tokens_per_step = a.chunk_size
    while any(s.status != "running" for s in core.active.values()):
        core.step()
    for _ in range(5):
        core.step()
    result = {"decode_only": measure(a.steps)}
    print("decode only:", result["decode_only"]["step"], flush=True)
    core.add_request(Request("long", rand(contexts[-1] + a.chunk_size * (a.steps + 8)),
                             SamplingParams(max_new_tokens=1, ignore_eos=True, temperature=0.0)))
    by_context = {}
    for c in contexts:
        core.chunk_size = core.max_tokens_per_step = a.fill_chunk
        t0 = time.perf_counter()
        while "long" not in core.active or core.cache.lengths[core.active["long"].row] + a.fill_chunk <= c:
            core.step()
        core.chunk_size = core.max_tokens_per_step = a.chunk_size
        while core.cache.lengths[core.active["long"].row] < c:
            core.step()
        fill_s = time.perf_counter() - t0
        core.step()                                      # first step at this context: new kernel variants
        m = measure(a.steps)
        m["context_at_start"] = core.cache.lengths[core.active["long"].row]
        m["fill_s"] = round(fill_s, 2)
        by_context[str(c)] = m
        print(f"context {c}: step {m['step']}, decode {m['decode']['median_ms']} ms, prefill "
              f"{m['prefill']['median_ms']} ms (host {m['prefill_host']['median_ms']} ms), launches "
              f"{m['host_per_step']['kernel_launches']}, busy {m['profiled_busy_ms']} of {m['profiled_wall_ms']} ms, "
              f"families {m['kernels_3_steps']['families_ms']}", flush=True)
    result["mixed_by_context"] = by_context
    payload = {"meta": run_metadata(), "benchmark": "serve_step", "preset": a.preset, "streams": a.streams,
               "stream_prompt": a.stream_prompt, "chunk_size": a.chunk_size, "kernel_warmup_s": round(warm_s, 2),
               "results": result}
    if a.out:
        write_json(a.out, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
