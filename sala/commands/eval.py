"""`sala eval niah`: RULER-style synthetic long-context tasks against a model, table + JSON."""
from __future__ import annotations

import argparse
import signal
import sys

# Defaults of `sala eval niah` by device: a GPU runs the full sweep; on the CPU long prompts are slow, so the
# default sweep stops at 16K with fewer samples (and says so).
GPU_DEFAULTS = {"lengths": "1k,4k,16k,64k", "num_samples": 20}
CPU_DEFAULTS = {"lengths": "1k,4k,16k", "num_samples": 5}


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate a model on synthetic long-context tasks (RULER-style)")
    sub = p.add_subparsers(dest="eval_command", metavar="SUITE")
    n = sub.add_parser("niah", help="needle-in-a-haystack family: niah_single, niah_multikey, niah_multivalue, vt, cwe",
                       description="Generate the tasks offline (seeded), decode greedily, score by RULER string "
                                   "match; lengths are in tokens of the model's tokenizer.")
    n.add_argument("--model", default=None, help="model folder (default: $SALA_DEFAULT_MODEL, else the bundled model)")
    n.add_argument("--lengths", default=None,
                   help=f"comma-separated, e.g. 1k,4k,16k,64k (default {GPU_DEFAULTS['lengths']} on a GPU, "
                        f"{CPU_DEFAULTS['lengths']} on the CPU)")
    n.add_argument("--tasks", default="niah_single", help="comma-separated task names or 'all'")
    n.add_argument("--num-samples", type=int, default=None,
                   help=f"samples per task and length (default {GPU_DEFAULTS['num_samples']} on a GPU, "
                        f"{CPU_DEFAULTS['num_samples']} on the CPU)")
    n.add_argument("--seed", type=int, default=0)
    n.add_argument("--device", default=None)
    n.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    n.add_argument("--out", default=None, help="write the JSON report here (default: print only)")
    n.add_argument("--by-depth", action="store_true",
                   help="also print each task's score by needle depth (5 buckets) and length")
    n.add_argument("--teacher-forced", action="store_true",
                   help="also score single-answer tasks with the gold answer fed in one forward pass (no cache), "
                        "beside greedy decoding: where the two differ, the cached decoding path loses answers")
    n.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
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
    import torch

    from sala.bench.common import write_json
    from sala.eval.runner import format_depth_table, format_table, format_teacher_forced_table, parse_lengths, run_tasks
    from sala.eval.tasks import TASKS
    from sala.utils.devices import check_device
    from sala.utils.errors import UsageError, check_writable_file

    check_device(args.device)
    if args.out:   # before any work: a report that cannot be written is refused now, not after the run
        check_writable_file(args.out, "--out")
    if args.num_samples is not None and args.num_samples < 1:
        raise UsageError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.model:
        from sala.modeling.checkpoint import check_config_json

        check_config_json(args.model)
    on_gpu = (torch.device(args.device).type == "cuda") if args.device else torch.cuda.is_available()
    defaults = GPU_DEFAULTS if on_gpu else CPU_DEFAULTS
    chosen = []
    if args.lengths is None:
        args.lengths = defaults["lengths"]
        chosen.append(f"--lengths {args.lengths}")
    if args.num_samples is None:
        args.num_samples = defaults["num_samples"]
        chosen.append(f"--num-samples {args.num_samples}")
    if chosen and not on_gpu:
        print(f"note: on the CPU the defaults are {' '.join(chosen)} (a GPU's are --lengths {GPU_DEFAULTS['lengths']} "
              f"--num-samples {GPU_DEFAULTS['num_samples']}); pass them to choose", file=sys.stderr)
    tasks = list(TASKS) if args.tasks == "all" else [t.strip() for t in args.tasks.split(",")]
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if _main_thread() else None
    try:
        report = run_tasks(args.model, parse_lengths(args.lengths), tasks, num_samples=args.num_samples,
                           seed=args.seed, device=args.device, dtype=args.dtype, teacher_forced=args.teacher_forced,
                           log=print, show_progress=not args.no_progress)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    try:
        from sala.bench.common import run_metadata

        report["meta"] = run_metadata()
    except Exception:  # noqa: BLE001 - metadata is best effort
        pass
    if report.get("partial"):
        at = report["interrupted_at"]
        print(f"interrupted during {at.get('task')} at {at.get('length')} tokens "
              f"({at.get('samples_done', 0)} samples of it done): the report holds the finished task/length cells "
              f"only and is marked \"partial\": true", file=sys.stderr)
    if report["tasks"]:
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
    return 130 if report.get("partial") else 0


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _raise_interrupt(signum, frame):
    """SIGTERM during an evaluation: stop like Ctrl-C, so the finished part is written."""
    raise KeyboardInterrupt


def _loss(args: argparse.Namespace) -> int:
    from sala.bench.common import run_metadata, write_json
    from sala.engine.loading import load_model_dir
    from sala.eval.heldout import heldout_windows, model_heldout_loss
    from sala.eval.runner import default_model, resolve_device_dtype
    from sala.utils.devices import check_device
    from sala.utils.errors import check_writable_file

    check_device(args.device)
    if args.out:
        check_writable_file(args.out, "--out")
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
