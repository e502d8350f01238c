"""Benchmark of the Lightning attention kernels against fla, in one process on one GPU.

Measures (32 heads x 128, bf16, batch 1 unless said): forward and forward+backward of
`sala.ops.lightning_attention` (Triton) vs fla `chunk_simple_gla(q, k, v, g_gamma=log_decay)`, and the
decode step vs fla `fused_recurrent_simple_gla` (also ours inside a CUDA graph), with medians, ratios
(fla time / our time: > 1 means we are faster) and relative errors of both against an fp32 reference.

    python -m sala.bench.kernels_lightning --out bench/results/lightning_kernels.json
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
from typing import Any

import torch

from sala.bench.common import bench_ms, device_kernel_table, run_metadata, write_json
from sala.ops.lightning_plan import DEFAULT_CONFIG, LightningConfig

log = logging.getLogger(__name__)

HEADS, HEAD_DIM, DTYPE = 32, 128, torch.bfloat16
REF_PREFIX = 16384  # fp32 reference length: longer runs are checked on their first REF_PREFIX tokens (causal)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def _inputs(t: int, batch: int = 1, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    shape = (batch, t, HEADS, HEAD_DIM)
    q = torch.randn(shape, generator=g, device="cuda", dtype=DTYPE)
    k = torch.randn(shape, generator=g, device="cuda", dtype=DTYPE)
    v = torch.randn(shape, generator=g, device="cuda", dtype=DTYPE)
    return q, k, v


def _load_fla():
    try:
        from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla
    except Exception as exc:  # fla is an optional benchmark dependency
        log.warning("fla not available (%s); measuring ours only", exc)
        return None
    return chunk_simple_gla, fused_recurrent_simple_gla


def _free():
    gc.collect()
    torch.cuda.empty_cache()


def _kernel_resources(lt) -> dict:
    """Registers per thread and spilled bytes of the latest forward launch's kernels (as compiled on this GPU)."""
    return {role: {"regs": getattr(k, "n_regs", None), "spills": getattr(k, "n_spills", None)}
            for role, k in lt.LAST_KERNELS.items()}


def _tune_forward(t: int, log_decay: torch.Tensor, base: LightningConfig) -> tuple[dict, LightningConfig]:
    """Time a few launch configurations of the forward at length t: (the trials, the fastest config)."""
    from sala.ops import lightning_triton as lt
    from sala.ops.lightning import lightning_attention

    q, k, v = _inputs(t)
    trials = []
    # (chunk, V tile, warps, stages, factored intra-chunk decay) -> segment lengths in chunks (0: automatic); the
    # table-decay settings kept are the best of earlier, wider sweeps
    grid = [((64, 64, 4, 2, False), (0, 64)), ((128, 128, 8, 2, False), (0, 64)),
            ((64, 64, 4, 2, True), (0, 64)), ((128, 128, 8, 2, True), (0, 32, 64)), ((128, 128, 8, 3, True), (0,)),
            ((64, 128, 8, 2, True), (0,)), ((128, 64, 8, 2, True), (0,))]
    for (chunk, block_v, warps, stages, factored), cps_list in grid:
        for cps in cps_list:
            cfg = dataclasses.replace(base, chunk=chunk, block_v=block_v, num_warps=warps, num_stages=stages,
                                      chunks_per_segment=cps, intra_factored=factored)
            try:
                ms = bench_ms(lambda: lightning_attention(q, k, v, log_decay, config=cfg), warmup=2, rep=10)
            except Exception as exc:  # a config that does not compile (e.g. out of shared memory)
                trials.append({"config": dataclasses.asdict(cfg), "error": repr(exc)[:200]})
                continue
            trials.append({"config": dataclasses.asdict(cfg), "fwd_ms": ms, "kernels": _kernel_resources(lt)})
            log.info("tune T=%d chunk=%d bv=%d warps=%d stages=%d cps=%d factored=%s: %.3f ms %s", t, chunk,
                     block_v, warps, stages, cps, factored, ms, _kernel_resources(lt))
    # chosen among automatic segment lengths only: one setting serves every T of the run, and a fixed segment length
    # tuned at one long T starves short sequences of programs
    ok = [x for x in trials if "fwd_ms" in x and x["config"]["chunks_per_segment"] == 0]
    best = min(ok, key=lambda x: x["fwd_ms"]) if ok else {"config": dataclasses.asdict(base)}
    q = k = v = None  # free the memory
    _free()
    return {"length": t, "trials": trials, "chosen": best}, LightningConfig(**best["config"])


