"""FP8 against bf16 in one process: quality on the bundled model, logits accuracy and speed on the 9B shape.

Part "bundled": the bundled model (or --model) in the baseline dtype (bf16 on GPU), then the same model with FP8
projections and LM head (`quantize_model_fp8`): niah_single accuracy (sala.eval's runner, same seeded prompts),
held-out loss (sala.eval.heldout, same windows: a packed dataset's held-out split with --data, else evenly spaced
windows of the Python standard library's sources, the bundled model's training domain) and the logits on those
windows (relative error, top-1 agreement).

Part "shape": a preset shape (default minicpm-sala-9b) with random weights made on the device. The baseline first:
logits at evenly spaced positions of a long random prompt through the engine's chunked prefill, then TTFT,
decode speed and peak memory per context length; then the same weights quantized in place and the same
measurements. Each part has "baseline", "fp8" and "fp8_vs_baseline" (deltas, speed-ups, target checks).

The JSON is rewritten after every measurement, so a run cut short keeps what it measured.

    python -m sala.bench.fp8 --out bench/results/fp8_h100.json                       # GPU, both parts
    python -m sala.bench.fp8 --reference --device cpu --preset sala-tiny ...          # CPU, the reference path
"""
from __future__ import annotations

import argparse
import gc
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from sala.bench.common import run_metadata, write_json
from sala.utils.lengths import parse_length

logger = logging.getLogger(__name__)

DEFAULT_LENGTHS = (65536, 131072, 262144)
DEFAULT_NIAH_LENGTHS = (1024, 2048, 4096)
NIAH_TASK = "niah_single"
# Targets of the FP8 path on the bundled model (issue 29).
NIAH_POINTS_TARGET = 2.0
LOSS_NATS_TARGET = 0.02


def _gib(n: float) -> float:
    return round(n / 2**30, 3)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def logits_agreement(ref: torch.Tensor, test: torch.Tensor) -> dict[str, float]:
    """Relative error ||test - ref|| / ||ref|| over all logits [P, V] (and its mean over rows), top-1 agreement."""
    ref, test = ref.float(), test.float()
    diff = (test - ref).flatten(0, -2)
    r = ref.flatten(0, -2)
    row_rel = diff.norm(dim=-1) / r.norm(dim=-1).clamp(min=1e-30)
    return {"rel_error": float(diff.norm() / r.norm().clamp(min=1e-30)),
            "rel_error_mean_row": float(row_rel.mean()), "rel_error_max_row": float(row_rel.max()),
            "top1_agreement": float((ref.argmax(-1) == test.argmax(-1)).float().mean()),
            "positions": int(r.shape[0])}


# ----------------------------------------------------------------------------------------------- bundled model
def stdlib_windows(tok, num: int, seq_len: int) -> tuple[torch.Tensor, str]:
    """Evenly spaced windows [num', seq_len] of the token stream of the standard library's top-level .py files
    (sorted by name, read until there are 2 * num * seq_len tokens)."""
    from sala.eval.heldout import windows_of

    folder = Path(argparse.__file__).parent
    ids: list[int] = []
    for f in sorted(folder.glob("*.py")):
        ids.extend(tok.encode(f.read_text(encoding="utf-8", errors="replace")))
        if len(ids) >= 2 * num * seq_len:
            break
    return windows_of(ids, num, seq_len, where=f"python stdlib {folder}"), f"python stdlib {folder} (*.py)"


def _quality(model, tok, windows: torch.Tensor, niah_lengths: list[int], niah_samples: int, batch: int,
             log: Callable[[str], None]) -> tuple[dict, torch.Tensor]:
    from sala.eval.heldout import model_heldout_loss
    from sala.eval.runner import run_tasks

    out: dict[str, Any] = {}
    if niah_lengths:
        rep = run_tasks(None, niah_lengths, [NIAH_TASK], num_samples=niah_samples, model=model, tokenizer=tok,
                        log=log)
        res = rep["results"][NIAH_TASK]
        out["niah"] = {str(L): res[str(L)]["score"] for L in niah_lengths}
        out["niah_mean"] = sum(out["niah"].values()) / len(niah_lengths)
        out["niah_misses"] = {str(L): res[str(L)]["misses"][:5] for L in niah_lengths}
    dev = next(model.parameters()).device
    out["heldout_loss"] = model_heldout_loss(model, windows, batch)
    with torch.no_grad():   # the logits of the first windows (one batch), compared between the two precisions
        logits = model(input_ids=windows[:batch].to(dev), use_cache=False).logits[:, :-1]
    return out, logits.float().reshape(-1, logits.shape[-1]).cpu()


