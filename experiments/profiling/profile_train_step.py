"""Where a training step's time goes: step time, tokens/s and MFU of the trainer's model on one packed
micro-batch (sparse attention off and on), and the top kernels / host ops from torch.profiler.

  python3 experiments/profiling/profile_train_step.py --data train_data/stdlib-bpe8k-synth --out runs/profile_train.json
  (on the CPU: --preset sala-tiny --seq-len 256 --micro-batch 2 --steps 2)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> None:
    import torch

    from sala.bench.common import run_metadata, write_json
    from sala.data.batching import collate_windows
    from sala.data.packed import PackedDataset, read_meta
    from sala.train.compile import compile_for_training
    from sala.train.config import ModelConfig
    from sala.train.flops import peak_tflops, train_step_flops
    from sala.train.model_factory import apply_throughput_options, build_model
    from sala.train.trainer import _doc_lengths, bf16_residual_stream

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="train_data/stdlib-bpe8k-synth")
    ap.add_argument("--preset", default="sala-small")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="also time the model as the trainer compiles it")
    ap.add_argument("--out", default="runs/profile_train.json")
    ap.add_argument("--layers", type=int, default=0,
                    help="SALA layers (0: the preset's; 12 = configs/train/sala_small_gpu.yaml)")
    ap.add_argument("--trainer-precision", action="store_true",
                    help="fp32 weights under bf16 autocast, as the trainer runs them (default: bf16 weights)")
    ap.add_argument("--bf16-residual", action="store_true",
                    help="with --trainer-precision: the trainer's precision bf16-residual "
                         "(bf16 hidden states between layers)")
    ap.add_argument("--config", default="",
                    help="SALA model config overrides as key=value,... (e.g. hidden_size=640,intermediate_size=1920,"
                         "num_attention_heads=10,lightning_nh=10,lightning_nkv=10,num_hidden_layers=8): a wider model")
    ap.add_argument("--only", default="", help="comma-separated run names to keep (default: all)")
    ap.add_argument("--fuse-projections", action="store_true",
                    help="SALA runs: projections sharing an input as one GEMM (model.fuse_projections)")
    ap.add_argument("--loss-chunk", type=int, default=0,
                    help="SALA runs: the loss over chunks of this many tokens, no full logits (model.loss_chunk)")
    ap.add_argument("--compile-loss", action="store_true",
                    help="compiled SALA runs: the LM head + cross-entropy compiled as one function "
                         "(model.compile_loss)")
    ap.add_argument("--compile-blocks", action="store_true",
                    help="compiled SALA runs: each decoder layer as two compiled regions around its attention op "
                         "(model.compile_blocks): fewer compiled calls, less host time per step")
    ap.add_argument("--mlp-concat", action="store_true",
                    help="SALA runs with fused projections: the MLP's gate/up weights concatenated, not interleaved "
                         "(fuse_projections(interleave_mlp=False)): the A/B baseline of that change")
    ap.add_argument("--no-norm-cast", action="store_true",
                    help="SALA runs: the decoder layers' norms emit fp32 under autocast, cast again by the projections "
                         "(set_norm_output_mode('promote')): the A/B baseline of that change")
    ap.add_argument("--sites", type=int, default=0,
                    help="also record the N costliest (op, Python call site) pairs by device time: where the copies, "
                         "casts and elementwise ops of a step come from")
    ap.add_argument("--vary", type=int, default=0,
                    help="instead: time N steps on N different micro-batches (sparse on), then the same N again, "
                         "counting Triton cache entries (is a slow sparse stage compiling kernels?)")
    args = ap.parse_args()
    if args.vary:
        return vary(args)

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    meta = read_meta(args.data)
    ds = PackedDataset(args.data, "train", args.seq_len, align_docs=True, shuffle=True, seed=0)
    windows = [ds.sample(j) for j in range(args.micro_batch)]
    lengths = [n for w in windows for n in _doc_lengths(w)]
    result: dict = {"meta": run_metadata(), "args": vars(args), "docs_per_step": len(lengths),
                    "tokens_per_step": sum(lengths), "runs": {}}
    peak = peak_tflops(dev)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    only = {x for x in args.only.split(",") if x}
    for name, kind, sparse, compiled in (("sala_sparse_off", "sala", False, False),
                                          ("sala_sparse_off_compiled", "sala", False, True),
                                          ("sala_sparse_on", "sala", True, False),
                                          ("sala_sparse_on_compiled", "sala", True, True),
                                          ("llama_same_width", "llama", False, False)):
        if (compiled and not args.compile) or (only and name not in only):
            continue
        sala_cfg = {"num_hidden_layers": args.layers} if args.layers else {}
        sala_cfg.update(parse_overrides(args.config))
        sala_opts = dict(fuse_projections=args.fuse_projections, loss_chunk=args.loss_chunk,
                         compile_loss=args.compile_loss and compiled,
                         compile_blocks=args.compile_blocks and compiled) if kind == "sala" else {}
        spec = ModelConfig(kind=kind, preset=args.preset if kind == "sala" else None, **sala_opts,
                           config=sala_cfg if kind == "sala" else {"hidden_size": 512, "intermediate_size": 1536,
                                                              "num_hidden_layers": 8, "num_attention_heads": 8,
                                                              "num_key_value_heads": 2, "head_dim": 64})
        model = build_model(spec, vocab_size=meta["vocab_size"], bos_id=meta.get("bos_id"),
                            eos_id=meta.get("eos_id"), pad_id=0)
        apply_throughput_options(model, spec)   # as the trainer applies them
        # the A/B baselines: the layouts before the change
        if kind == "sala" and args.mlp_concat and model.projections_fused:
            model.unfuse_projections()
            model.fuse_projections(interleave_mlp=False)
        if kind == "sala" and args.no_norm_cast:
            model.set_norm_output_mode("promote")
        if kind == "sala":
            model.config.use_sparse_attention = sparse
        weights_bf16 = dev.type == "cuda" and not args.trainer_precision
        model = model.to(dev, torch.bfloat16 if weights_bf16 else torch.float32)
        autocast = dev.type == "cuda" and args.trainer_precision
        if autocast and args.bf16_residual:
            bf16_residual_stream(model)
        flops = train_step_flops(model, lengths, sparse and kind == "sala")
        layout = "flat" if kind == "sala" else "rows"
        batch = {k: v.to(dev) for k, v in collate_windows(windows, layout).items()}
        fwd = (compile_for_training(model, compile_loss=spec.compile_loss, blocks=spec.compile_blocks) if compiled
               else model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **({"fused": True} if dev.type == "cuda" else {}))

        def step() -> float:
            kw = {"cu_seqlens": batch["cu_seqlens"]} if kind == "sala" else {"position_ids": batch["position_ids"]}
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
                loss = fwd(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False, **kw).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        try:
            for _ in range(2):
                step()
            sync()
            times = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                step()
                sync()
                times.append(time.perf_counter() - t0)
            ms = 1e3 * sorted(times)[len(times) // 2]
            run = {"params": sum(p.numel() for p in model.parameters()),
                   "step_ms": ms, "tokens_per_s": sum(lengths) / ms * 1e3, "tflops": flops / ms / 1e9,
                   "mfu": flops / ms / 1e9 / peak if peak else None}
            from torch.profiler import ProfilerActivity, profile
            if dev.type == "cuda":   # device activity only (little host overhead): is the GPU ever waiting?
                with profile(activities=[ProfilerActivity.CUDA]) as light:
                    step()
                    sync()
                run.update(gpu_activity(light))
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
            stack_cfg = ({"with_stack": True,
                          "experimental_config": torch._C._profiler._ExperimentalConfig(verbose=True)}
                         if args.sites else {})   # verbose: the Python frames reach each event
            with profile(activities=acts, **stack_cfg) as prof:
                step()
                sync()
            if args.sites:
                run["sites"] = call_sites(prof, args.sites, "self_device_time_total" if dev.type == "cuda"
                                          else "self_cpu_time_total")
            run["kernels"] = device_kernels(prof, 40) if dev.type == "cuda" else []
            ka = prof.key_averages()
            key = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
            rows = sorted(ka, key=lambda e: getattr(e, key, 0), reverse=True)[:25]
            run["top"] = [{"name": e.key[:90], "calls": e.count, "self_ms": getattr(e, key, 0) / 1e3} for e in rows]
            run["device_busy_ms"] = sum(getattr(e, "self_device_time_total", 0) for e in ka) / 1e3
            cpu_rows = sorted(ka, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
            run["top_host"] = [{"name": e.key[:90], "calls": e.count, "self_ms": e.self_cpu_time_total / 1e3}
                               for e in cpu_rows]
        except Exception:  # noqa: BLE001 - record and go on
            import traceback
            run = {"error": traceback.format_exc()[-1500:]}
        result["runs"][name] = run
        print(f"== {name}: " + (f"{run['step_ms']:.1f} ms/step, {run['tokens_per_s']:,.0f} tok/s, MFU "
                                f"{run['mfu']}, device busy {run['device_busy_ms']:.1f} ms"
                                + (f", GPU kernels {run['gpu_kernels_ms']:.1f} of a {run['gpu_span_ms']:.1f} ms span"
                                   if "gpu_span_ms" in run else "") if "step_ms" in run
                                else run["error"]), flush=True)
        for r in run.get("top", [])[:18]:
            print(f"   {r['self_ms']:9.2f} ms {r['calls']:6d}x  {r['name']}")
        for r in run.get("top_host", [])[:8]:
            print(f"   host {r['self_ms']:9.2f} ms {r['calls']:6d}x  {r['name']}")
        for r in run.get("kernels", [])[:25]:
            print(f"   kernel {r['ms']:9.2f} ms {r['calls']:6d}x  {r['name'][:110]}")
        for r in run.get("sites", [])[:12]:
            print(f"   site {r['self_ms']:9.2f} ms {r['calls']:6d}x  {r['op']}  <- {' <- '.join(r['stack'][:2])}")
        model = opt = fwd = None  # free the memory
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    write_json(args.out, result)


def parse_overrides(text: str) -> dict:
    """'a=1,b=1e4,c=true,d=x' -> {"a": 1, "b": 10000.0, "c": True, "d": "x"}: ints, floats, booleans, else strings."""
    def scalar(value: str):
        for cast in (int, float):
            try:
                return cast(value)
            except ValueError:
                pass
        return {"true": True, "false": False}.get(value.lower(), value)

    out: dict = {}
    for item in (x for x in text.split(",") if x):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"--config: {item!r} is not key=value")
        out[key.strip()] = scalar(value.strip())
    return out


def gpu_activity(prof) -> dict:
    """From a device-only profile of one step: the union of the kernels' and copies' intervals (gpu_kernels_ms)
    within the span from the first to the last (gpu_span_ms); the difference is time the GPU waited for the host."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type.name == "CUDA" and e.time_range.end > e.time_range.start)
    if not spans:
        return {}
    busy, (cur_a, cur_b) = 0.0, spans[0]
    for a, b in spans[1:]:
        if a > cur_b:
            busy += cur_b - cur_a
            cur_a, cur_b = a, b
        else:
            cur_b = max(cur_b, b)
    busy += cur_b - cur_a
    return {"gpu_kernels_ms": busy / 1e3, "gpu_span_ms": (max(b for _, b in spans) - spans[0][0]) / 1e3,
            "gpu_events": len(spans)}


