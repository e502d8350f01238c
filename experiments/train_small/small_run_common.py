"""What the small-model training run (train_small_gpu.py) and its decay branches (train_small_branch.py) share:
the run's options (command line and config file), the evaluation plan, building a packed dataset when it is missing,
and the decay set's path."""
from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in str(text).split(",") if x.strip())


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in str(text).split(",") if x.strip())


def build_parser() -> argparse.ArgumentParser:
    """Every option of the run. A config file (--config, YAML of `option_name: value`, dashes or underscores) sets
    defaults; the command line wins over it."""
    p = argparse.ArgumentParser(
        description="Train the small SALA model (data, calibration, stage plan, training, retrieval probes, NIAH "
                    "evaluation) and write OUT/summary.json, metrics.jsonl and loss.png.")
    a = p.add_argument
    a("out", nargs="?", default="runs/train_small", help="output folder (summary, metrics, plot)")
    a("--config", help="YAML file of option values (keys: these options' names); the command line overrides it")
    a("--train-config", default=str(ROOT / "configs" / "train" / "sala_small_gpu.yaml"),
      help="the `sala train` config the stages start from")
    a("--data", default="train_data/py-bpe8k-synth", help="packed dataset (built first with --prepare-sources)")
    a("--cpu", action="store_true", help="a seconds-long dry run of the same script with the tiny preset on the CPU")
    a("--work-dir", default=os.path.join("runs", "train_small_work"), help="scratch folder (runs, calibration)")
    g = p.add_argument_group("plan: by steps (deterministic) or by seconds (calibrated tokens/s)")
    g.add_argument("--stable-steps", type=int, default=0,
                   help="sparse-off steps (retrieval stages included, which they give steps up for); with "
                        "--decay-steps, the plan is these step counts and no time limit applies")
    g.add_argument("--decay-steps", type=int, default=0, help="decay-stage (sparse on) steps; see --stable-steps")
    g.add_argument("--train-seconds", type=float, default=200.0,
                   help="training time budget that sizes the stages from the calibrated speed (20 s with --cpu)")
    g.add_argument("--total-seconds", type=float, default=None,
                   help="cap on the whole script: training gets what preparation and calibration leave")
    g.add_argument("--eval-seconds", type=float, default=150.0, help="time budget of the evaluation")
    g.add_argument("--decay-speed-ratio", type=float, default=0.6,
                   help="the decay stage's sparse-on speed relative to sparse-off, which sizes it")
    d = p.add_argument_group("data")
    d.add_argument("--prepare-sources", type=_names, default=(),
                   help="e.g. stdlib,python-packages: build --data first when it does not exist")
    d.add_argument("--synthetic-fraction", type=float, default=0.4, help="share of synthetic retrieval samples")
    d.add_argument("--data-max-docs", type=int, default=0, help="at most this many corpus documents (0: all)")
    d.add_argument("--synthetic-tasks", type=_names, default=("niah_single", "niah_multikey", "niah_multivalue", "vt"),
                   help="the synthetic tasks of the corpus and the decay set")
    d.add_argument("--synthetic-lengths", type=_ints, default=(256, 512, 1024, 2048, 4096),
                   help="synthetic sample lengths in tokens, as many samples of each")
    d.add_argument("--decay-synthetic-fraction", type=float, default=None,
                   help="the decay stage trains on --decay-sources plus this share of synthetic samples (built first)")
    d.add_argument("--decay-sources", type=_names, default=("stdlib",), help="the decay set's text")
    d.add_argument("--decay-max-docs", type=int, default=0, help="at most this many decay-set documents (0: all)")
    d.add_argument("--prepare-only", action="store_true", help="build the datasets the options ask for, then stop")
    r = p.add_argument_group("retrieval stages")
    r.add_argument("--retrieval-warmup-share", type=float, default=0.0,
                   help="this share of the sparse-off tokens becomes a first stage on short retrieval samples")
    r.add_argument("--retrieval-seq-len", type=int, default=0,
                   help="that stage's window (0: the stable stage's), on samples of a quarter and half of it")
    r.add_argument("--retrieval-tasks", type=_names, default=None,
                   help="that stage's tasks (default --synthetic-tasks)")
    r.add_argument("--retrieval-steps", type=int, default=0,
                   help="that stage's optimizer steps instead of a share of the tokens")
    r.add_argument("--retrieval-micro-batch", type=int, default=0,
                   help="that stage's micro-batch (0: the stable one's)")
    r.add_argument("--retrieval-max-share", type=float, default=0.5,
                   help="with a time plan: at most this share of the training time goes to that stage")
    r.add_argument("--retrieval-long-steps", type=int, default=0,
                   help="a second retrieval stage of this many steps in --retrieval-long-seq-len windows")
    r.add_argument("--retrieval-long-seq-len", type=int, default=0, help="its window (0: the stable stage's)")
    r.add_argument("--retrieval-data-dir", default=None,
                   help="build the retrieval datasets there (retrieval_short*, retrieval_long*) "
                        "instead of next to --data")
    r.add_argument("--retrieval-data-epochs", type=float, default=1.0,
                   help="the retrieval datasets hold 1/this of the tokens their stages read")
    c = p.add_argument_group("calibration variants")
    c.add_argument("--calibrate-variants", default="",
                   help="'name:key=value,...;name2:...': config overrides (or env.NAME=VALUE) "
                        "calibrated beside the base")
    c.add_argument("--variant-min-gain", type=float, default=0.01,
                   help="a variant trains when it beats the base by more than this fraction")
    c.add_argument("--variant", default=None, help="force this calibrated variant")
    s = p.add_argument_group("one run over several device calls")
    s.add_argument("--split-call", choices=("first", "middle", "second"), default=None,
                   help="first: plan, train, checkpoint; middle: resume and hand over again; second: finish, evaluate")
    s.add_argument("--split-stop-after", type=int, default=0,
                   help="a first or middle call hands over at this global step")
    s.add_argument("--split-final-seconds", type=float, default=None,
                   help="the seconds the last call plans for (default its time limit)")
    s.add_argument("--replan-warmup-seconds", type=float, default=40.0,
                   help="recompilation time the last call's re-plan allows for")
    e = p.add_argument_group("evaluation and branches")
    e.add_argument("--hype-eval-base", type=float, default=500.0,
                   help="also score niah_single with HyPE query scaling at inference, a = this (0: off)")
    e.add_argument("--branch", default=None,
                   help="after a finished run: another decay stage from its stable-stage end, named NAME")
    return p


