"""`sala serve`: an OpenAI-compatible HTTP server (continuous batching, exact prefix caching)."""
from __future__ import annotations

import argparse
import importlib.util
import logging
import sys

from sala.utils.bundled import BUNDLED_MODEL_DIR

_SERVE_DEPS = ("fastapi", "uvicorn", "prometheus_client")


def missing_serve_deps() -> list[str]:
    """The packages of the `serve` extra that are not installed."""
    return [name for name in _SERVE_DEPS if importlib.util.find_spec(name) is None]


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, /metrics)",
        description="Serve a SALA model over an OpenAI-compatible HTTP API with continuous batching and prefix "
                    "caching. Needs the serve extra: pip install 'sala-lm[serve]'.")
    p.add_argument("--model", default=str(BUNDLED_MODEL_DIR),
                   help="model directory or preset name (random weights) (default: the bundled model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients send and /v1/models lists (default: the folder or preset name)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--quantization", choices=["none", "fp8"], default="none",
                   help="fp8: FP8 projection and LM-head weights, quantized at load (Hopper/Ada GPUs; docs/fp8.md)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="longest prompt + output in tokens (default: what the memory plan allows)")
    p.add_argument("--max-num-seqs", type=int, default=16, help="most sequences in the running batch")
    p.add_argument("--memory-fraction", type=float, default=0.9,
                   help="fraction of the free device memory for weights + caches")
    p.add_argument("--max-waiting", type=int, default=256,
                   help="most requests waiting for admission; more are refused with 503")
    p.add_argument("--kv-cache-tokens", type=int, default=None,
                   help="tokens of sparse-layer K/V in the shared page pool (default: --max-num-seqs full rows of "
                        "--max-model-len, plus room for cached prefixes; at least one row); requests map pages as "
                        "they grow, the newest is preempted and recomputed later when the pool is full")
    p.add_argument("--no-prefix-cache", action="store_true", help="turn the prefix cache off")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="tokens per prefill chunk of a long prompt (default 2048)")
    p.add_argument("--max-tokens-per-step", type=int, default=None,
                   help="prompt tokens one engine step prefills (its decode tokens come on top; default: the chunk "
                        "size): smaller keeps running streams' inter-token latency lower while long prompts prefill")
    p.add_argument("--speculative", default=None, metavar="ngram|draft:DIR",
                   help="speculative decoding: n-gram prompt lookup, or a draft model directory (same tokenizer)")
    p.add_argument("--num-speculative-tokens", type=int, default=4,
                   help="most draft tokens per verify step (adaptive per request; default 4)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32")
    p.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=None,
                   help="run the engine loop in a child process of its own instead of a thread of the server, so "
                        "that HTTP streaming and the engine do not share the interpreter lock (default: on when the "
                        "engine runs on a CUDA GPU, off on the CPU; docs/serving.md)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    from sala.commands._replicas import add_replica_args

    add_replica_args(p)
    p.set_defaults(func=run)


def engine_kwargs(args: argparse.Namespace) -> dict:
    """EngineCore.from_pretrained keyword arguments from the command's flags."""
    kw = dict(max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
              memory_fraction=args.memory_fraction, enable_prefix_cache=not args.no_prefix_cache,
              max_waiting=args.max_waiting, device=args.device, dtype=args.dtype,
              kv_cache_tokens=getattr(args, "kv_cache_tokens", None),
              quantization=None if args.quantization == "none" else args.quantization,
              chunk_size=getattr(args, "chunk_size", None),
              max_tokens_per_step=getattr(args, "max_tokens_per_step", None),
              speculative=getattr(args, "speculative", None),
              num_speculative_tokens=getattr(args, "num_speculative_tokens", None))
    return {k: v for k, v in kw.items() if v is not None}


def use_engine_process(args: argparse.Namespace) -> bool:
    """--engine-process as given, else on when the engine will run on a CUDA GPU (measured: 32 streams through the
    server at 8.8x the sequential baseline against 7.1x with the engine thread, H100, docs/serving.md); off on
    the CPU, where a child process only adds its start-up."""
    if args.engine_process is not None:
        return bool(args.engine_process)
    if args.device is not None:
        return str(args.device).startswith("cuda")
    import torch

    return torch.cuda.is_available()


def run(args: argparse.Namespace) -> int:
    missing = missing_serve_deps()
    if missing:
        print(f"sala serve: error: the serve extra is not installed (missing {', '.join(missing)}): "
              "pip install 'sala-lm[serve]'", file=sys.stderr)
        return 1
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    if not 0.0 < args.memory_fraction <= 1.0:
        raise ValueError(f"--memory-fraction must be in (0, 1], got {args.memory_fraction}")
    for flag in ("chunk_size", "max_tokens_per_step"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.replicas:
        if args.engine_process:
            raise ValueError("--engine-process does not go with --replicas: each replica steps its engine in a "
                             "thread of its own Ray actor process, apart from the HTTP ingress")
        from sala.commands._replicas import run_replicas

        return run_replicas(args, engine_kwargs(args))
    import uvicorn

    from sala.serve.server import create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(args.model, served_model_name=args.served_model_name, api_key=args.api_key,
                     engine_kwargs=engine_kwargs(args), engine_process=use_engine_process(args))
    print(f"sala serve: {args.model} on http://{args.host}:{args.port}/v1", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