def device_kernels(prof, n: int) -> list[dict]:
    """The n costliest GPU kernels (and memcpy/memset) of a profiled step by total device time, grouped by name:
    {"name", "calls", "ms"}; unlike the key averages, no host op is counted beside the kernels it launched."""
    groups: dict = {}
    for e in prof.events():
        if e.device_type.name != "CUDA":
            continue
        g = groups.setdefault(e.name, {"name": e.name[:200], "calls": 0, "ms": 0.0})
        g["calls"] += 1
        g["ms"] += (e.time_range.end - e.time_range.start) / 1e3
    return sorted(groups.values(), key=lambda r: r["ms"], reverse=True)[:n]


def call_sites(prof, n: int, key: str) -> list[dict]:
    """The n costliest aten ops by `key` (self time), grouped by op and the innermost frames of this project's code
    (sala/, experiments/) that called them: {"op", "calls", "self_ms", "stack"}; ops run by autograd's backward have no
    Python frames (stack [])."""
    groups: dict = {}
    for e in prof.events():
        if not e.name.startswith("aten::"):
            continue
        frames = tuple(f for f in (e.stack or []) if f.startswith(("sala/", "experiments/")) or "/sala/" in f
                       or "/experiments/" in f)[:4]
        g = groups.setdefault((e.name, frames), {"op": e.name, "calls": 0, "self_ms": 0.0, "stack": list(frames)})
        g["calls"] += 1
        g["self_ms"] += getattr(e, key, 0) / 1e3
    return sorted(groups.values(), key=lambda r: r["self_ms"], reverse=True)[:n]