def parse_options(argv: list[str] | None = None) -> argparse.Namespace:
    """The run's options: defaults, then the --config file's values, then the command line."""
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    if known.config:
        import yaml
        values = yaml.safe_load(open(known.config)) or {}
        if not isinstance(values, dict):
            raise SystemExit(f"{known.config}: expected a mapping of option names to values")
        dests = {a.dest: a for a in parser._actions}
        defaults = {}
        for key, value in values.items():
            dest = str(key).replace("-", "_")
            if dest not in dests or dest in ("help", "config"):
                raise SystemExit(f"{known.config}: unknown option {key!r}")
            action = dests[dest]
            if action.type is not None and value is not None and not isinstance(value, bool):
                value = action.type(",".join(map(str, value)) if isinstance(value, list) else str(value))
            defaults[dest] = value
        parser.set_defaults(**defaults)
    opt = parser.parse_args(argv)
    if opt.retrieval_tasks is None:
        opt.retrieval_tasks = opt.synthetic_tasks
    if bool(opt.stable_steps) != bool(opt.decay_steps):
        parser.error("--stable-steps and --decay-steps go together (a plan by steps)")
    if opt.split_call and not (opt.cpu or opt.total_seconds or opt.stable_steps):
        parser.error("--split-call needs --total-seconds (each call's own time budget) or a plan by steps")
    return opt