def _decode_graph_us(q, k, v, log_decay, state, out, config: LightningConfig, n: int = 100) -> float:
    """Microseconds per decode step of a replayed one-step CUDA graph (the state bandwidth bound)."""
    from sala.ops.lightning import lightning_decode_step

    scale = HEAD_DIM ** -0.5
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            lightning_decode_step(q, k, v, log_decay, state, scale=scale, out=out, config=config)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        lightning_decode_step(q, k, v, log_decay, state, scale=scale, out=out, config=config)

    def graph_loop():
        for _ in range(n):
            graph.replay()
    us = 1e3 * bench_ms(graph_loop, warmup=2, rep=5) / n
    graph = None  # free the memory
    return us


def _tune_decode(batch: int, log_decay: torch.Tensor, base: LightningConfig) -> tuple[dict, LightningConfig]:
    """Time the decode kernel's launch settings (V tile, warps) in a CUDA graph at `batch`: (the trials, `base`
    with the fastest)."""
    g = torch.Generator(device="cuda").manual_seed(batch)
    q, k, v = (torch.randn(batch, HEADS, HEAD_DIM, generator=g, device="cuda", dtype=DTYPE) for _ in range(3))
    state = torch.randn(batch, HEADS, HEAD_DIM, HEAD_DIM, generator=g, device="cuda") * 0.1
    out = torch.empty(batch, HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    trials = []
    for block_v in (16, 32, 64, 128):
        for warps in (1, 2, 4, 8):
            cfg = dataclasses.replace(base, decode_block_v=block_v, decode_num_warps=warps)
            try:
                us = _decode_graph_us(q, k, v, log_decay, state, out, cfg)
            except Exception as exc:  # a setting that does not compile or launch
                trials.append({"decode_block_v": block_v, "decode_num_warps": warps, "error": repr(exc)[:200]})
                continue
            trials.append({"decode_block_v": block_v, "decode_num_warps": warps, "graph_us": us,
                           "state_GBps": 2 * state.numel() * 4 / (us * 1e-6) / 1e9})
            log.info("tune decode B=%d bv=%d warps=%d: %.1f us", batch, block_v, warps, us)
    ok = [x for x in trials if "graph_us" in x]
    best = min(ok, key=lambda x: x["graph_us"]) if ok else None
    chosen = base if best is None else dataclasses.replace(
        base, decode_block_v=best["decode_block_v"], decode_num_warps=best["decode_num_warps"])
    q = k = v = state = out = None  # free the memory
    _free()
    return {"batch": batch, "trials": trials, "chosen": best,
            "default": {"decode_block_v": base.decode_block_v, "decode_num_warps": base.decode_num_warps}}, chosen


def _prefill(lengths: list[int], fwd_bwd_max: int, log_decay: torch.Tensor, fla, config: LightningConfig
             ) -> list[dict]:
    from sala.ops.lightning import lightning_attention
    from sala.ops.lightning_reference import lightning_attention_chunked

    scale = HEAD_DIM ** -0.5
    rows = []
    for t in lengths:
        row: dict[str, Any] = {"T": t, "batch": 1, "heads": HEADS, "head_dim": HEAD_DIM, "dtype": "bfloat16"}
        q, k, v = _inputs(t)
        ours = lambda: lightning_attention(q, k, v, log_decay, scale=scale, config=config)  # noqa: E731
        row["ours_fwd_ms"] = bench_ms(ours)
        o_ours = ours()[0]
        row["ours_finite"] = bool(torch.isfinite(o_ours).all())
        n_ref = min(t, REF_PREFIX)
        ref = lightning_attention_chunked(q[:, :n_ref].float(), k[:, :n_ref].float(), v[:, :n_ref].float(),
                                          log_decay, scale=scale)[0]
        row["ref_tokens"] = n_ref
        row["ours_rel_err"] = _rel_err(o_ours[:, :n_ref], ref)
        o_ours = None  # free the memory
        if fla is not None:
            chunk_fla = lambda: fla[0](q, k, v, g_gamma=log_decay, scale=scale)  # noqa: E731
            row["fla_fwd_ms"] = bench_ms(chunk_fla)
            row["fwd_speedup_vs_fla"] = row["fla_fwd_ms"] / row["ours_fwd_ms"]
            o_fla = chunk_fla()[0]
            row["fla_rel_err"] = _rel_err(o_fla[:, :n_ref], ref)
            o_fla = None  # free the memory
        ref = None  # free the memory
        _free()
        if t <= fwd_bwd_max:
            qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
            do = torch.randn_like(q)

            def fwd_bwd(fn):
                def step():
                    qg.grad = kg.grad = vg.grad = None
                    fn(qg, kg, vg)[0].backward(do)
                return step

            def ours_step(a, b, c):
                return lightning_attention(a, b, c, log_decay, scale=scale, config=config)

            row["ours_fwd_bwd_ms"] = bench_ms(fwd_bwd(ours_step))
            if t <= 4096:  # gradient error against the fp32 reference
                fwd_bwd(ours_step)()
                g_ours = [x.grad.clone() for x in (qg, kg, vg)]
                qr, kr, vr = (x.detach().float().requires_grad_() for x in (q, k, v))
                lightning_attention_chunked(qr, kr, vr, log_decay, scale=scale)[0].backward(do.float())
                row["ours_grad_rel_err"] = {n: _rel_err(a, b.grad) for n, a, b in
                                            zip(("dq", "dk", "dv"), g_ours, (qr, kr, vr))}
            if fla is not None:
                row["fla_fwd_bwd_ms"] = bench_ms(fwd_bwd(lambda a, b, c: fla[0](a, b, c, g_gamma=log_decay,
                                                                                 scale=scale)))
                row["fwd_bwd_speedup_vs_fla"] = row["fla_fwd_bwd_ms"] / row["ours_fwd_bwd_ms"]
                if t <= 4096:
                    fwd_bwd(lambda a, b, c: fla[0](a, b, c, g_gamma=log_decay, scale=scale))()
                    row["fla_grad_rel_err"] = {n: _rel_err(a.grad, b.grad) for n, a, b in
                                               zip(("dq", "dk", "dv"), (qg, kg, vg), (qr, kr, vr))}
            qg = kg = vg = do = None  # free the memory
        q = k = v = None  # free the memory
        _free()
        log.info("%s", row)
        rows.append(row)
    return rows


def _decode(batches: list[int], log_decay: torch.Tensor, fla, config: LightningConfig) -> list[dict]:
    from sala.ops.lightning import lightning_decode_step
    from sala.ops.lightning_reference import lightning_decode_step_reference

    scale = HEAD_DIM ** -0.5
    rows = []
    for b in batches:
        g = torch.Generator(device="cuda").manual_seed(b)
        q, k, v = (torch.randn(b, HEADS, HEAD_DIM, generator=g, device="cuda", dtype=DTYPE) for _ in range(3))
        state = torch.randn(b, HEADS, HEAD_DIM, HEAD_DIM, generator=g, device="cuda") * 0.1
        state_bytes = state.numel() * 4
        row: dict[str, Any] = {"batch": b, "heads": HEADS, "head_dim": HEAD_DIM, "state_bytes": state_bytes,
                               "state_rw_bytes": 2 * state_bytes}
        # error of one step against the fp32 reference (same starting state)
        s_ours, s_ref = state.clone(), state.clone()
        o_ours = lightning_decode_step(q, k, v, log_decay, s_ours, scale=scale, config=config)
        o_ref = lightning_decode_step_reference(q.float(), k.float(), v.float(), log_decay, s_ref, scale=scale)
        row["ours_rel_err"] = _rel_err(o_ours, o_ref)
        row["ours_state_rel_err"] = _rel_err(s_ours, s_ref)
        out = torch.empty(b, HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
        n = 100
        # the launch cache (config.fast_launch) against Triton's own launch: one call, and many back to back (host
        # launch rate vs GPU time)
        for suffix, cfg in (("", config), ("_jit_launch", dataclasses.replace(config, fast_launch=False))):
            def step(cfg=cfg):
                lightning_decode_step(q, k, v, log_decay, s_ours, scale=scale, out=out, config=cfg)

            def loop(step=step):
                for _ in range(n):
                    step()
            row[f"ours_us{suffix}"] = 1e3 * bench_ms(step, warmup=10, rep=200)
            row[f"ours_us_back_to_back{suffix}"] = 1e3 * bench_ms(loop, warmup=2, rep=5) / n
        row["ours_graph_us"] = _decode_graph_us(q, k, v, log_decay, s_ours, out, config, n)   # CUDA graph of one step
        row["ours_graph_state_GBps"] = 2 * state_bytes / (row["ours_graph_us"] * 1e-6) / 1e9
        if fla is not None:
            q1, k1, v1 = q[:, None], k[:, None], v[:, None]
            fused = lambda: fla[1](q1, k1, v1, g_gamma=log_decay, scale=scale,  # noqa: E731
                                   initial_state=state, output_final_state=True)
            row["fla_us"] = 1e3 * bench_ms(fused, warmup=10, rep=200)
            o_fla, _ = fused()
            row["fla_rel_err"] = _rel_err(o_fla[:, 0], o_ref)
            row["speedup_vs_fla"] = row["fla_us"] / row["ours_us"]
        state = s_ours = s_ref = None  # free the memory
        _free()
        log.info("%s", row)
        rows.append(row)
    return rows


def _long_finite(t: int, log_decay: torch.Tensor, config: LightningConfig) -> dict:
    """Our forward at a very long length: outputs and final state must stay finite."""
    from sala.ops.lightning import lightning_attention

    q, k, v = _inputs(t, seed=7)
    o, f = lightning_attention(q, k, v, log_decay, output_final_state=True, config=config)
    res = {"T": t, "output_finite": bool(torch.isfinite(o).all()), "final_state_finite": bool(torch.isfinite(f).all()),
           "output_abs_max": float(o.abs().max())}
    q = k = v = o = f = None  # free the memory
    _free()
    return res


def _kernel_breakdown(t: int, log_decay: torch.Tensor, config: LightningConfig, reps: int = 5) -> dict:
    """Device time per call of each of our kernels (segment states, scan, outputs) at length t, forward and
    forward + backward, from torch.profiler: where the forward's time goes against fla's."""
    from sala.ops.lightning import lightning_attention

    q, k, v = _inputs(t)
    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
    do = torch.randn_like(q)

    def fwd():
        lightning_attention(q, k, v, log_decay, config=config)

    def fwd_bwd():
        qg.grad = kg.grad = vg.grad = None
        lightning_attention(qg, kg, vg, log_decay, config=config)[0].backward(do)

    out: dict[str, Any] = {"T": t, "reps": reps}
    for name, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
        fn()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                fn()
            torch.cuda.synchronize()
        out[name] = {r["name"][:80]: {"calls_per_op": r["calls"] / reps, "ms_per_op": r["device_ms"] / reps}
                     for r in device_kernel_table(prof, top=8)}
    q = k = v = qg = kg = vg = do = None  # free the memory
    _free()
    return out


DEFAULT_LENGTHS = (4096, 16384, 65536, 262144, 1048576)
DEFAULT_DECODE_BATCHES = (1, 16, 64)


def run(lengths: list[int] = DEFAULT_LENGTHS, decode_batches: list[int] = DEFAULT_DECODE_BATCHES,
        out_path: str = "lightning_kernels.json", with_fla: bool = True,
        fwd_bwd_max: int = 262144, tune_length: int = 65536, finite_length: int = 2 * 1024 * 1024) -> dict:
    """Run the benchmark on the current CUDA device and write JSON to `out_path`. Returns the payload."""
    if not torch.cuda.is_available():
        raise RuntimeError("the lightning kernel benchmark needs a CUDA GPU")
    from sala.ops.slopes import lightning_log_decay

    log_decay = lightning_log_decay(HEADS, "cuda")
    fla = _load_fla() if with_fla else None
    payload: dict[str, Any] = {"benchmark": "lightning_kernels", "meta": run_metadata(),
                               "notes": [f"errors are relative L2 errors vs an fp32 PyTorch reference; for T > "
                                         f"{REF_PREFIX} on the first {REF_PREFIX} tokens (outputs are causal)",
                                         "speedup = fla time / our time (> 1: ours faster)",
                                         "decode ours_us: one call timed by CUDA events incl. host launch; "
                                         "graph: per step of a replayed one-step CUDA graph"]}
    # the tuned launch settings (the defaults without tuning) are passed to every measurement below
    config = DEFAULT_CONFIG
    payload["tuning"] = payload["decode_tuning"] = None
    if tune_length:
        payload["tuning"], config = _tune_forward(tune_length, log_decay, config)
        if decode_batches:
            payload["decode_tuning"], config = _tune_decode(max(decode_batches), log_decay, config)
    payload["config"] = dataclasses.asdict(config)
    payload["default_config"] = dataclasses.asdict(DEFAULT_CONFIG)
    if tune_length:
        try:
            payload["kernel_breakdown"] = _kernel_breakdown(tune_length, log_decay, config)
        except Exception as exc:  # the profiler is a diagnostic; the benchmark goes on without it
            payload["kernel_breakdown"] = {"error": repr(exc)[:200]}
    payload["prefill"] = _prefill(lengths, fwd_bwd_max, log_decay, fla, config)
    payload["decode"] = _decode(decode_batches, log_decay, fla, config)
    if finite_length:
        payload["long_finite"] = _long_finite(finite_length, log_decay, config)
    payload["fla"] = fla is not None
    write_json(out_path, payload)
    return payload


def markdown_table(payload: dict) -> str:
    """Markdown tables (prefill, decode) from a benchmark payload written by `run`."""
    def f(x, fmt="{:.2f}"):
        return "-" if x is None else fmt.format(x)

    lines = ["| T | ours fwd ms | fla fwd ms | fwd speedup | ours fwd+bwd ms | fla fwd+bwd ms | fwd+bwd speedup "
             "| rel err ours / fla |", "|---|---|---|---|---|---|---|---|"]
    for r in payload.get("prefill", []):
        lines.append(f"| {r['T']} | {f(r.get('ours_fwd_ms'))} | {f(r.get('fla_fwd_ms'))} | "
                     f"{f(r.get('fwd_speedup_vs_fla'))}x | {f(r.get('ours_fwd_bwd_ms'))} | "
                     f"{f(r.get('fla_fwd_bwd_ms'))} | "
                     f"{f(r.get('fwd_bwd_speedup_vs_fla'))}x | {f(r.get('ours_rel_err'), '{:.1e}')} / "
                     f"{f(r.get('fla_rel_err'), '{:.1e}')} |")
    lines += ["", "| decode batch | ours us/call | ours us/call back to back | same, Triton's launch | "
                  "ours in CUDA graph us | state GB/s (graph) | fla us/call | speedup |",
              "|---|---|---|---|---|---|---|---|"]
    for r in payload.get("decode", []):
        lines.append(f"| {r['batch']} | {f(r.get('ours_us'), '{:.1f}')} | "
                     f"{f(r.get('ours_us_back_to_back'), '{:.1f}')} | "
                     f"{f(r.get('ours_us_back_to_back_jit_launch'), '{:.1f}')} | "
                     f"{f(r.get('ours_graph_us'), '{:.1f}')} | "
                     f"{f(r.get('ours_graph_state_GBps'), '{:.0f}')} | {f(r.get('fla_us'), '{:.1f}')} | "
                     f"{f(r.get('speedup_vs_fla'))}x |")
    return "\n".join(lines)


def main(args: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="JSON output path")
    p.add_argument("--table", metavar="JSON", help="print markdown tables from an existing result file and exit")
    p.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)))
    p.add_argument("--decode-batches", default="1,16,64")
    p.add_argument("--fwd-bwd-max", type=int, default=262144)
    p.add_argument("--tune-length", type=int, default=65536,
                   help="0: no config sweep (forward at this length; decode at the largest decode batch)")
    p.add_argument("--finite-length", type=int, default=2 * 1024 * 1024, help="0: skip the long finiteness run")
    p.add_argument("--no-fla", action="store_true")
    a = p.parse_args(args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if a.table:
        import json

        with open(a.table) as fh:
            print(markdown_table(json.load(fh)))
        return 0
    if not a.out:
        p.error("--out is required (or --table JSON)")
    run([int(x) for x in a.lengths.split(",") if x], [int(x) for x in a.decode_batches.split(",") if x], a.out,
        with_fla=not a.no_fla, fwd_bwd_max=a.fwd_bwd_max, tune_length=a.tune_length,
        finite_length=a.finite_length)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
