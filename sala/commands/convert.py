"""`sala convert --teacher DIR --out DIR`: a dense Llama / Qwen2 / Qwen3 / MiniCPM checkpoint -> SALA (HALO)."""
from __future__ import annotations

import argparse


def _int_tokens(text: str) -> int:
    """"2M", "500k", "1e6" or "123456" -> int."""
    t = text.strip().lower()
    mult = {"k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}.get(t[-1:], 1)
    try:
        return int(float(t[:-1] if mult > 1 else t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a token count: {text!r} (e.g. 2000000, 2M, 500k)") from None


def _json_dict(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    from sala.convert.families import SUPPORTED_MODEL_TYPES

    p = subparsers.add_parser(
        "convert", help="convert a dense Transformer checkpoint into a SALA hybrid (HALO)",
        description="Convert a dense Hugging Face checkpoint (model_type: " + ", ".join(SUPPORTED_MODEL_TYPES) +
                    ") into a SALA checkpoint: weight transfer, stage-1 hidden-state alignment, HALO layer "
                    "selection, stage-2 KL distillation. Stages resume after an interruption (OUT/.stages).")
    p.add_argument("--teacher", required=True, help="dense model folder (config.json + *.safetensors)")
    p.add_argument("--out", required=True, help="output folder for the SALA checkpoint")
    p.add_argument("--softmax-layers", default="auto",
                   help="'auto' (HALO score; first and last layers kept), 'none' (all lightning) or 'i,j,k'")
    p.add_argument("--softmax-fraction", type=float, default=0.25, help="share of softmax layers for auto (0.25)")
    p.add_argument("--stage1-tokens", type=_int_tokens, default=2_000_000, help="alignment tokens (2M)")
    p.add_argument("--stage2-tokens", type=_int_tokens, default=2_000_000, help="KL distillation tokens (2M)")
    p.add_argument("--finetune-tokens", type=_int_tokens, default=0,
                   help="optional CE continual training at --finetune-seq-len (0: leave it to `sala train`)")
    p.add_argument("--seq-len", type=int, default=512, help="sequence length of stages 1 and 2 (512)")
    p.add_argument("--finetune-seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--stage1-lr", type=float, default=1e-3)
    p.add_argument("--stage2-lr", type=float, default=3e-4)
    p.add_argument("--finetune-lr", type=float, default=1e-4)
    p.add_argument("--keep-sparse-rope", action="store_true", help="keep RoPE in the sparse layers (ablation)")
    p.add_argument("--sparse-preset", default="minicpm-sala-9b",
                   help="SalaConfig preset whose sparse_config the converted model uses (default: the released one)")
    p.add_argument("--sparse-config", default=None, type=_json_dict,
                   help='JSON overrides of the sparse_config fields, e.g. \'{"topk": 24, "window_size": 512}\'')
    p.add_argument("--data", default=None,
                   help="packed token folder from `sala data prepare` (teacher's tokenizer); default: the Python "
                        "standard library tokenized with the teacher's tokenizer; 'random' for smoke tests")
    p.add_argument("--select-length", type=int, default=None, help="recall-probe prompt length (default --seq-len)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--restart", "--overwrite", dest="restart", action="store_true",
                   help="discard finished stages and start over (also when --out holds a conversion made with other "
                        "options, which is refused otherwise)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--continue-config", default=None, metavar="TRAIN.yaml",
                   help="after converting, continue training with this `sala train` config (stages, lengths, "
                        "sparse attention on/off); the model is the converted checkpoint")
    p.add_argument("--continue-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override for the continual-training config (repeatable), e.g. data.path=DIR")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from sala.convert import ConvertOptions, convert

    opts = ConvertOptions(
        teacher=args.teacher, out=args.out, softmax_layers=args.softmax_layers,
        softmax_fraction=args.softmax_fraction, stage1_tokens=args.stage1_tokens, stage2_tokens=args.stage2_tokens,
        finetune_tokens=args.finetune_tokens, seq_len=args.seq_len, finetune_seq_len=args.finetune_seq_len,
        batch_size=args.batch_size, stage1_lr=args.stage1_lr, stage2_lr=args.stage2_lr,
        finetune_lr=args.finetune_lr, keep_sparse_rope=args.keep_sparse_rope, sparse_preset=args.sparse_preset,
        sparse_config=args.sparse_config,
        data=args.data, select_length=args.select_length, device=args.device, dtype=args.dtype, seed=args.seed,
        restart=args.restart, progress=not args.no_progress)
    from sala.utils.devices import check_device

    check_device(None if args.device == "auto" else args.device)
    out = convert(opts, log=print)
    if args.continue_config:
        from sala.convert.handover import continue_training

        continue_training(out, args.continue_config, args.continue_set)
    return 0
