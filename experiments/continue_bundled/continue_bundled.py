"""Continual training of a converted SALA model (the paper's step after HALO), measured before and after.

Takes a SALA model folder (default: the bundled model, converted from its teacher at 2K tokens), trains it
further with the trainer on a packed corpus with retrieval samples (sparse attention on, a warmup then
the paper's exponential decay) at its training length, and evaluates needle retrieval at 1x, 4x, 16x and
64x that length before and after, in one process on one GPU. Writes one JSON (and the new model folder).

  python3 experiments/continue_bundled/continue_bundled.py --data /tmp/cont_data --out $OUT/continue_bundled.json \
      --save /tmp/continued --seconds 150
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> None:
    import torch

    from sala.bench.common import run_metadata, write_json
    from sala.eval.runner import default_model, resolve_device_dtype, run_tasks
    from sala.modeling.tokenizer import load_tokenizer
    from sala.train.continual import continue_training
    from sala.train.model_factory import load_model_dir

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="SALA model folder (default: the bundled model)")
    ap.add_argument("--data", required=True, help="packed dataset folder (sala data prepare)")
    ap.add_argument("--train-len", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seconds", type=float, default=150.0, help="training wall-time budget (unless --tokens)")
    ap.add_argument("--tokens", type=int, default=None, help="training budget in tokens (instead of --seconds)")
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
        dev, dtype = resolve_device_dtype(None)
        model, tok = load_model_dir(folder, dtype=dtype, device=dev), load_tokenizer(folder)   # once per folder
        for task in tasks:
            for length, n in zip(lengths, samples):
                r = run_tasks(folder, [length], [task], num_samples=n if task == "niah_single" else max(5, n // 2),
                              seed=7, model=model, tokenizer=tok)
                res[key].setdefault(task, {})[str(length)] = r["results"][task][str(length)]
                write_json(args.out, res)
        del model

    if args.before_from:
        import json

        prev = json.loads(Path(args.before_from).read_text())
        res["before"], res["before_from"] = prev["before"], {"file": args.before_from, "meta": prev["meta"]}
    else:
        evaluate(str(model_dir), "before")

    run = continue_training(model_dir, args.data, f"{args.work}/run", seq_len=args.train_len,
                            **({"tokens": args.tokens} if args.tokens else {"seconds": args.seconds}),
                            micro_batch=args.micro_batch, lr=args.lr, precision="bf16", progress=False)
    res["training"] = {"steps": run["steps"], "tokens": run["tokens"], "seconds": run["seconds"],
                       "tokens_per_s_calibration": run["tokens_per_s_calibration"],
                       "heldout_curve": run["heldout_curve"], "config": run["config"]}
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    write_json(args.out, res)
    final = run["final"]
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
