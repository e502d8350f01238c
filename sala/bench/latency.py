"""Long-context latency: TTFT, end-to-end time, decode speed and peak memory vs context length (paper Figs. 2-3).

For each context length N: prefill N random tokens and decode `decode_tokens` tokens (greedy, EOS ignored)
through `SalaEngine` with the released 9B shape (random weights, bf16, batch 1) - the path `sala generate`
takes; with --quantization fp8, the same engine with FP8 projection and LM-head weights
(`SalaEngine.from_preset(..., quantization="fp8")`, Ada/Hopper GPUs only, refused at once elsewhere).
In the same process, the dense baseline (bf16 whatever --quantization says): HF transformers `Qwen3ForCausalLM`
with a Qwen3-8B shape (36 layers, hidden 4096, 32/8 heads, head_dim 128, SDPA, bf16, random weights), prefill
with logits_to_keep=1, then a few greedy decode steps through its DynamicCache; OOM is recorded as such.

The JSON is rewritten after every measurement, so a run cut short still leaves its results.

    python -m sala.bench.latency --out bench/results/latency_h200.json [--lengths 64K,128K,...] [--budget-s 360]
    python -m sala.bench.latency --quantization fp8 --lengths 256K,1M --decode-tokens 64 --out latency_fp8.json
"""
from __future__ import annotations

import argparse
import gc
import logging
import os
import time
from typing import Any

import torch

from sala.bench.common import run_metadata, write_json
from sala.utils.lengths import parse_length

logger = logging.getLogger(__name__)

DEFAULT_LENGTHS = (65536, 131072, 262144, 524288, 1048576, 2097152)
QUANTIZATIONS = ("none", "fp8")
# Latency targets per SALA quantization (docs/results.md; FP8: the issue's). The baseline is bf16 in both.
# ttft_256k_speedup: Qwen3-8B TTFT / SALA TTFT at 256K (same run); prefill_1m_s: SALA TTFT at 1M;
# peak_1m_gib: SALA peak allocated memory at 1M; decode_1m_tok_s: decode speed at 1M; 2m_completes: 2M runs.
TARGETS: dict[str, dict[str, float | bool]] = {
    "none": {"ttft_256k_speedup": 4.5, "prefill_1m_s": 40, "peak_1m_gib": 32, "decode_1m_tok_s": 100,
             "2m_completes": True},
    "fp8": {"ttft_256k_speedup": 6, "prefill_1m_s": 30, "peak_1m_gib": 24},
}
QWEN3_8B_SHAPE = dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=1 << 22,
                      rope_theta=1e6, tie_word_embeddings=False)


def _gib(n: float) -> float:
    return round(n / 2**30, 3)