def bundled_quality(model_dir: str | None, device: torch.device, dtype: torch.dtype, backend: str,
                    niah_lengths: list[int], niah_samples: int, num_windows: int, seq_len: int,
                    data: str | None = None, batch: int = 4, skip: tuple[str, ...] = (), fast_accum: bool = False,
                    log: Callable[[str], None] = logger.info) -> dict:
    """The baseline (the model in `dtype`) then FP8 on the same model, prompts and windows; returns the report
    section."""
    from sala.engine.loading import load_model_dir
    from sala.eval.heldout import heldout_windows
    from sala.eval.runner import default_model
    from sala.modeling.fp8 import quantize_model_fp8
    from sala.modeling.tokenizer import load_tokenizer

    model_dir = model_dir or default_model()
    tok = load_tokenizer(model_dir)
    if data:
        windows, source = heldout_windows(data, num_windows, seq_len), f"{data} (val split)"
    else:
        windows, source = stdlib_windows(tok, num_windows, seq_len)
    model = load_model_dir(model_dir, device=device, dtype=dtype)
    report: dict[str, Any] = {"model": str(model_dir), "dtype": str(dtype).removeprefix("torch."), "backend": backend,
                              "windows": {"source": source, "num": len(windows), "seq_len": seq_len},
                              "niah": {"task": NIAH_TASK, "lengths": niah_lengths, "samples": niah_samples}}
    log(f"bundled: {str(dtype).removeprefix('torch.')}")
    base, base_logits = _quality(model, tok, windows, niah_lengths, niah_samples, batch, log)
    report["baseline"] = base
    report["quantized_layers"] = len(quantize_model_fp8(model, backend=backend, skip=skip, fast_accum=fast_accum))
    report["skip"], report["fast_accum"] = list(skip), fast_accum
    log("bundled: fp8")
    fp8, fp8_logits = _quality(model, tok, windows, niah_lengths, niah_samples, batch, log)
    report["fp8"] = fp8
    cmp: dict[str, Any] = {"heldout_loss_delta_nats": fp8["heldout_loss"] - base["heldout_loss"],
                           "logits": logits_agreement(base_logits, fp8_logits)}
    if niah_lengths:
        cmp["niah_delta_points"] = {L: fp8["niah"][L] - base["niah"][L] for L in base["niah"]}
        cmp["niah_mean_delta_points"] = fp8["niah_mean"] - base["niah_mean"]
        cmp["niah_within_target"] = all(abs(d) <= NIAH_POINTS_TARGET or d > 0
                                        for d in cmp["niah_delta_points"].values())
    cmp["loss_within_target"] = cmp["heldout_loss_delta_nats"] <= LOSS_NATS_TARGET
    cmp["targets"] = {"niah_points": NIAH_POINTS_TARGET, "loss_nats": LOSS_NATS_TARGET}
    report["fp8_vs_baseline"] = cmp
    del model
    _free(device)
    return report


# ----------------------------------------------------------------------------------------------- 9B shape
@torch.no_grad()
def sampled_logits(engine, ids: torch.Tensor, positions: int) -> torch.Tensor:
    """Logits [P, V] fp32 (on the CPU) at `positions` evenly spaced positions of ids [T], through the engine's
    chunked prefill into a fresh cache (the last position always among them)."""
    T = ids.shape[0]
    want = torch.linspace(0, T - 1, min(positions, T)).round().long().unique()
    engine.allocate(1, T)
    rows = []
    for s in range(0, T, engine.chunk_size):
        h = engine.runner.prefill_chunk(ids[s:s + engine.chunk_size], engine.cache, 0)
        local = want[(want >= s) & (want < s + h.shape[1])] - s
        if len(local):
            rows.append(engine.runner.logits_of(h[:, local.to(h.device)])[0].cpu())
        del h
    engine.cache = None
    return torch.cat(rows)


