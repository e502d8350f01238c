"""Continual training of a converted SALA model (the paper's step after HALO), measured before and after.

Takes a SALA model folder (default: the bundled model, converted from its teacher at 2K tokens), trains it
further with the trainer on a packed corpus with retrieval samples (sparse attention on, a warmup then
the paper's exponential decay) at its training length, and evaluates needle retrieval at 1x, 4x, 16x and
64x that length before and after, in one process on one GPU. Writes one JSON (and the new model folder).

  python3 scripts/continue_bundled.py --data /tmp/cont_data --out $OUT/continue_bundled.json \
      --save /tmp/continued --seconds 150
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    import torch

    from sala.bench.common import run_metadata, write_json
    from sala.eval.runner import default_model, run_tasks
    from sala.train import Trainer, load_config

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="SALA model folder (default: the bundled model)")
    ap.add_argument("--data", required=True, help="packed dataset folder (sala data prepare)")
    ap.add_argument("--train-len", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seconds", type=float, default=150.0, help="training wall-time budget")
    ap.add_argument("--multiples", default="1,4,16,64")
    ap.add_argument("--samples", default="30,30,20,10", help="needle prompts per length")
    ap.add_argument("--tasks", default="niah_single,niah_multikey")
    ap.add_argument("--work", default="runs/continue_bundled")
    ap.add_argument("--save", default=None, help="also copy the continued model here")
    ap.add_argument("--before-from", default=None,
                    help="take the 'before' scores from this earlier JSON of the same model instead of measuring them")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    model_dir = args.model or default_model()
    lengths = [args.train_len * int(m) for m in args.multiples.split(",")]
    samples = [int(x) for x in args.samples.split(",")]
    tasks = args.tasks.split(",")
    res: dict = {"meta": run_metadata(), "args": vars(args), "model": str(model_dir), "lengths": lengths,
                 "before": {}, "after": {}}

    def evaluate(folder: str, key: str) -> None:
        for task in tasks:
            for length, n in zip(lengths, samples):
                r = run_tasks(folder, [length], [task], num_samples=n if task == "niah_single" else max(5, n // 2), seed=7)
                res[key].setdefault(task, {})[str(length)] = r["results"][task][str(length)]
                write_json(args.out, res)

    if args.before_from:
        import json

        prev = json.loads(Path(args.before_from).read_text())
        res["before"], res["before_from"] = prev["before"], {"file": args.before_from, "meta": prev["meta"]}
    else:
        evaluate(str(model_dir), "before")

    base = [f"data.path={args.data}", "model.kind=pretrained", f"model.path={model_dir}", "model.preset=null", "model.config={}",
            "progress=false", "resume=false", "eval_windows=16", "log_every=10", "precision=bf16"]
    cfg = load_config(str(ROOT / "configs/train/sala_small_gpu.yaml"), base + [f"out_dir={args.work}/calib", "save_final=false"])
    cfg.model.compile = False
    stage = dataclasses.replace(cfg.stages[0], name="calib", steps=20, seq_len=args.train_len, micro_batch=args.micro_batch,
                                warmup_steps=0, sparse=True, lr=args.lr * 0.1)
    cfg.stages = [stage]
    tr = Trainer(cfg)
    tr.fit()
    tps = [r["tokens_per_s"] for r in tr.history if "tokens_per_s" in r][-1]
    del tr
    steps = max(20, int(0.9 * args.seconds * tps / (args.train_len * args.micro_batch)))
    cfg = load_config(str(ROOT / "configs/train/sala_small_gpu.yaml"),
                      base + [f"out_dir={args.work}/run", f"time_limit_s={args.seconds * 1.15:.0f}",
                              f"eval_every={max(10, steps // 4)}"])
    cfg.model.compile = False
    cfg.stages = [dataclasses.replace(cfg.stages[1], name="continue", steps=steps, seq_len=args.train_len,
                                      micro_batch=args.micro_batch, warmup_steps=min(50, steps // 10), sparse=True,
                                      decay="exponential", decay_steps=steps - min(50, steps // 10), lr=args.lr,
                                      lr_end=args.lr / 20)]
    t0 = time.time()
    tr = Trainer(cfg)
    summary = tr.fit()
    val = [(r["step"], r["val_loss"]) for r in tr.history if "val_loss" in r]
    res["training"] = {"steps": summary["global_step"], "tokens": summary["tokens"], "seconds": time.time() - t0,
                       "tokens_per_s_calibration": tps, "heldout_curve": val, "config": cfg.to_dict()}
    del tr
    torch.cuda.empty_cache()
    write_json(args.out, res)
    final = f"{args.work}/run/final"
    evaluate(final, "after")
    if args.save:
        import shutil

        shutil.copytree(final, args.save, dirs_exist_ok=True)
    write_json(args.out, res)
    for key in ("before", "after"):
        for task, r in res[key].items():
            print(key, task, {L: x["score"] for L, x in r.items()})


if __name__ == "__main__":
    main()
