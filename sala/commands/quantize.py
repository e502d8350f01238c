"""`sala quantize`: write an FP8 checkpoint (per-channel float8_e4m3fn weights) of a SALA model directory."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("quantize", help="write an FP8 copy of a model directory (projections + LM head)",
                              description="Quantize the projection weights (q/k/v/o, gates, MLP) and the LM head of "
                                          "a SALA checkpoint to float8_e4m3fn with one fp32 scale per output "
                                          "channel, and save an FP8 checkpoint (docs/fp8.md) that `sala generate` "
                                          "and SalaEngine.from_pretrained load as FP8. Quantizing runs on any "
                                          "device; running the FP8 model needs an Ada or Hopper GPU.")
    p.add_argument("--model", required=True, help="the model directory to quantize (bf16/fp16/fp32 checkpoint)")
    p.add_argument("--out", required=True, help="the FP8 checkpoint directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--skip", action="append", default=[],
                   help="module name pattern to leave unquantized (fnmatch, repeatable), e.g. 'lm_head', '*.o_proj'")
    p.add_argument("--no-lm-head", action="store_true", help="keep the LM head in --dtype")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                   help="dtype of the tensors that stay unquantized (embeddings, norms; default bf16)")
    p.add_argument("--device", default="cpu", help="where to quantize (cpu, cuda); the output is the same")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from sala.engine.loading import load_config_dir, load_model_dir, parse_dtype
    from sala.engine.quantization import is_fp8_checkpoint
    from sala.modeling.fp8 import quantize_model_fp8, save_fp8_checkpoint

    src, out = Path(args.model), Path(args.out)
    if not src.is_dir():
        raise FileNotFoundError(f"--model {src}: no such directory")
    if out.exists() and not args.overwrite:
        raise ValueError(f"--out {out} exists: refusing to overwrite it (pass --overwrite)")
    if out.resolve() == src.resolve():
        raise ValueError(f"--out {out} is the --model directory: write the FP8 checkpoint elsewhere")
    if is_fp8_checkpoint(src):
        raise ValueError(f"--model {src} is already an FP8 checkpoint")
    device = torch.device(args.device)
    out_dtype = parse_dtype(args.dtype, device)
    # Quantize from the weights as stored (fp16 stays fp16 until its fp32 scaling), then cast what stays unquantized.
    stored = getattr(load_config_dir(src), "dtype", None)
    load_dtype = stored if isinstance(stored, torch.dtype) and stored.is_floating_point else out_dtype
    model = load_model_dir(src, device=device, dtype=load_dtype)
    names = quantize_model_fp8(model, include_lm_head=not args.no_lm_head, skip=args.skip)
    model.to(out_dtype)
    save_fp8_checkpoint(model, out, overwrite=args.overwrite, source_dir=src)
    left = model.config.quantization_config["modules_to_not_convert"]
    print(f"wrote {out}: {len(names)} linear layers in FP8 (e4m3, per-channel scales), "
          f"{len(left)} left in {args.dtype}{': ' + ', '.join(left[:4]) if left else ''}")
    return 0
