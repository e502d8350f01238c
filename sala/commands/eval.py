"""`sala eval niah`: RULER-style synthetic long-context tasks against a model, table + JSON."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate a model on synthetic long-context tasks (RULER-style)")
    sub = p.add_subparsers(dest="eval_command", metavar="SUITE")
    n = sub.add_parser("niah", help="needle-in-a-haystack family: niah_single, niah_multikey, niah_multivalue, vt, cwe",
                       description="Generate the tasks offline (seeded), decode greedily, score by RULER string "
                                   "match; lengths are in tokens of the model's tokenizer.")
    n.add_argument("--model", default=None, help="model folder (default: $SALA_DEFAULT_MODEL, else the bundled model)")
    n.add_argument("--lengths", default="1k,4k,16k,64k", help="comma-separated, e.g. 1k,4k,16k,64k")
    n.add_argument("--tasks", default="niah_single", help="comma-separated task names or 'all'")
    n.add_argument("--num-samples", type=int, default=20, help="samples per task and length")
    n.add_argument("--seed", type=int, default=0)
    n.add_argument("--device", default=None)
    n.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    n.add_argument("--out", default=None, help="write the JSON report here (default: print only)")
    n.add_argument("--by-depth", action="store_true",
                   help="also print each task's score by needle depth (5 buckets) and length")
    n.add_argument("--teacher-forced", action="store_true",
                   help="also score single-answer tasks with the gold answer fed in one forward pass (no cache), "
                        "beside greedy decoding: where the two differ, the cached decoding path loses answers")
    n.add_argument("--debug", action="store_true")
    n.set_defaults(func=_niah)
    lo = sub.add_parser("loss", help="held-out LM loss (nats/token) of one or more models on the same windows",
                        description="Mean next-token cross-entropy of each model on evenly spaced windows of a "
                                    "packed dataset's held-out split (`sala data prepare`); all models see the "
                                    "same tokens, so their losses compare.")
    lo.add_argument("--model", action="append", default=None,
                    help="model folder; repeat to compare several (default: the bundled model)")
    lo.add_argument("--data", required=True, help="packed dataset folder (made with the models' tokenizer)")
    lo.add_argument("--split", default="val")
    lo.add_argument("--seq-len", type=int, default=2048)
    lo.add_argument("--windows", type=int, default=24, help="number of windows (at most)")
    lo.add_argument("--batch", type=int, default=4)
    lo.add_argument("--device", default=None)
    lo.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    lo.add_argument("--out", default=None, help="write the JSON report here")
    lo.set_defaults(func=_loss)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def _niah(args: argparse.Namespace) -> int:
    from sala.eval.runner import format_depth_table, format_table, format_teacher_forced_table, parse_lengths, run_tasks
    from sala.eval.tasks import TASKS

    tasks = list(TASKS) if args.tasks == "all" else [t.strip() for t in args.tasks.split(",")]
    report = run_tasks(args.model, parse_lengths(args.lengths), tasks, num_samples=args.num_samples,
                       seed=args.seed, device=args.device, dtype=args.dtype, teacher_forced=args.teacher_forced)
    try:
        from sala.bench.common import run_metadata, write_json

        report["meta"] = run_metadata()
    except Exception:  # noqa: BLE001 - metadata is best effort
        from sala.bench.common import write_json
    print(format_table(report))
    if args.by_depth:
        for task in report["tasks"]:
            table = format_depth_table(report, task)
            if table:
                print("\n" + table)
    for task in report["tasks"] if args.teacher_forced else []:
        table = format_teacher_forced_table(report, task)
        if table:
            print("\n" + table)
    if args.out:
        write_json(args.out, report)
        print(f"wrote {args.out}")
    return 0


def _loss(args: argparse.Namespace) -> int:
    from sala.bench.common import run_metadata, write_json
    from sala.eval.heldout import heldout_windows, model_heldout_loss
    from sala.eval.runner import default_model, resolve_device_dtype
    from sala.engine.loading import load_model_dir

    if args.seq_len < 2:
        raise ValueError(f"--seq-len must be at least 2 (got {args.seq_len})")
    windows = heldout_windows(args.data, args.windows, args.seq_len, split=args.split)
    dev, dtype = resolve_device_dtype(args.device, args.dtype)
    report: dict = {"meta": run_metadata(), "data": args.data, "split": args.split, "seq_len": args.seq_len,
                    "windows": len(windows), "tokens": int(len(windows) * (args.seq_len - 1)), "losses": {}}
    for folder in args.model or [default_model()]:
        model = load_model_dir(folder, dtype=dtype, device=dev)
        try:
            loss = model_heldout_loss(model, windows, args.batch)
        except ValueError as e:
            raise ValueError(f"model {folder}: {e}") from None
        report["losses"][folder] = loss
        print(f"{loss:8.4f}  {folder}")
        del model
    if args.out:
        write_json(args.out, report)
        print(f"wrote {args.out}")
    return 0