def measure_request(engine, n: int, decode_tokens: int, seed: int) -> dict[str, Any]:
    """One request through the engine: prefill n random tokens, greedy-decode `decode_tokens` (EOS ignored)."""
    from sala.engine import SamplingParams

    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    ids = torch.randint(3, engine.config.vocab_size, (n,), generator=g).tolist()
    dev = engine.device
    engine.cache = None
    _free(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    try:
        r = engine.generate([ids], SamplingParams(max_new_tokens=decode_tokens, ignore_eos=True), add_bos=False)[0]
    except torch.OutOfMemoryError as e:
        engine.cache = None
        _free(dev)
        return {"status": "OOM", "error": str(e).splitlines()[0][:200]}
    out = {"status": "ok", "ttft_s": r.ttft_s, "e2e_s": r.total_s, "decode_tokens": len(r.token_ids),
           "decode_tokens_per_s": r.decode_tokens_per_s, "decode_mode": engine.decode_mode,
           "first_tokens": r.token_ids[:4]}
    if dev.type == "cuda":
        out["peak_gib"] = _gib(torch.cuda.max_memory_allocated(dev))
    engine.cache = None
    _free(dev)
    return out


def _measure_precision(engine, prompt: torch.Tensor, positions: int, lengths: list[int], decode_tokens: int,
                       seed: int, warmup: int, deadline: float | None, save: Callable[[], None],
                       section: dict) -> torch.Tensor:
    """Fill `section` with weight size and speed per length; returns the sampled logits [P, V]."""
    section["weights_bytes"] = _weight_bytes(engine.model)
    section["weights_gib"] = _gib(section["weights_bytes"])
    logits = sampled_logits(engine, prompt, positions)
    save()
    if warmup:
        measure_request(engine, warmup, 2, seed + 1)    # untimed: kernels compile, graphs capture
    section["speed"] = {}
    for n in lengths:
        if deadline is not None and time.perf_counter() > deadline:
            section["speed"][str(n)] = {"status": "skipped (time budget)"}
            continue
        section["speed"][str(n)] = measure_request(engine, n, decode_tokens, seed)
        save()
    return logits


def shape_accuracy_and_speed(preset: str, device: torch.device, dtype: torch.dtype, backend: str,
                             accuracy_tokens: int, positions: int, lengths: list[int], decode_tokens: int,
                             chunk_size: int, seed: int = 0, use_cuda_graph: bool = True,
                             budget_s: float | None = None, warmup: int | None = None, skip: tuple[str, ...] = (),
                             fast_accum: bool = False,
                             on_update: Callable[[dict], None] | None = None,
                             log: Callable[[str], None] = logger.info) -> dict:
    """The baseline then FP8 (the same random weights, quantized in place) on a preset shape; see the module
    docstring. FP8 measures exactly the lengths the baseline completed. Returns the report section (logits
    compared, not stored)."""
    from sala.bench.latency import warmup_tokens
    from sala.engine import SalaEngine
    from sala.engine.loading import random_model
    from sala.modeling import SalaConfig
    from sala.modeling.fp8 import quantize_model_fp8

    config = SalaConfig.from_preset(preset)
    report: dict[str, Any] = {"preset": preset, "dtype": str(dtype).removeprefix("torch."), "backend": backend,
                              "chunk_size": chunk_size, "accuracy_tokens": accuracy_tokens,
                              "decode_tokens": decode_tokens, "lengths": lengths}
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    prompt = torch.randint(3, config.vocab_size, (accuracy_tokens,), generator=g).to(device)
    if warmup is None:
        warmup = min(warmup_tokens(chunk_size), max(lengths)) if lengths else 0
    deadline = time.perf_counter() + budget_s if budget_s else None

    def save() -> None:
        if on_update is not None:
            on_update(report)

    model = random_model(config, device, dtype, seed)
    engine = SalaEngine(model, None, chunk_size=chunk_size, use_cuda_graph=use_cuda_graph, check_memory=False)
    base: dict[str, Any] = {}
    report["baseline"] = base
    log(f"{preset}: {report['dtype']}")
    base_logits = _measure_precision(engine, prompt, positions, lengths, decode_tokens, seed, warmup, deadline,
                                     save, base)
    done = [n for n in lengths if base["speed"].get(str(n), {}).get("status") == "ok"]
    del engine
    _free(device)
    report["quantized_layers"] = len(quantize_model_fp8(model, backend=backend, skip=skip, fast_accum=fast_accum))
    report["skip"], report["fast_accum"] = list(skip), fast_accum
    _free(device)
    engine = SalaEngine(model, None, chunk_size=chunk_size, use_cuda_graph=use_cuda_graph, check_memory=False)
    fp8: dict[str, Any] = {}
    report["fp8"] = fp8
    log(f"{preset}: fp8")
    fp8_logits = _measure_precision(engine, prompt, positions, done, decode_tokens, seed, warmup, None, save, fp8)
    cmp: dict[str, Any] = {"logits": logits_agreement(base_logits, fp8_logits),
                           "weights_ratio": base["weights_bytes"] / fp8["weights_bytes"], "speed": {}}
    for n in done:
        b, q = base["speed"][str(n)], fp8["speed"].get(str(n), {})
        if q.get("status") != "ok":
            continue
        row = {"ttft_speedup": b["ttft_s"] / q["ttft_s"]}
        if b.get("decode_tokens_per_s") and q.get("decode_tokens_per_s"):
            row["decode_speedup"] = q["decode_tokens_per_s"] / b["decode_tokens_per_s"]
        if "peak_gib" in b and "peak_gib" in q:
            row["peak_gib_baseline"], row["peak_gib_fp8"] = b["peak_gib"], q["peak_gib"]
        cmp["speed"][str(n)] = row
    report["fp8_vs_baseline"] = cmp
    del engine, model
    _free(device)
    return report


# ----------------------------------------------------------------------------------------------- command line
def _lengths(text: str) -> list[int]:
    return [parse_length(x) for x in text.split(",") if x.strip()] if text else []


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sala.bench.fp8", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON output path (bench/results/...)")
    p.add_argument("--parts", default="bundled,shape", help="bundled, shape, or both (comma separated)")
    p.add_argument("--device", default=None, help="cuda (default when present) or cpu (needs --reference)")
    p.add_argument("--dtype", default="auto", help="the baseline's dtype: auto (bf16 on GPU, fp32 on CPU), bf16, fp32")
    p.add_argument("--reference", action="store_true",
                   help="FP8 through the reference arithmetic (dequantize + matmul): CPU tests, no speed meaning")
    p.add_argument("--model", default=None, help="bundled part: model directory (default: the bundled model)")
    p.add_argument("--data", default=None, help="bundled part: packed dataset for held-out windows (default: stdlib)")
    p.add_argument("--windows", type=int, default=16, help="bundled part: held-out windows")
    p.add_argument("--seq-len", type=int, default=2048, help="bundled part: tokens per window")
    p.add_argument("--niah-lengths", default=",".join(str(x) for x in DEFAULT_NIAH_LENGTHS),
                   help="bundled part: niah_single lengths ('' to skip NIAH)")
    p.add_argument("--niah-samples", type=int, default=20)
    p.add_argument("--preset", default="minicpm-sala-9b", help="shape part: the preset shape (random weights)")
    p.add_argument("--accuracy-tokens", type=parse_length, default=parse_length("32K"),
                   help="shape part: prompt length for the logits comparison")
    p.add_argument("--positions", type=int, default=256, help="shape part: positions whose logits are compared")
    p.add_argument("--lengths", default=",".join(str(x) for x in DEFAULT_LENGTHS),
                   help="shape part: contexts for TTFT / decode (e.g. 64K,128K,256K,1M)")
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--chunk-size", type=int, default=16384)
    p.add_argument("--warmup-tokens", type=int, default=None, help="untimed warm-up request (default: engine's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-s", type=float, default=None, help="shape part: skip baseline lengths after this long")
    p.add_argument("--skip", action="append", default=[],
                   help="module name pattern left unquantized (repeatable, e.g. lm_head): accuracy variants")
    p.add_argument("--fast-accum", action="store_true", help="FP8 GEMMs with the tensor cores' fast accumulation")
    p.add_argument("--no-cuda-graph", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    from sala.engine.loading import default_device, parse_dtype
    from sala.ops.fp8 import check_fp8_supported

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    device = torch.device(args.device) if args.device else default_device()
    backend = "reference" if args.reference else "auto"
    if backend == "auto":
        try:
            check_fp8_supported(device)      # before anything is loaded
        except RuntimeError as e:
            raise SystemExit(f"sala.bench.fp8: {e} (or pass --reference for the reference arithmetic)") from None
    dtype = parse_dtype(args.dtype, device)
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = set(parts) - {"bundled", "shape"}
    if unknown:
        raise SystemExit(f"--parts: unknown {sorted(unknown)}; use bundled, shape")
    payload: dict[str, Any] = {"meta": run_metadata(), "backend": backend}

    def save() -> None:
        write_json(args.out, payload)

    if "bundled" in parts:
        payload["bundled"] = bundled_quality(args.model, device, dtype, backend, _lengths(args.niah_lengths),
                                             args.niah_samples, args.windows, args.seq_len, data=args.data,
                                             skip=tuple(args.skip), fast_accum=args.fast_accum)
        save()
    if "shape" in parts:
        def update(section: dict) -> None:
            payload["shape"] = section
            save()

        payload["shape"] = shape_accuracy_and_speed(
            args.preset, device, dtype, backend, args.accuracy_tokens, args.positions, _lengths(args.lengths),
            args.decode_tokens, args.chunk_size, seed=args.seed, use_cuda_graph=not args.no_cuda_graph,
            budget_s=args.budget_s, warmup=args.warmup_tokens, skip=tuple(args.skip), fast_accum=args.fast_accum,
            on_update=update)
        save()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