def eval_plan(cpu: bool) -> tuple[list[int], dict[str, int]]:
    """NIAH lengths and samples per task: 1x, 2x, 4x the 4K training length on the GPU, tiny on the CPU."""
    if cpu:
        return [256, 512, 1024], {"niah_single": 2, "niah_multikey": 1}
    return [4096, 8192, 16384], {"niah_single": 50, "niah_multikey": 15, "niah_multivalue": 15, "vt": 15}


def packed(path: str, srcs: list[str], fraction: float, sample_lengths: tuple[int, ...], seed: int, *, cpu: bool,
           tasks: tuple[str, ...], max_docs: int | None = None) -> str:
    """The packed dataset at `path` (built when missing): srcs + `fraction` synthetic retrieval samples. An existing
    one built with another mix is refused (naming the field), never silently reused."""
    sample_lengths = (256,) if cpu else tuple(sample_lengths)   # the CPU dry run: one short length
    if os.path.exists(os.path.join(path, "meta.json")):
        from sala.data import read_meta
        meta = read_meta(path)
        syn = meta.get("synthetic") or {}
        want = {"sources": list(srcs), "synthetic fraction": fraction, "synthetic tasks": list(tasks),
                "synthetic lengths": list(sample_lengths), "synthetic seed": seed}
        have = {"sources": meta.get("sources"), "synthetic fraction": syn.get("fraction"),
                "synthetic tasks": syn.get("tasks"), "synthetic lengths": syn.get("lengths"),
                "synthetic seed": syn.get("seed")}
        for key in want:
            if have[key] != want[key]:
                raise SystemExit(f"{path} exists with {key} {have[key]}, but this run asks for {want[key]}: remove it "
                                 "or give this run another --data")
    else:
        from sala.data.prepare import SyntheticMix, prepare
        t0 = time.time()
        prepare(path, srcs, tokenizer="sala", val_fraction=0.01, seed=0, log=print,
                max_docs=max_docs,
                synthetic=SyntheticMix(fraction=fraction, tasks=tasks, lengths=sample_lengths, seed=seed))
        print(f"prepared {path} in {time.time() - t0:.0f}s")
    return path


