"""`sala bench kernels --op lightning|sparse` and `sala bench latency`: GPU benchmarks that write JSON.

Each benchmark measures this project's code and its baseline in the same process (fla for the lightning
kernels, torch SDPA / fla NSA for the sparse kernels, HF transformers Qwen3-8B for end-to-end latency) and writes
a JSON file (device, versions, command, git commit, shapes, medians, ratios) for `bench/results/`.
"""
from __future__ import annotations

import argparse
import importlib
import inspect

from sala.utils.lengths import length_arg, lengths_arg

_KERNEL_MODULES = {"lightning": "sala.bench.kernels_lightning", "sparse": "sala.bench.kernels_sparse"}


def _call_run(module_name: str, **kwargs):
    module = importlib.import_module(module_name)
    accepted = inspect.signature(module.run).parameters
    return module.run(**{k: v for k, v in kwargs.items() if k in accepted and v is not None})


def _kernels(args: argparse.Namespace) -> int:
    ops = list(_KERNEL_MODULES) if args.op == "all" else [args.op]
    for op in ops:
        out = args.out or f"bench_{op}_kernels.json"
        if len(ops) > 1 and args.out:
            out = args.out.replace(".json", f"_{op}.json")
        extra = {}
        if op == "sparse":
            from sala.bench.kernels_sparse import check_variants

            extra = dict(tune=args.tune or None, backward_max_len=args.backward_max_len,
                         variants=check_variants(["default", *args.variants.split(",")]) if args.variants else None)
        _call_run(_KERNEL_MODULES[op], lengths=args.lengths, out_path=out, with_fla=not args.no_baseline, **extra)
        print(f"wrote {out}")
    return 0


def _latency(args: argparse.Namespace) -> int:
    out = args.out or "bench_latency.json"
    if args.quantization == "fp8":        # refused before any model is built (one line, exit 2)
        from sala.ops.fp8 import check_fp8_supported

        check_fp8_supported("cuda")
    _call_run("sala.bench.latency", lengths=args.lengths, decode_tokens=args.decode_tokens, out_path=out,
              baseline=not args.no_baseline, compile=args.compile or None, quantization=args.quantization)
    print(f"wrote {out}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from sala.bench.serve import run

    payload = run(args)
    print(f"wrote {args.out}" + (f" and {payload['plot']}" if payload.get("plot") else ""))
    return 0


def _cpu_prefill(args: argparse.Namespace) -> int:
    from sala.bench.cpu_prefill import DEFAULT_LENGTHS, DEFAULT_MODEL, run

    out = args.out or "bench_cpu_prefill.json"
    run(args.lengths or list(DEFAULT_LENGTHS), out, args.model or DEFAULT_MODEL, args.repeats,
        args.baseline_max, not args.no_baseline)
    print(f"wrote {out}")
    return 0


def _spec(args: argparse.Namespace) -> int:
    from sala.bench.spec import run

    payload = run(args)
    s = payload["summary"]
    print(f"wrote {args.out}: identical outputs {s['all_identical']}, speed-up mean {s['mean_speedup']}, "
          f"min {s['min_speedup']}" + (f"; verify/decode {payload['cost']['verify_ratio']:.2f}x"
                                       if "cost" in payload else ""))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="GPU benchmarks (write JSON for bench/results/)")
    bsub = p.add_subparsers(dest="bench_command", metavar="BENCH", required=True)

    k = bsub.add_parser("kernels", help="lightning / sparse attention kernels vs fla and torch SDPA")
    k.add_argument("--op", choices=["lightning", "sparse", "all"], default="all")
    k.add_argument("--lengths", type=lengths_arg, default=None, help="e.g. 4k,64k,1M (default: the op's own)")
    k.add_argument("--out", default=None, help="JSON output path")
    k.add_argument("--no-baseline", action="store_true", help="skip the fla / SDPA baselines")
    k.add_argument("--variants", default=None,
                   help="sparse: variants measured beside the default, comma separated (chunk1g, decode, "
                        "per_token: the per-token walk instead of the default union walk of 4 queries)")
    k.add_argument("--tune", action="store_true", help="sparse: sweep launch settings at 128K first")
    k.add_argument("--backward-max-len", type=length_arg, default=None,
                   help="sparse: longest T timed forward+backward (default 1M; the forward runs at every length)")
    k.set_defaults(func=_kernels)

    lat = bsub.add_parser("latency", help="TTFT / end-to-end / decode speed vs HF Qwen3-8B (paper Figs. 2-3)")
    lat.add_argument("--lengths", type=lengths_arg, default=None, help="e.g. 64k,128k,256k,512k,1M,2M")
    lat.add_argument("--decode-tokens", type=int, default=None)
    lat.add_argument("--out", default=None, help="JSON output path")
    lat.add_argument("--no-baseline", action="store_true", help="skip the HF Qwen3-8B baseline")
    lat.add_argument("--compile", action="store_true", help="SALA with the compiled prefill (SalaEngine(compile=True))")
    lat.add_argument("--quantization", choices=["none", "fp8"], default="none",
                     help="SALA's projections and LM head in FP8 (the baseline stays bf16)")
    lat.set_defaults(func=_latency)

    from sala.bench.serve import add_arguments as serve_arguments

    srv = bsub.add_parser("serve", help="load generator for sala serve: throughput, TTFT, inter-token latency")
    serve_arguments(srv)
    srv.set_defaults(func=_serve)

    cpu = bsub.add_parser("cpu-prefill", help="CPU prefill of the bundled model per length vs the previous sparse "
                                              "CPU path")
    cpu.add_argument("--lengths", type=lengths_arg, default=None, help="e.g. 4k,8k,16k,64k (the default)")
    cpu.add_argument("--out", default=None, help="JSON output path")
    cpu.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    cpu.add_argument("--repeats", type=int, default=3, help="timed runs per length up to 16K tokens (median)")
    cpu.add_argument("--baseline-max", type=length_arg, default=16384,
                     help="longest prompt timed with the previous path")
    cpu.add_argument("--no-baseline", action="store_true", help="skip the previous path")
    cpu.set_defaults(func=_cpu_prefill)

    from sala.bench.spec import add_arguments as spec_arguments

    sp = bsub.add_parser("spec", help="speculative decoding: greedy tokens/s with and without drafts on "
                                      "copy-heavy long-context tasks; verify-step cost")
    spec_arguments(sp)
    sp.set_defaults(func=_spec)
