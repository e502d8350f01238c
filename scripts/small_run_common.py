"""What the small-model training run (train_small_gpu.py) and its decay branches (train_small_branch.py) share:
the evaluation plan, building a packed dataset when it is missing, and the decay set's path."""
from __future__ import annotations

import math
import os
import statistics
import time


def eval_plan(cpu: bool) -> tuple[list[int], dict[str, int]]:
    """NIAH lengths and samples per task: 1x, 2x, 4x the 4K training length on the GPU, tiny on the CPU."""
    if cpu:
        return [256, 512, 1024], {"niah_single": 2, "niah_multikey": 1}
    return [4096, 8192, 16384], {"niah_single": 50, "niah_multikey": 15, "niah_multivalue": 15, "vt": 15}


def synthetic_settings() -> tuple[tuple[int, ...], tuple[str, ...]]:
    """SYNTHETIC_LENGTHS and SYNTHETIC_TASKS: the synthetic samples mixed into the corpus and the decay sets."""
    lengths = tuple(int(x) for x in os.environ.get("SYNTHETIC_LENGTHS", "256,512,1024,2048,4096").split(",") if x)
    tasks = tuple(x for x in os.environ.get("SYNTHETIC_TASKS", "niah_single,niah_multikey,niah_multivalue,vt")
                  .split(",") if x)
    return lengths, tasks


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
                                 "or give this run another DATA")
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


def decay_set(data: str, *, cpu: bool) -> str | None:
    """The decay stage's dataset from DECAY_SOURCES / DECAY_MAX_DOCS / DECAY_SYNTHETIC_FRACTION (built when missing),
    or None without DECAY_SYNTHETIC_FRACTION (the decay stage then reads the corpus)."""
    if not os.environ.get("DECAY_SYNTHETIC_FRACTION"):
        return None
    sources = [x for x in os.environ.get("DECAY_SOURCES", "stdlib").split(",") if x]
    max_docs = int(os.environ.get("DECAY_MAX_DOCS", "0") or 0) or None
    fraction = float(os.environ["DECAY_SYNTHETIC_FRACTION"])
    tag = (("" if sources == ["stdlib"] and not max_docs else "_" + "-".join(sources) + (f"_{max_docs}" if max_docs else ""))
           + ("" if fraction == 0.6 else f"_syn{round(100 * fraction)}"))   # 0.6: the recipe's share, untagged
    lengths, tasks = synthetic_settings()
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
    """CALIBRATE_VARIANTS, "name:key=value,key=value;name2:key=value", as [(name, overrides)].

    A key is a config override as `sala train` takes it on the command line (model.compile_blocks=true,
    stages.0.micro_batch=32, ...) or env.NAME (an environment variable set while the variant runs, e.g.
    env.SALA_LIGHTNING_FUSED_BWD=1). Values may not contain ',' or ';'. "base" is the config as it stands."""
    out: list[tuple[str, list[str]]] = []
    for part in (p.strip() for p in spec.split(";")):
        if not part:
            continue
        name, sep, body = part.partition(":")
        name = name.strip()
        if not sep or not name or not body.strip():
            raise SystemExit(f"CALIBRATE_VARIANTS: {part!r} is not 'name:key=value[,key=value...]'")
        if name == "base" or name in (n for n, _ in out):
            raise SystemExit(f"CALIBRATE_VARIANTS: the name {name!r} is " + ("reserved for the config as it stands"
                             if name == "base" else "used twice"))
        items = [x.strip() for x in body.split(",") if x.strip()]
        bad = [x for x in items if "=" not in x or not x.split("=", 1)[0].strip()]
        if bad:
            raise SystemExit(f"CALIBRATE_VARIANTS: variant {name!r} has {bad} where key=value was expected")
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
            raise SystemExit(f"VARIANT={force!r} is not one of the calibrated variants {sorted(measured)}")
        return force
    ok = {k: v for k, v in measured.items() if v}
    if not ok.get("base"):
        return max(ok, key=ok.get) if ok else "base"
    best = max(ok, key=ok.get)
    return best if ok[best] > ok["base"] * (1.0 + min_gain) else "base"


def check_fused_lightning_backward(heads: int, head_dim: int, tokens: int = 4096, docs: int = 4, seed: int = 0,
                                   device: str = "cuda", dtype=None) -> float:
    """Relative error of the lightning backward's dk and dv with SALA_LIGHTNING_FUSED_BWD=1 against the two-walk
    backward, on random inputs (bf16 by default) of one packed micro-batch ([1, tokens, heads, head_dim], `docs`
    documents): the guard before a calibration variant trains with the fused walk on a GPU. Returns the larger of
    ||fused - two walks|| / ||two walks|| over dk and dv."""
    import torch

    from sala.ops.lightning import lightning_attention
    from sala.ops.slopes import lightning_log_decay

    g = torch.Generator().manual_seed(seed)
    shape = (1, tokens, heads, head_dim)
    q, k, v, do = (torch.randn(shape, generator=g).to(device, dtype or torch.bfloat16) for _ in range(4))
    cuts = torch.randperm(tokens - 1, generator=g)[:docs - 1] + 1
    cu = torch.cat([torch.tensor([0]), cuts.sort().values, torch.tensor([tokens])]).to(device, torch.int32)
    log_decay = lightning_log_decay(heads, device=torch.device(device))

    def grads(fused: str) -> tuple:
        old = set_env({"SALA_LIGHTNING_FUSED_BWD": fused})
        try:
            qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
            o, _ = lightning_attention(qq, kk, vv, log_decay, cu_seqlens=cu)
            o.backward(do)
            return kk.grad.float(), vv.grad.float()
        finally:
            restore_env(old)

    two, one = grads("0"), grads("1")
    return max(float((a - b).norm() / b.norm().clamp_min(1e-30)) for a, b in zip(one, two))