def long_retrieval_set(path: str, seq_len: int, *, cpu: bool, tasks: tuple[str, ...], max_docs: int | None
                       ) -> tuple[str, tuple[int, ...]]:
    """The long retrieval stage's dataset at `path` (built when missing: stdlib + 90% synthetic samples of an eighth,
    a quarter and half of `seq_len` tokens) and its sample lengths; also the levers profile's data."""
    lengths = (256,) if cpu else (seq_len // 8, seq_len // 4, seq_len // 2)
    return packed(path, ["stdlib"], 0.9, lengths, seed=1357, cpu=cpu, tasks=tasks, max_docs=max_docs), lengths


def data_epochs(stage, data: str) -> float:
    """How many times `stage` (a StageConfig) reads the training split of its dataset (`data` when it names none)."""
    from sala.data import read_meta
    tokens = read_meta(stage.data or data)["splits"]["train"]["tokens"]
    return stage.steps * stage.micro_batch * stage.grad_accum * stage.seq_len / max(1, tokens)


def decay_set(opt: argparse.Namespace) -> str | None:
    """The decay stage's dataset from --decay-sources / --decay-max-docs / --decay-synthetic-fraction (built when
    missing), or None without --decay-synthetic-fraction (the decay stage then reads the corpus)."""
    if not opt.decay_synthetic_fraction:
        return None
    data, cpu = opt.data, opt.cpu
    sources = list(opt.decay_sources)
    max_docs = opt.decay_max_docs or None
    fraction = float(opt.decay_synthetic_fraction)
    tag = (("" if sources == ["stdlib"] and not max_docs
            else "_" + "-".join(sources) + (f"_{max_docs}" if max_docs else ""))
           + ("" if fraction == 0.6 else f"_syn{round(100 * fraction)}"))   # 0.6: the recipe's share, untagged
    lengths, tasks = opt.synthetic_lengths, opt.synthetic_tasks
    return packed(data.rstrip("/") + "_decay" + tag, sources, fraction, lengths,
                  seed=4321, cpu=cpu, tasks=tasks, max_docs=(max_docs or 40) if cpu else max_docs)


def stable_steps_to_finish(stable_steps: int, stable_done: int, decay_steps: int, decay_done: int, tok_step: int,
                           tps_stable: float, tps_decay: float, seconds: float, warmup_s: float) -> int:
    """The stable stage's length (steps) that lets a run's last call finish its decay stage within `seconds`.

    The rest of the stable stage runs at `tps_stable` and the rest of the decay stage at `tps_decay` tokens/s after
    `warmup_s` of recompilation; when that does not fit, the constant-LR stable stage gives up the steps (never
    below `stable_done`, the steps it already ran), so the exponential decay still reaches its end. Returns
    `stable_steps` when everything fits.
    """
    need = (warmup_s + max(0, stable_steps - stable_done) * tok_step / tps_stable
            + max(0, decay_steps - decay_done) * tok_step / tps_decay)
    if need <= seconds:
        return stable_steps
    cut = math.ceil((need - seconds) * tps_stable / tok_step)
    return max(stable_done, stable_steps - cut)


def replan_last_call(run_dir: str, stages: list, seconds: float, *, decay_speed_ratio: float,
                     warmup_s: float, calibrated_tps: dict[int, float] | None = None) -> dict | None:
    """For the last call of a split run: the stable stage's new length from the newest checkpoint's position and
    the speeds the earlier calls logged (metrics.jsonl, each stage's median; a stage not logged yet runs at its
    `calibrated_tps` entry, {stage index: tokens/s}, else at the stable stage's speed, and the decay stage at the
    stable stage's times `decay_speed_ratio`). `stages` are the run's StageConfigs, with one named "stable" and the
    last one the decay stage; the checkpoint may stand in a stage before the stable one (a first call that handed
    over during the retrieval stages: their rest is timed too). Returns {"planned", "now", "reason"} when the stable
    stage must shrink, else None (it fits, the stable stage is over, or no speed is known)."""
    from sala.train.checkpoint import latest_checkpoint, read_trainer_state
    from sala.train.metrics import read_metrics

    names = [st.name for st in stages]
    i_stable, i_decay = names.index("stable"), len(stages) - 1
    calibrated_tps = calibrated_tps or {}
    ckpt = latest_checkpoint(os.path.join(run_dir, "checkpoints"))
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if ckpt is None:
        return None
    state = read_trainer_state(ckpt)["state"]
    if state["stage"] > i_stable:
        return None
    recs = ([r for r in read_metrics(metrics) if r.get("tokens_per_s") and r["step"] <= state["global_step"]]
            if os.path.exists(metrics) else [])

    def median_tps(stage: int) -> float | None:
        xs = [r["tokens_per_s"] for r in recs if r.get("stage") == stage][1:]   # the first window compiles
        return statistics.median(xs) if xs else calibrated_tps.get(stage)

    tps_stable = median_tps(i_stable)
    if not tps_stable:
        return None
    tps_decay = median_tps(i_decay) or tps_stable * decay_speed_ratio

    def tokens(st) -> int:
        return st.seq_len * st.micro_batch * st.grad_accum

    # the rest of the stages before the stable one (a handover inside the retrieval stages)
    before_s = sum((st.steps - (state["stage_step"] if i == state["stage"] else 0)) * tokens(st)
                   / (median_tps(i) or tps_stable) for i, st in enumerate(stages[:i_stable]) if i >= state["stage"])
    stable, decay = stages[i_stable], stages[i_decay]
    stable_done = state["stage_step"] if state["stage"] == i_stable else 0
    tok_step = tokens(stable)
    now = stable_steps_to_finish(stable.steps, stable_done, decay.steps, 0, tok_step, tps_stable,
                                 tps_decay * tok_step / tokens(decay), seconds, warmup_s + before_s)
    if now == stable.steps:
        return None
    return {"planned": stable.steps, "now": now,
            "reason": (f"{stable.steps - stable_done} stable steps at {tps_stable:,.0f} tok/s and "
                       f"{decay.steps} decay steps at {tps_decay:,.0f} tok/s, plus {warmup_s:.0f} s of compilation"
                       + (f" and {before_s:.0f} s for the rest of the stages before" if before_s else "")
                       + f", do not fit this call's {seconds:.0f} s")}


def parse_variants(spec: str) -> list[tuple[str, list[str]]]:
    """--calibrate-variants, "name:key=value,key=value;name2:key=value", as [(name, overrides)].

    A key is a config override as `sala train` takes it on the command line (model.compile_blocks=true,
    stages.0.micro_batch=32, ...) or env.NAME (an environment variable set while the variant runs, e.g.
    env.TORCHINDUCTOR_MAX_AUTOTUNE=1). Values may not contain ',' or ';'. "base" is the config as it stands."""
    out: list[tuple[str, list[str]]] = []
    for part in (p.strip() for p in spec.split(";")):
        if not part:
            continue
        name, sep, body = part.partition(":")
        name = name.strip()
        if not sep or not name or not body.strip():
            raise SystemExit(f"--calibrate-variants: {part!r} is not 'name:key=value[,key=value...]'")
        if name == "base" or name in (n for n, _ in out):
            raise SystemExit(f"--calibrate-variants: the name {name!r} is " + ("reserved for the config as it stands"
                             if name == "base" else "used twice"))
        items = [x.strip() for x in body.split(",") if x.strip()]
        bad = [x for x in items if "=" not in x or not x.split("=", 1)[0].strip()]
        if bad:
            raise SystemExit(f"--calibrate-variants: variant {name!r} has {bad} where key=value was expected")
        out.append((name, items))
    return out


def chosen_overrides(report: dict | None) -> list[str]:
    """The overrides of the variant a calibration report (`{"variants": rows, "chosen": name, ...}`) chose: [] for
    the base, and without a report."""
    if not report:
        return []
    return next(r["overrides"] for r in report["variants"] if r["name"] == report["chosen"])


def split_variant(overrides: list[str]) -> tuple[list[str], dict[str, str]]:
    """A variant's overrides as (config overrides, environment variables)."""
    config = [x for x in overrides if not x.startswith("env.")]
    env = {x[4:].split("=", 1)[0]: x.split("=", 1)[1] for x in overrides if x.startswith("env.")}
    return config, env


def set_env(values: dict[str, str]) -> dict[str, str | None]:
    """Set environment variables; returns their previous values (None: unset) for `restore_env`."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    return old


def restore_env(old: dict[str, str | None]) -> None:
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def choose_variant(measured: dict[str, float | None], min_gain: float, force: str | None = None) -> str:
    """The variant to train with: `force` when given (it must be measured), else the fastest of `measured`
    ({name: tokens/s}, "base" included; None: failed or rejected) when it beats "base" by more than `min_gain`
    (a fraction: 0.01 asks for 1% more tokens/s), else "base"."""
    if force:
        if force not in measured:
            raise SystemExit(f"--variant {force!r} is not one of the calibrated variants {sorted(measured)}")
        return force
    ok = {k: v for k, v in measured.items() if v}
    if not ok.get("base"):
        return max(ok, key=ok.get) if ok else "base"
    best = max(ok, key=ok.get)
    return best if ok[best] > ok["base"] * (1.0 + min_gain) else "base"
