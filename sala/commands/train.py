"""`sala train CONFIG [key=value ...]`: train a SALA model or a dense baseline (see docs/training.md)."""
from __future__ import annotations

import argparse
import json
import signal


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a SALA model or a dense baseline from a YAML/JSON config",
        description="Train through the config's stages (warmup-stable-decay LR, sequence length, sparse on/off, "
                    "trainable parameter groups). The same command runs on one CPU, one GPU, or N GPUs under "
                    "`torchrun --nproc_per_node N -m sala.cli train ...` (FSDP2). Resumes from the newest "
                    "checkpoint in out_dir unless resume=false.")
    p.add_argument("config", help="YAML or JSON training config (examples in configs/train/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides with dotted keys, e.g. optim.lr=1e-3 "
                                                "stages.0.steps=50 model.config.hidden_size=256")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--overwrite", action="store_true",
                   help="start again in an out_dir that holds another run (its checkpoints are replaced once this "
                        "run saves its first) instead of refusing")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sala.train import Trainer, load_config
    from sala.train.distributed import teardown

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    try:
        trainer = Trainer(cfg, log=print, overwrite=args.overwrite)
        summary = trainer.fit()
        trainer.info(json.dumps(summary))
    finally:
        teardown()
    if summary.get("interrupted_by"):   # stopped by SIGTERM / SIGINT after saving: the shell's status for it
        return 128 + int(getattr(signal, summary["interrupted_by"]))
    return 0
