"""`sala info`: parameters by kind and the memory plan of a preset or model directory."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from sala.commands.generate import positive_int


def register(subparsers) -> None:
    p = subparsers.add_parser("info", help="parameters by kind and the memory plan for a context and batch",
                              description="Show a SALA model's parameters by kind and what a request needs in "
                                          "memory (weights, sparse KV, compressed keys, lightning states, "
                                          "workspace). Reads only the config: nothing is loaded.")
    p.add_argument("model", help="a preset name (minicpm-sala-9b, sala-small, sala-tiny) or a model directory")
    p.add_argument("--context", default="1M", help="tokens per sequence, prompt + new tokens (e.g. 128K, 1M)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="bf16", help="bf16, fp16, fp32")
    p.add_argument("--chunk-size", type=positive_int, default=None, help="prefill chunk in tokens (default 16384)")
    p.add_argument("--device", default=None, help="also check the plan against this device's free memory")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def _config(spec: str):
    from sala.modeling import SalaConfig

    if Path(spec).is_dir():
        from sala.engine.loading import load_config_dir
        from sala.modeling.checkpoint import check_config_json

        check_config_json(spec)
        return load_config_dir(spec), str(Path(spec))
    if spec in SalaConfig.preset_names():
        return SalaConfig.from_preset(spec), f"preset {spec}"
    raise FileNotFoundError(f"{spec!r} is neither a model directory nor a preset "
                            f"({', '.join(SalaConfig.preset_names())})")


def run(args: argparse.Namespace) -> int:
    import torch

    from sala.bench.latency import parse_length
    from sala.engine import DEFAULT_CHUNK_SIZE
    from sala.engine.loading import parse_dtype
    from sala.engine.memory import (
        check_fits,
        device_free_bytes,
        fmt_bytes,
        largest_context,
        parameter_counts,
        plan_memory,
    )
    from sala.utils.devices import check_device

    check_device(args.device)
    config, name = _config(args.model)
    context = parse_length(args.context)
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    dtype = parse_dtype(args.dtype, torch.device("cuda"))
    chunk = args.chunk_size or DEFAULT_CHUNK_SIZE
    counts = parameter_counts(config)
    plan = plan_memory(config, context, args.batch, dtype, chunk, weight_params=counts["total"])
    free = device_free_bytes(args.device) if args.device else None
    if args.json:
        out = {"model": name, "parameters": counts, "plan": plan.as_dict(),
               "layers": {"sparse": config.sparse_layer_ids, "lightning": config.lightning_layer_ids}}
        if free is not None:
            out["device_free"] = free
            out["largest_context_on_device"] = largest_context(config, free, args.batch, dtype, chunk)
        print(json.dumps(out, indent=2))
        return 0
    print(f"{name}: {config.num_hidden_layers} layers ({len(config.sparse_layer_ids)} sparse InfLLM-V2 at "
          f"{config.sparse_layer_ids}, {len(config.lightning_layer_ids)} lightning), hidden {config.hidden_size}, "
          f"vocab {config.vocab_size}")
    print("parameters:")
    for key, label in (("embeddings", "embeddings + lm_head"), ("mlp", "MLP"),
                       ("sparse_attention", "sparse attention"), ("lightning_attention", "lightning attention"),
                       ("norms", "norms"), ("total", "total")):
        print(f"  {label:<24} {counts[key]:>15,}  ({counts[key] / 1e9:.3f} B)")
    print(plan.describe())
    per_token = (plan.sparse_kv + plan.compressed_keys) / (context * args.batch)
    print(f"  (KV + compressed keys: {fmt_bytes(per_token)} per token per sequence)")
    if free is not None:
        print(f"free on {args.device}: {fmt_bytes(free)}; largest context at batch {args.batch}: "
              f"{largest_context(config, free, args.batch, dtype, chunk):,} tokens")
        check_fits(config, plan, free, where=str(args.device))
    return 0