def vary(args) -> None:
    import os

    import torch

    from sala.bench.common import run_metadata, write_json
    from sala.data.batching import collate_windows
    from sala.data.packed import PackedDataset, read_meta
    from sala.train.config import ModelConfig
    from sala.train.model_factory import build_model

    dev = torch.device("cuda")
    meta = read_meta(args.data)
    ds = PackedDataset(args.data, "train", args.seq_len, align_docs=True, shuffle=True, seed=0)
    model = build_model(ModelConfig(kind="sala", preset=args.preset), vocab_size=meta["vocab_size"]).to(dev)
    model.config.use_sparse_attention = True
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    cache = os.path.expanduser(os.environ.get("TRITON_CACHE_DIR", "~/.triton/cache"))
    batches = [collate_windows([ds.sample(i * args.micro_batch + j) for j in range(args.micro_batch)], "flat")
               for i in range(args.vary)]
    rows = []
    for rep in range(2):
        for i, b in enumerate(batches):
            t0 = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=b["input_ids"].to(dev), labels=b["labels"].to(dev), cu_seqlens=b["cu_seqlens"],
                             use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            n_cache = sum(len(f) for _, _, f in os.walk(cache)) if os.path.isdir(cache) else -1
            rows.append({"pass": rep, "batch": i, "ms": 1e3 * (time.perf_counter() - t0), "triton_cache_files": n_cache,
                         "docs": len(b["cu_seqlens"]) - 1})
            print(rows[-1], flush=True)
    write_json(args.out, {"meta": run_metadata(), "args": vars(args), "steps": rows})


if __name__ == "__main__":
    main()
