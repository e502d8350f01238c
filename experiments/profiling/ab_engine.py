"""Same-process A/B of sparse kernel settings end to end: TTFT and decode speed of SalaEngine.generate under
each setting, interleaved and repeated so that host and clock drift hit every setting alike.

Axes (`--axes`, default fused; every combination of the chosen axes is one setting):
- fused: the fused elementwise kernels (sala.ops.fused) on, or the unfused torch ops (prefill and decode).

    python experiments/profiling/ab_engine.py --out ab.json [--axes fused] [--lengths 64K,128K] [--reps 2]

Needs a CUDA GPU (random 9B-shape weights by default; --preset picks another shape).
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sala.bench.common import run_metadata, write_json  # noqa: E402
from sala.utils.lengths import parse_lengths  # noqa: E402

AXES = {"fused": (True, False)}


def settings_for(axes: tuple[str, ...]) -> list[dict]:
    """Every combination of the values of `axes` (keys of AXES)."""
    unknown = [a for a in axes if a not in AXES]
    if unknown or not axes:
        raise ValueError(f"ab_engine: unknown axes {unknown} (choose from {', '.join(AXES)})")
    return [dict(zip(axes, combo)) for combo in itertools.product(*(AXES[a] for a in axes))]


SETTINGS = settings_for(("fused",))


def _apply(setting: dict, engine=None) -> None:
    if "fused" in setting:
        from sala.engine.forward import EAGER_OPS, REFERENCE_OPS

        engine.runner.ops = engine.runner.decode_ops = EAGER_OPS if setting["fused"] else REFERENCE_OPS


def _name(setting: dict) -> str:
    parts = []
    for axis, value in setting.items():
        parts.append(f"{axis}_{value}" if isinstance(value, str) else f"{axis}_{'on' if value else 'off'}")
    return "+".join(parts)


def run(lengths: list[int], reps: int, decode_tokens: int, preset: str, out: str | None,
        warmup_tokens: int = 12288, measure=None, engine=None, axes: tuple[str, ...] = ("fused",)) -> dict:
    """measure(engine, n, decode_tokens, seed) -> dict (default: sala.bench.latency.measure_sala); engine: built
    from the preset when None (tests pass stand-ins for both); axes: which settings vary (keys of AXES)."""
    settings = settings_for(tuple(axes))
    if measure is None:
        from sala.bench.latency import measure_sala as measure
    if engine is None:
        import torch

        from sala.engine import SalaEngine

        if not torch.cuda.is_available():
            raise RuntimeError("experiments/profiling/ab_engine.py needs a CUDA GPU")
        engine = SalaEngine.from_preset(preset, random_weights=True, device="cuda", dtype="bf16", seed=0)
    runner = getattr(engine, "runner", None)
    saved_ops = (runner.ops, runner.decode_ops) if runner is not None else None
    try:
        return _run(lengths, reps, decode_tokens, preset, out, warmup_tokens, measure, engine, settings)
    finally:
        if saved_ops is not None:
            runner.ops, runner.decode_ops = saved_ops


def _run(lengths, reps, decode_tokens, preset, out, warmup_tokens, measure, engine, settings) -> dict:
    payload = {"meta": run_metadata(), "benchmark": "engine_ab", "preset": preset, "decode_tokens": decode_tokens,
               "reps": reps, "axes": sorted({a for s in settings for a in s}),
               "settings": [_name(s) for s in settings], "runs": [], "summary": {}}
    warm = getattr(engine, "warmup", None)             # length-dependent kernel variants, untimed
    payload["kernel_warmup_s"] = round(warm(max(lengths) + decode_tokens), 2) if warm else None
    for s in settings:                                   # compile every setting's kernels, capture its graph once
        _apply(s, engine)
        measure(engine, min(warmup_tokens, max(lengths)), 4, 0)
    for n in lengths:
        for rep in range(reps):
            order = settings if rep % 2 == 0 else settings[::-1]
            for s in order:
                _apply(s, engine)
                t = time.perf_counter()
                r = measure(engine, n, decode_tokens, 0)
                r.update(length=n, rep=rep, setting=_name(s), wall_s=round(time.perf_counter() - t, 2))
                payload["runs"].append(r)
                print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
        for s in settings:
            rs = [r for r in payload["runs"] if r["length"] == n and r["setting"] == _name(s) and r["status"] == "ok"]
            if rs:
                payload["summary"][f"{n}/{_name(s)}"] = {
                    "ttft_s_median": statistics.median(r["ttft_s"] for r in rs),
                    "decode_tokens_per_s_median": statistics.median(r["decode_tokens_per_s"] for r in rs)}
        if out:
            write_json(out, payload)
    return payload


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--axes", default="fused", help=f"comma-separated, from {','.join(AXES)}")
    ap.add_argument("--lengths", default="64K,128K")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--decode-tokens", type=int, default=256)
    ap.add_argument("--preset", default="minicpm-sala-9b")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.reps < 1 or a.decode_tokens < 2:
        ap.error(f"--reps must be >= 1 and --decode-tokens >= 2 (got {a.reps}, {a.decode_tokens})")
    try:
        axes = tuple(x.strip() for x in a.axes.split(",") if x.strip())
        settings_for(axes)
    except ValueError as e:
        ap.error(str(e))
    p = run(parse_lengths(a.lengths), a.reps, a.decode_tokens, a.preset, a.out, axes=axes)
    for k, v in p["summary"].items():
        print(k, {x: round(y, 3) for x, y in v.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