def _free_cuda() -> None:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------- dense baseline
def build_qwen3_8b(device: str = "cuda", seed: int = 0):
    """HF Qwen3ForCausalLM, Qwen3-8B shape, random bf16 weights made on the device (meta -> to_empty)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(**QWEN3_8B_SHAPE)
    cfg._attn_implementation = "sdpa"
    from sala.engine.loading import materialize_random

    model = materialize_random(Qwen3ForCausalLM, cfg, device, torch.bfloat16, seed, std=0.02)
    with torch.no_grad():
        for m in model.modules():           # rotary buffers were on meta: recompute them on the device
            if hasattr(m, "inv_freq") and hasattr(m, "rope_init_fn"):
                inv, scaling = m.rope_init_fn(m.config, torch.device(device))
                m.inv_freq = inv
                m.attention_scaling = scaling
                if hasattr(m, "original_inv_freq"):
                    m.original_inv_freq = inv
    return model.eval()


@torch.no_grad()
def measure_baseline(model, n: int, decode_tokens: int, decode_measured: int, seed: int) -> dict[str, Any]:
    """Prefill n tokens (logits_to_keep=1) and greedy-decode `decode_measured` tokens; e2e is extrapolated to
    `decode_tokens` from the measured per-token time when fewer were measured."""
    from sala.modeling import cache_keyword, output_cache

    key = cache_keyword(model)
    g = torch.Generator(device="cuda")
    g.manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, n), device="cuda", generator=g)
    _free_cuda()
    torch.cuda.reset_peak_memory_stats()
    try:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        tok.tolist()
        ttft = time.perf_counter() - t0
        pkv = output_cache(out)
        del out
        out = model(input_ids=tok, use_cache=True, logits_to_keep=1, **{key: pkv})   # untimed warm-up step
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        pkv = output_cache(out)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        for _ in range(decode_measured - 1):
            out = model(input_ids=tok, use_cache=True, logits_to_keep=1, **{key: pkv})
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            tok.tolist()
            pkv = output_cache(out)
        dt = time.perf_counter() - t1
        per_token = dt / max(1, decode_measured - 1)
        res = {"status": "ok", "ttft_s": ttft, "decode_tokens_measured": decode_measured,
               "decode_tokens_per_s": 1.0 / per_token if per_token > 0 else None,
               "e2e_s": ttft + per_token * (decode_tokens - 1),
               "e2e_extrapolated": decode_measured < decode_tokens,
               "peak_gib": _gib(torch.cuda.max_memory_allocated())}
        del pkv
    except torch.OutOfMemoryError as e:
        res = {"status": "OOM", "error": str(e).splitlines()[0][:200],
               "peak_gib": _gib(torch.cuda.max_memory_allocated())}
    del ids
    _free_cuda()
    return res


# ----------------------------------------------------------------------------------------------- SALA
def warmup_tokens(chunk_size: int) -> int:
    """Prompt length of the untimed warm-up request: whole prefill chunks (at least 12288 tokens of them) and a
    partial one, so that both chunk shapes a long request meets are compiled."""
    return chunk_size * max(1, -(-12288 // chunk_size)) + max(1, chunk_size // 4)


def measure_sala(engine, n: int, decode_tokens: int, seed: int) -> dict[str, Any]:
    """One request through SalaEngine: prefill n random tokens, greedy-decode `decode_tokens` (EOS ignored)."""
    from sala.engine import SamplingParams

    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    ids = torch.randint(3, engine.config.vocab_size, (n,), generator=g).tolist()
    engine.cache = None
    _free_cuda()
    torch.cuda.reset_peak_memory_stats()
    try:
        res = engine.generate([ids], SamplingParams(max_new_tokens=decode_tokens, ignore_eos=True), add_bos=False)[0]
    except torch.OutOfMemoryError as e:
        engine.cache = None
        _free_cuda()
        return {"status": "OOM", "error": str(e).splitlines()[0][:200],
                "peak_gib": _gib(torch.cuda.max_memory_allocated())}
    out = {"status": "ok", "ttft_s": res.ttft_s, "e2e_s": res.total_s, "decode_tokens": len(res.token_ids),
           "decode_tokens_per_s": res.decode_tokens_per_s, "peak_gib": _gib(torch.cuda.max_memory_allocated()),
           "decode_mode": engine.decode_mode, "first_tokens": res.token_ids[:4]}
    engine.cache = None
    _free_cuda()
    return out


def profile_sala(engine, seed: int, n: int = 32768, steps: int = 8) -> dict[str, Any]:
    """Top CUDA kernels (torch.profiler) of one n-token prefill and `steps` eager decode steps."""
    from torch.profiler import ProfilerActivity, profile

    from sala.engine.forward import DecodeStep

    g = torch.Generator(device="cpu")
    g.manual_seed(seed + 1)
    ids = torch.randint(3, engine.config.vocab_size, (n,), generator=g).tolist()
    out: dict[str, Any] = {}
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            engine.prefill([ids], n + steps + 1)
            torch.cuda.synchronize()
        out[f"prefill_{n}"] = prof.key_averages().table(sort_by="cuda_time_total", row_limit=14,
                                                        max_name_column_width=60)
        step = DecodeStep(engine.runner, engine.cache)
        step()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
        out[f"decode_{steps}_steps_eager"] = prof.key_averages().table(sort_by="cuda_time_total", row_limit=14,
                                                                        max_name_column_width=60)
    except Exception as e:  # noqa: BLE001 - the profile is a diagnostic only
        out["error"] = f"{type(e).__name__}: {e}"
    engine.cache = None
    _free_cuda()
    for k, v in out.items():
        logger.info("== profile %s\n%s", k, v)
    return out


# ----------------------------------------------------------------------------------------------- driver
def run(lengths=DEFAULT_LENGTHS, decode_tokens: int = 1024, out_path: str = "latency.json", baseline: bool = True,
        baseline_max_len: int = 262144, baseline_decode_tokens: int = 16, chunk_size: int | None = None,
        budget_s: float | None = None, seed: int = 0, plots: bool = True, profile: bool = True,
        compile: bool = False, quantization: str = "none") -> dict:
    """Measure SALA (and the dense baseline up to `baseline_max_len`) at each length; write JSON to out_path.

    budget_s: wall-clock budget of the whole run; a length whose predicted cost would pass it decodes fewer
    tokens (down to 128) or is skipped, and the JSON says so.
    quantization: "none" (bf16) or "fp8" (SALA's projections and LM head in FP8; the baseline stays bf16);
    "fp8" raises Fp8UnsupportedError before anything is built or written where the GPU has no FP8 GEMMs.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("sala.bench.latency needs a CUDA GPU")
    from sala.engine import DEFAULT_CHUNK_SIZE, SalaEngine
    from sala.engine.memory import parameter_counts
    from sala.engine.quantization import resolve_quantization
    from sala.modeling import SalaConfig

    quantization = resolve_quantization(quantization, torch.device("cuda")) or "none"   # checks FP8 support

    start = time.perf_counter()
    lengths = sorted(int(n) for n in lengths)
    chunk_size = chunk_size or DEFAULT_CHUNK_SIZE
    payload: dict[str, Any] = {
        "benchmark": "latency", "meta": run_metadata(),
        "setup": {"batch": 1, "dtype": "bfloat16", "quantization": quantization, "weights": "random",
                  "decode_tokens": decode_tokens,
                  "sala": {"preset": "minicpm-sala-9b", "params": parameter_counts(
                      SalaConfig.from_preset("minicpm-sala-9b"))["total"], "chunk_size": chunk_size,
                      "compiled_prefill": compile, "quantization": quantization,
                      "weights_format": ("FP8 e4m3 projections + LM head (per-channel scales, per-token activation "
                                         "scales), rest bf16" if quantization == "fp8" else "bf16"),
                      "path": "SalaEngine.generate (chunked prefill + CUDA-graph decode), greedy, EOS ignored"},
                  "baseline": {"model": "HF transformers Qwen3ForCausalLM, Qwen3-8B shape", "shape": QWEN3_8B_SHAPE,
                               "dtype": "bfloat16",
                               "attn_implementation": "sdpa", "max_len": baseline_max_len,
                               "decode_tokens_measured": baseline_decode_tokens,
                               "note": "e2e = TTFT + decode_tokens x measured per-token time"}},
        "sala": {}, "baseline": {}, "notes": [],
    }

    def save() -> None:
        payload["elapsed_s"] = round(time.perf_counter() - start, 1)
        write_json(out_path, payload)

    def left() -> float:
        return float("inf") if budget_s is None else budget_s - (time.perf_counter() - start)

    save()
    if baseline:
        model = build_qwen3_8b()
        with torch.no_grad():   # warm-up: cuBLAS / SDPA handles out of the timings
            model(input_ids=torch.randint(0, 1000, (1, 4096), device="cuda"), use_cache=True, logits_to_keep=1)
        _free_cuda()
        for n in [n for n in lengths if n <= baseline_max_len]:
            r = measure_baseline(model, n, decode_tokens, baseline_decode_tokens, seed)
            payload["baseline"][str(n)] = r
            logger.info("baseline %8s: %s", n, r)
            save()
            if r["status"] == "OOM":
                break
        del model
        _free_cuda()
        for n in lengths:
            if n > baseline_max_len:
                payload["baseline"][str(n)] = {"status": "not run", "reason": f"beyond baseline_max_len "
                                               f"{baseline_max_len} (time budget; OOM at 512K on 139 GiB)"}
        save()

    t = time.perf_counter()
    engine = SalaEngine.from_preset("minicpm-sala-9b", random_weights=True, device="cuda", dtype="bf16",
                                    seed=seed, chunk_size=chunk_size, compile=compile,
                                    quantization=None if quantization == "none" else quantization)
    payload["sala_load_s"] = round(time.perf_counter() - t, 2)
    payload["sala_weights_gib"] = _gib(sum(p.numel() * p.element_size() for p in engine.model.parameters()))
    t = time.perf_counter()
    # compile the kernels, capture a graph once; one full prefill chunk plus a partial one, so that the timed
    # requests meet no first-use cost of the chunk's shapes (without it the first timed prefill pays them)
    measure_sala(engine, warmup_tokens(chunk_size), 16, seed)
    payload["sala_warmup_s"] = round(time.perf_counter() - t, 2)
    # the kernel variants that depend on the context length (top-k row widths, decode-selection capacity
    # classes): compiled here, untimed, as a server would at start-up, instead of inside each length's TTFT
    payload["sala_kernel_warmup_s"] = round(engine.warmup(max(lengths) + decode_tokens), 2)
    if profile:
        payload["profile"] = profile_sala(engine, seed)
    save()
    prev: tuple[int, float, float] | None = None    # (length, prefill s, decode s per token)
    for n in lengths:
        nd = decode_tokens
        if prev is not None and left() != float("inf"):
            pn, pt, pd = prev
            est_prefill = pt * (n / pn) * 1.15
            if est_prefill > left():
                payload["sala"][str(n)] = {"status": "skipped", "reason": f"time budget: predicted prefill "
                                           f"{est_prefill:.0f} s > {left():.0f} s left"}
                payload["notes"].append(f"{n}: skipped (time budget)")
                save()
                continue
            room = (left() - est_prefill - 5) / max(pd * 1.2, 1e-4)
            if room < nd:
                nd = max(128, int(room))
                payload["notes"].append(f"{n}: decoded {nd} tokens instead of {decode_tokens} (time budget); "
                                        "e2e_s_1024 extrapolates")
        r = measure_sala(engine, n, nd, seed)
        if r["status"] == "ok":
            per_tok = 1.0 / r["decode_tokens_per_s"] if r["decode_tokens_per_s"] else 0.0
            r["e2e_s_1024"] = r["ttft_s"] + per_tok * (decode_tokens - 1)
            prev = (n, r["ttft_s"], per_tok)
            b = payload["baseline"].get(str(n), {})
            if b.get("status") == "ok":
                r["ttft_speedup_vs_baseline"] = b["ttft_s"] / r["ttft_s"]
                r["e2e_speedup_vs_baseline"] = b["e2e_s"] / r["e2e_s_1024"]
        payload["sala"][str(n)] = r
        logger.info("sala     %8s: %s", n, r)
        save()
    payload["targets"] = _targets(payload)
    save()
    if plots:
        try:
            from sala.bench.plots import plot_latency

            plot_latency(payload, os.path.dirname(os.path.abspath(out_path)))
        except Exception as e:  # noqa: BLE001 - plots are optional on the device
            logger.warning("plots skipped: %s: %s", type(e).__name__, e)
    return payload


def _targets(p: dict) -> dict:
    """The latency targets of the run's quantization (TARGETS), checked against this run; a target whose
    measurement is missing (length not run, OOM, no baseline) is left out."""
    s, b = p["sala"], p["baseline"]
    want = TARGETS[p.get("setup", {}).get("quantization", "none")]
    s256, b256, s1m = s.get("262144", {}), b.get("262144", {}), s.get("1048576", {})
    # name -> (measured value or None where not measured, ">=" or "<=", digits)
    measured = {
        "ttft_256k_speedup": ((b256["ttft_s"] / s256["ttft_s"]) if s256.get("status") == "ok"
                              and b256.get("status") == "ok" else None, ">=", 2),
        "prefill_1m_s": (s1m.get("ttft_s") if s1m.get("status") == "ok" else None, "<=", 2),
        "peak_1m_gib": (s1m.get("peak_gib") if s1m.get("status") == "ok" else None, "<=", None),
        "decode_1m_tok_s": (s1m.get("decode_tokens_per_s") if s1m.get("status") == "ok" else None, ">=", 1),
    }
    out: dict[str, Any] = {}
    for name, (value, op, digits) in measured.items():
        if name not in want or value is None:
            continue
        t = want[name]
        out[f"{name}{op}{t:g}"] = {"value": value if digits is None else round(value, digits),
                                   "met": value >= t if op == ">=" else value <= t}
    if want.get("2m_completes"):
        out["2m_completes"] = {"met": s.get("2097152", {}).get("status") == "ok"}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sala.bench.latency", description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="64K,128K,256K,512K,1M,2M", help="comma-separated context lengths")
    ap.add_argument("--decode-tokens", type=int, default=1024)
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "latency.json"))
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--baseline-max-len", default="256K")
    ap.add_argument("--baseline-decode-tokens", type=int, default=16)
    ap.add_argument("--chunk-size", type=int, default=None)
    ap.add_argument("--budget-s", type=float, default=None, help="wall-clock budget of the whole run (seconds)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--compile", action="store_true",
                    help="SalaEngine(compile=True): torch.compile the prefill's elementwise pieces (warm-up compiles)")
    ap.add_argument("--quantization", choices=QUANTIZATIONS, default="none",
                    help="SALA's weights: none (bf16) or fp8 (FP8 projections + LM head, Ada/Hopper GPUs; "
                         "its own targets); the Qwen3-8B baseline stays bf16")
    args = ap.parse_args(argv)
    if args.quantization == "fp8":      # refuse now, before the baseline and the engine are built
        from sala.ops.fp8 import Fp8UnsupportedError, check_fp8_supported

        try:
            check_fp8_supported("cuda")
        except Fp8UnsupportedError as e:
            ap.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(message)s")   # run()'s progress lines, on stderr
    run([parse_length(x) for x in args.lengths.split(",") if x.strip()], args.decode_tokens, args.out,
        baseline=not args.no_baseline, baseline_max_len=parse_length(args.baseline_max_len),
        baseline_decode_tokens=args.baseline_decode_tokens, chunk_size=args.chunk_size, budget_s=args.budget_s,
        compile=args.compile, quantization=args.quantization,
        plots=not args.no_plots, profile=not args.no_profile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
