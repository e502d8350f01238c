"""The small SALA model's GPU training run: data, calibration, stage plan, training, retrieval probes, evaluation.

    python experiments/train_small/train_small_gpu.py OUT --config experiments/train_small/config.yaml [--option ...]

Options: `--help`, or small_run_common.build_parser; experiments/train_small/README.md explains the recipe.
A plan by steps (--stable-steps, --decay-steps) is deterministic; without it the stages are sized from a training
time budget and the tokens/s a short calibration run measures on this machine."""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import runpy
import shutil
import statistics
import time

import torch
from small_run_common import (
    choose_variant,
    chosen_overrides,
    data_epochs,
    decay_set,
    eval_plan,
    long_retrieval_set,
    parse_options,
    parse_variants,
    replan_last_call,
    restore_env,
    set_env,
    split_variant,
)
from small_run_common import packed as packed_set

from sala.bench.common import run_metadata, write_json
from sala.data import read_meta
from sala.eval.runner import format_table, run_tasks
from sala.train import Trainer, load_config
from sala.train.config import validate
from sala.train.metrics import read_metrics

opt = parse_options()
if opt.branch:   # another decay stage of a finished run: its own script, the same options
    runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_small_branch.py"),
                   run_name="__main__")
    raise SystemExit(0)
out, data, cpu = opt.out, opt.data, opt.cpu
os.makedirs(out, exist_ok=True)
budget = opt.train_seconds
by_steps = bool(opt.stable_steps)   # a plan by steps: no time budget, no time limit
work = opt.work_dir   # scratch (training runs, calibration)
final_dir = f"{work}/run/final"   # the trained model (save_final)
split = opt.split_call or ""   # "first" / "middle" / "second": one training run over several device calls
resuming, handing_over = split in ("middle", "second"), split in ("first", "middle")
state_path = os.path.join(work, "split_state.json")
split_state: dict = {}
if resuming:
    if not os.path.isfile(state_path):
        raise SystemExit(f"--split-call {split}: {state_path} is missing. The first call did not finish its part, "
                         "or this is a fresh machine (a device machine keeps ignored files only while it stays "
                         "warm): run the whole thing again with --split-call first")
    split_state = json.load(open(state_path))
    if split_state.get("finished"):
        raise SystemExit(f"--split-call {split}: an earlier call finished the whole run ({state_path}); nothing to do")
else:
    shutil.rmtree(work, ignore_errors=True)
base = [f"data.path={data}", "progress=false"]
if cpu:
    base += ["model.preset=sala-tiny", "model.config={}", "stages.0.seq_len=256", "stages.1.seq_len=256",
             "stages.0.micro_batch=2", "stages.1.micro_batch=2", "stages.0.warmup_steps=2", "eval_windows=2",
             "log_every=2"]
variants = parse_variants(opt.calibrate_variants)   # refused here, before any work, when malformed

def apply_variant(overrides: list[str]) -> None:
    """Run everything from here on with a calibration variant: its config overrides join `base`, its variables the
    environment."""
    over, env = split_variant(overrides)
    base.extend(over)
    set_env(env)

variant_report = split_state.get("variant_report") if resuming else None   # the calibration variants and the choice
if chosen_overrides(variant_report):   # the first call's choice, so that the plan comes out the same
    apply_variant(chosen_overrides(variant_report))
    print(f"calibration variant {variant_report['chosen']!r} (the first call's choice): "
          f"{' '.join(chosen_overrides(variant_report))}")
lengths, samples = eval_plan(cpu)
cfg_path = opt.train_config
t_all = time.time()
sources = list(opt.prepare_sources)
synth_lengths, synth_tasks = opt.synthetic_lengths, opt.synthetic_tasks

packed = functools.partial(packed_set, cpu=cpu, tasks=synth_tasks)   # built when missing (small_run_common)

if sources:
    packed(data, sources, opt.synthetic_fraction, synth_lengths, seed=1234, max_docs=opt.data_max_docs or None)
decay_data = decay_set(opt)   # the decay stage on retrieval-rich data (--decay-sources + --decay-synthetic-fraction)
warm_share = opt.retrieval_warmup_share
retr_seq = opt.retrieval_seq_len   # 0: the stable stage's windows
full = load_config(cfg_path, base)   # the config's own stages (sizes of the stable stage)
retr_steps = opt.retrieval_steps
retr_mb = opt.retrieval_micro_batch or full.stages[0].micro_batch
short_data = None
retr_prefix = os.path.join(opt.retrieval_data_dir, "retrieval") if opt.retrieval_data_dir else data.rstrip("/")
retr_epochs = max(1.0, opt.retrieval_data_epochs)
retr_tasks = tuple(opt.retrieval_tasks)
tasks_tag = "" if retr_tasks == synth_tasks else "_" + "-".join(retr_tasks)

def retrieval_docs(tokens: float) -> int:
    """stdlib documents for a retrieval dataset of ~`tokens` tokens (400 documents + 90% synthetic: ~18M)."""
    return 40 if cpu else max(400, math.ceil(400 * tokens / retr_epochs / 18e6))

if warm_share > 0 or retr_steps:   # a first stage on short retrieval samples (stdlib subset + 90% synthetic)
    if retr_seq and retr_seq < 2048:   # samples that fit the short windows whole (question and answer included)
        short_lengths, short_path = tuple(sorted({max(64, retr_seq // 4), max(64, retr_seq // 2)})), f"_short{retr_seq}"
    else:
        short_lengths, short_path = (256, 512, 1024), "_short"
    # the dataset grows with the tokens --retrieval-steps asks for, so that the stage sees each sample about
    # --retrieval-data-epochs times
    want = retr_steps * retr_mb * (retr_seq or full.stages[0].seq_len)
    short_data = packed(retr_prefix + short_path + tasks_tag, ["stdlib"], 0.9, short_lengths, seed=2468,
                        max_docs=retrieval_docs(want), tasks=retr_tasks)
long_steps = opt.retrieval_long_steps
long_seq = opt.retrieval_long_seq_len or full.stages[0].seq_len
long_data, long_lengths = None, ()
if long_steps:   # a second retrieval stage: the same tasks at long lengths, in the stable stage's micro-batch
    long_data, long_lengths = long_retrieval_set(
        f"{retr_prefix}_long{long_seq}{tasks_tag}", long_seq, cpu=cpu, tasks=retr_tasks,
        max_docs=retrieval_docs(long_steps * full.stages[0].micro_batch * long_seq))
if opt.prepare_only:
    print("--prepare-only: datasets built:", ", ".join(p for p in (data if sources else None, decay_data, short_data,
                                                                   long_data) if p))
    raise SystemExit(0)

def compile_overrides(c=None) -> list[str]:
    """model.compile as use_compile says (off on the CPU, or after a failed compiled calibration), and the config's
    (`c`, default `full`) compiled loss and compiled blocks only with it (they need the compiled model)."""
    c = c or full
    return [f"model.compile={str(use_compile).lower()}",
            f"model.compile_loss={str(use_compile and c.model.compile_loss).lower()}",
            f"model.compile_blocks={str(use_compile and c.model.compile_blocks).lower()}"]

def tokens_per_s(sparse: bool, steps: int, extra: list[str] | None = None, **stage) -> tuple[float, float | None]:
    """Throughput of a short run: the median of its log windows after the first (which compiles the kernels), or the
    last window when there is one other. `extra`: config overrides on top of `base` (a calibration variant);
    `stage` overrides the stable stage's fields (seq_len, micro_batch, data)."""
    over = base + list(extra or [])
    cfg = load_config(cfg_path, over + compile_overrides(load_config(cfg_path, over) if extra else None)
                      + [f"out_dir={work}/calib_{int(sparse)}", "resume=false", "save_final=false", "log_every=4",
                         "eval_windows=1"])
    cfg.stages = [dataclasses.replace(cfg.stages[0], name="calib", steps=steps, warmup_steps=0, sparse=sparse,
                                      **stage)]
    tr = Trainer(cfg)
    tr.fit()
    recs = [r for r in tr.history if "tokens_per_s" in r]
    del tr
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    steady = recs[1:] or recs
    tps = statistics.median(r["tokens_per_s"] for r in steady)
    mfus = [r["mfu"] for r in steady if r["mfu"] is not None]
    return tps, (statistics.median(mfus) if mfus else None)

def measure_variant(name: str, overrides: list[str]) -> dict:
    """One calibration variant's row: its tokens/s and MFU as `tokens_per_s` measures the base, or why it has none
    ("error": it failed, e.g. out of memory)."""
    row, (over, env) = {"name": name, "overrides": overrides}, split_variant(overrides)
    old = set_env(env)
    try:
        row["tokens_per_s"], row["mfu"] = tokens_per_s(False, calib_steps, extra=over)
    except Exception as e:   # a variant that fails is reported and not chosen; the run goes on
        import traceback
        traceback.print_exc()
        row["error"] = f"{type(e).__name__}: {e}"
        if torch.cuda.is_available():   # e.g. out of memory at a larger micro-batch: give it back first
            torch.cuda.empty_cache()
    finally:
        restore_env(old)
    return row

calib_steps = 4 if cpu else 16   # log windows of 4 steps: the first compiles, the median of the other three counts
use_compile = not cpu
decay_sparse = True
tps_retr = None
t_data = time.time() - t_all   # data preparation (building the packed sets when missing)
if resuming:   # the first call's measurements, so that the plan below comes out the same
    tps_off, mfu_off, tps_retr, use_compile = (split_state[k]
                                               for k in ("tps_off", "mfu_off", "tps_retr", "use_compile"))
else:
    try:
        tps_off, mfu_off = tokens_per_s(False, calib_steps)
    except Exception as e:  # keep the run alive: train without torch.compile
        import traceback
        traceback.print_exc()
        print(f"compiled training failed ({type(e).__name__}: {e}); training without torch.compile")
        use_compile = False
        tps_off, mfu_off = tokens_per_s(False, calib_steps)
    if variants:   # the same calibration for each variant; the fastest trains when it beats the base by the min gain
        min_gain = opt.variant_min_gain
        rows = ([{"name": "base", "overrides": [], "tokens_per_s": tps_off, "mfu": mfu_off}]
                + [measure_variant(name, overrides) for name, overrides in variants])
        forced = opt.variant or None
        chosen = choose_variant({r["name"]: r.get("tokens_per_s") for r in rows}, min_gain, forced)
        variant_report = {"variants": rows, "chosen": chosen, "min_gain": min_gain, "forced": bool(forced)}
        for r in rows:
            print(f"calibration variant {r['name']:>16}: "
                  + (f"{r['tokens_per_s']:,.0f} tok/s" if r.get("tokens_per_s")
                     else r.get("rejected") or r.get("error", "no measurement"))
                  + ("  <- chosen" if r["name"] == chosen else ""))
        if chosen != "base":   # everything after this (data sizes aside) runs with the variant
            apply_variant(chosen_overrides(variant_report))
            full = load_config(cfg_path, base)
            tps_off, mfu_off = next((r["tokens_per_s"], r["mfu"]) for r in rows if r["name"] == chosen)
            if not opt.retrieval_micro_batch:
                retr_mb = full.stages[0].micro_batch
    if short_data and retr_steps:   # the retrieval stage's own speed (small windows and batches run slower per token)
        tps_retr, _ = tokens_per_s(False, calib_steps, micro_batch=retr_mb, data=short_data,
                                   **({"seq_len": retr_seq} if retr_seq else {}))
tps_on, mfu_on = None, None   # the decay stage's own log measures sparse-on speed (no separate calibration)
tok_step = full.stages[0].seq_len * full.stages[0].micro_batch
t_cal = time.time() - t_all
train_budget = budget if not cpu else 20
if opt.total_seconds and not split:   # whole-script budget: what prepare + calibration left, minus evaluation
    left = opt.total_seconds - (time.time() - t_all) - opt.eval_seconds - 45
    train_budget = max(30.0, min(train_budget, left))
if by_steps:
    steps_off, steps_on = opt.stable_steps, opt.decay_steps
else:
    steps_off = max(4, int(0.75 * train_budget * tps_off / tok_step))
    # the decay stage runs sparse attention at about 0.6x the sparse-off speed; a higher guess gets the decay stage
    # cut by the time limit before its end
    steps_on = max(2, int(0.25 * train_budget * opt.decay_speed_ratio * tps_off / tok_step))
limit = None if by_steps else train_budget * 1.1 + 30
if split and opt.total_seconds and not by_steps:   # this call's share: to a checkpoint (first), before evaluation
    reserve = 30.0 if handing_over else opt.eval_seconds + 45
    limit = max(10.0, opt.total_seconds - (time.time() - t_all) - reserve)
print(f"data {t_data:.0f}s, calibration {t_cal - t_data:.0f}s: sparse off {tps_off:,.0f} tok/s (MFU {mfu_off}); "
      f"training {steps_off} + {steps_on} steps of {tok_step} tokens, "
      + ("no time limit" if limit is None else f"time limit {limit:.0f}s"))

ov = base + compile_overrides() + [
             f"out_dir={work}/run", "resume=false", f"stages.0.steps={steps_off}", f"stages.1.steps={steps_on}",
             "time_limit_s=null" if limit is None else f"time_limit_s={limit:.0f}",
             f"stages.0.warmup_steps={min(50, steps_off // 5)}", f"stages.1.sparse={str(decay_sparse).lower()}",
             f"eval_every={max(10, (steps_off + steps_on) // 6)}",
             "keep_stage_ends=true"]   # the stable stage's end: where train_small_branch.py starts other decay stages
if decay_data:
    ov.append(f"stages.1.data={decay_data}")
cfg = load_config(cfg_path, ov)
if short_data:
    stable = cfg.stages[0]
    seq = retr_seq or stable.seq_len
    if retr_steps:   # a fixed number of steps; the stable stage gives up the time they take
        step_tokens = seq * retr_mb
        want_s = retr_steps * step_tokens / tps_retr
        cap_s = opt.retrieval_max_share * train_budget
        n_warm = retr_steps
        if want_s > cap_s and not by_steps:   # small steps run slowly: many of them can take the whole budget
            n_warm = max(1, int(cap_s * tps_retr / step_tokens))
            print(f"--retrieval-steps {retr_steps} would take {want_s:.0f}s at {tps_retr:,.0f} tok/s, "
                  f"more than --retrieval-max-share of the {train_budget:.0f}s training budget ({cap_s:.0f}s): "
                  f"running {n_warm} steps")
        # the stable stage gives up the time (by steps: the tokens) the retrieval steps take
        stable_steps = steps_off - (round(n_warm * step_tokens / tok_step) if by_steps else
                                    round(n_warm * step_tokens / tps_retr * tps_off / tok_step))
    else:            # the share of the sparse-off tokens, in windows of `seq`
        warm_tokens = warm_share * steps_off * tok_step
        n_warm = max(1, int(warm_tokens / (seq * retr_mb)))
        stable_steps = steps_off - round(warm_tokens / tok_step)
    cfg.stages = [dataclasses.replace(stable, name="retrieval", steps=n_warm, seq_len=seq, micro_batch=retr_mb,
                                      data=short_data, warmup_steps=min(stable.warmup_steps, n_warm)),
                  dataclasses.replace(stable, steps=max(1, stable_steps), warmup_steps=0),
                  *cfg.stages[1:]]
    print(f"retrieval warm-up: {n_warm} steps of {retr_mb} x {seq} tokens on {short_data}"
          f"{f' ({tps_retr:,.0f} tok/s)' if tps_retr else ''}, then {cfg.stages[1].steps} stable steps")
if long_data:   # before the stable stage, which gives up the steps' time (same micro-batch, tokens/s as calibrated)
    i_stable = [st.name for st in cfg.stages].index("stable")
    stable = cfg.stages[i_stable]
    per_step = long_seq * stable.micro_batch / tok_step   # in stable steps
    # the stable stage keeps at least a third of the steps it has after the short retrieval stage (a third of all
    # sparse-off steps, retrieval stage included, can leave no room for the long stage)
    n_long = min(long_steps, max(1, int((stable.steps - stable.steps // 3) / per_step)))
    if n_long < long_steps:
        print(f"--retrieval-long-steps {long_steps} would leave the stable stage less than a third of its "
              f"{stable.steps} steps: running {n_long}")
    cfg.stages[i_stable:i_stable + 1] = [
        dataclasses.replace(stable, name="retrieval_long", steps=n_long, seq_len=long_seq, data=long_data,
                            warmup_steps=0 if i_stable else min(stable.warmup_steps, n_long)),
        dataclasses.replace(stable, steps=max(1, stable.steps - round(n_long * per_step)), warmup_steps=0)]
    print(f"long retrieval stage: {n_long} steps of {stable.micro_batch} x {long_seq} tokens on {long_data} "
          f"(samples of {', '.join(map(str, long_lengths))} tokens), "
          f"then {cfg.stages[i_stable + 1].steps} stable steps")
validate(cfg)   # the stages assembled above obey the config rules (e.g. warmup within each stage's steps)
stage_index = {st.name: i for i, st in enumerate(cfg.stages)}
# how many times each stage reads its dataset: a small set read many times makes the held-out loss rise
stage_epochs = {st.name: data_epochs(st, data) for st in cfg.stages}
for name, epochs in stage_epochs.items():
    if epochs > 3:
        print(f"stage {name!r} reads its dataset {epochs:.1f} times: a larger set (--retrieval-data-epochs, "
              "--decay-sources / --decay-max-docs, --data-max-docs) repeats less")
probe_len = 256 if cpu else max(short_lengths) if short_data else None   # the retrieval stage's longest samples
probe: dict = dict(split_state.get("probe", {}))
if resuming:   # the same options must give the same plan: resume the first call's run from its checkpoint
    first = json.load(open(os.path.join(work, "run", "config.json")))["stages"]
    now = json.loads(json.dumps(cfg.to_dict()["stages"]))   # as the first call's config.json holds them
    if split == "second":   # a last call that ran before may have shortened the stable stage (below): not a new plan
        for a, b in zip(first, now):
            if a.get("name") == b.get("name") == "stable":
                a["steps"] = b["steps"]
    if first != now:
        i = next((i for i, (a, b) in enumerate(zip(first, now)) if a != b), min(len(first), len(now)))
        a, b = (first[i] if i < len(first) else {}), (now[i] if i < len(now) else {})
        diff = {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}
        raise SystemExit(f"--split-call {split}: stage {i} ({a.get('name') or b.get('name')}) differs from the first "
                         f"call's (first, now): {diff}; run this call with the first call's options")
    cfg.resume = True
    cfg.time_limit_s = limit
replanned = None
if split == "second":   # the last call finishes the decay stage: the stable stage gives up what does not fit
    # (the stable stage can run below the calibrated speed, and each call recompiles); --split-final-seconds: the
    # seconds to plan for (default: the limit; by steps, nothing is re-planned without it)
    plan_s = opt.split_final_seconds or limit
    replanned = plan_s and replan_last_call(f"{work}/run", cfg.stages, float(plan_s),
                                 decay_speed_ratio=opt.decay_speed_ratio,
                                 warmup_s=opt.replan_warmup_seconds,
                                 calibrated_tps={i: tps for i, st in enumerate(cfg.stages)
                                                 if (tps := tps_retr if st.name == "retrieval" else tps_off)})
    if replanned:
        i_stable = stage_index["stable"]
        cfg.stages[i_stable] = dataclasses.replace(cfg.stages[i_stable], steps=replanned["now"])
        print(f"last call: the stable stage ends at step {replanned['now']} of its {replanned['planned']} so that the "
              f"decay stage finishes ({replanned['reason']})")

def retrieval_probe(tag: str, model_dir: str) -> None:
    """niah_single at the retrieval stage's sample length: did retrieval form there (and survive)?"""
    r = run_tasks(model_dir, [probe_len], ["niah_single"], num_samples=2 if cpu else 40, seed=11)
    probe[tag] = r["results"]["niah_single"][str(probe_len)]["score"]
    print(f"retrieval probe ({tag}): niah_single at {probe_len} tokens: {probe[tag]:.1f}")

trainer = Trainer(cfg)
split_stop = opt.split_stop_after if handing_over else 0
if short_data and not resuming:   # stop after the retrieval stage, probe, then go on with the rest of the time
    limit0, t_fit = cfg.time_limit_s, time.time()
    cfg.stop_after = cfg.stages[0].steps
    summary = trainer.fit()
    if not summary["time_limit_reached"]:
        trainer.save_model(f"{work}/probe_retrieval")
        retrieval_probe("after_retrieval_stage", f"{work}/probe_retrieval")
        cfg.stop_after = split_stop or None
        cfg.time_limit_s = None if limit0 is None else max(1.0, limit0 - (time.time() - t_fit))
        summary = trainer.fit()
    summary["seconds"] = time.time() - t_fit
else:
    cfg.stop_after = split_stop or None
    summary = trainer.fit()
summary["seconds"] += split_state.get("training_seconds", 0.0)
unfinished = summary["global_step"] < cfg.total_steps()
if handing_over and unfinished and summary["stopped_early"]:
    trainer.save_checkpoint()   # a time limit checkpoints by itself; --split-stop-after does not
# the final model's loss on the corpus' held-out split: the trainer's own last evaluation reads the last stage's data
# (the decay set with --decay-synthetic-fraction), which is not comparable with a corpus-only run
corpus_heldout = (None if handing_over and unfinished else
                  trainer.evaluate(stage_index=stage_index["stable"]))
del trainer
if probe_len and os.path.isdir(final_dir) and not (handing_over and unfinished):
    retrieval_probe("final", final_dir)
if torch.cuda.is_available():
    torch.cuda.empty_cache()
recs = read_metrics(f"{work}/run/metrics.jsonl")
shutil.copy(f"{work}/run/metrics.jsonl", os.path.join(out, "metrics.jsonl"))

train_logs = [r for r in recs if "loss" in r]
def mfu_stats(name):
    stage = stage_index[name]
    xs = [r["mfu"] for r in train_logs if r["stage"] == stage and r["mfu"] is not None][1:]
    ts = [r["tokens_per_s"] for r in train_logs if r["stage"] == stage][1:]
    return {"median_mfu": statistics.median(xs) if xs else None,
            "median_tokens_per_s": statistics.median(ts) if ts else None,
            "median_tflops": statistics.median([r["tflops"] for r in train_logs if r["stage"] == stage][1:] or [0])}
val = [r for r in recs if "val_loss" in r]
# the attention the evaluation runs in the sparse layers: the final model's own setting, i.e. that of the last stage
# trained (a run that ends by time inside its sparse-off stable stage is scored with dense NoPE layers)
final_config = f"{final_dir}/config.json"   # absent after a call that handed over at --split-stop-after
eval_sparse = (bool(json.load(open(final_config)).get("use_sparse_attention", True)) if os.path.exists(final_config)
               else None)
report = {"results": {}, "lengths": lengths, "tasks": [], "status": "pending", "sparse_attention": eval_sparse}
if eval_sparse is False and not (handing_over and unfinished):
    print("note: the final model has sparse attention off (its last stage trained ran without it): the NIAH table "
          "below runs its sparse layers as dense attention")
result = {
    "meta": run_metadata(), "config": cfg.to_dict(), "params": summary["params"],
    "training": {"steps": summary["global_step"], "tokens": summary["tokens"], "seconds": summary["seconds"],
                 "time_limit_reached": summary.get("time_limit_reached", False),
                 "skipped_steps": summary.get("skipped_steps", 0),   # non-finite steps, not applied (all calls)
                 "stable_sparse_off": mfu_stats("stable"), "decay_sparse_on": mfu_stats("decay"),
                 "final_train_loss": train_logs[-1]["loss"], "heldout_loss": val[-1]["val_loss"] if val else None,
                 "heldout_loss_data": cfg.stages[-1].data or data, "corpus_heldout_loss": corpus_heldout,
                 "heldout_curve": [(r["step"], r["val_loss"]) for r in val],
                 "heldout_curve_note": "each point on the held-out split of its stage's own dataset",
                 "data_epochs": stage_epochs},
    "decay_stage_sparse": decay_sparse, "decay_stage_data": decay_data, "compiled": use_compile,
    "retrieval_warmup": {"share": warm_share, "steps": cfg.stages[0].steps, "steps_requested": retr_steps or None,
                         "data": short_data,
                         "seq_len": cfg.stages[0].seq_len, "micro_batch": cfg.stages[0].micro_batch,
                         "tokens_per_s": tps_retr}
    if short_data else None,
    "retrieval_probe": {"task": "niah_single", "length": probe_len, "scores": probe} if probe_len else None,
    "retrieval_long": {"steps": cfg.stages[stage_index["retrieval_long"]].steps, "steps_requested": long_steps,
                       "seq_len": long_seq, "sample_lengths": list(long_lengths), "data": long_data}
    if long_data else None,
    "data_meta": read_meta(data),
    "calibration": {"tokens_per_s_sparse_off": tps_off, "mfu_sparse_off": mfu_off,
                    "tokens_per_s_sparse_on": tps_on, "mfu_sparse_on": mfu_on,
                    "variant": variant_report["chosen"] if variant_report else "base", "variants": variant_report},
    "niah": report, "niah_table": "", "total_seconds": time.time() - t_all,
}
if split:
    result["split_calls"] = {"earlier_calls_seconds": split_state.get("call_seconds"),
                             "calls": split_state.get("calls", 0) + 1, "this_call": split,
                             "steps_planned": cfg.total_steps(), "stable_stage_replanned": replanned}

def save_summary():
    result["niah_table"] = format_table(report) if report["tasks"] else ""
    result["total_seconds"] = time.time() - t_all + split_state.get("call_seconds", 0.0)
    write_json(os.path.join(out, "summary.json"), result)

if handing_over and unfinished:   # hand over to the next call: the measurements, the probe, the time spent
    report["status"] = "training continues in the next call (--split-call middle or second)"
    save_summary()
    write_json(state_path, {"tps_off": tps_off, "mfu_off": mfu_off, "tps_retr": tps_retr, "use_compile": use_compile,
                            "variant_report": variant_report,
                            "probe": probe, "training_seconds": summary["seconds"],
                            "call_seconds": time.time() - t_all + split_state.get("call_seconds", 0.0),
                            "calls": split_state.get("calls", 0) + 1,
                            "global_step": summary["global_step"], "finished": False})
    print(f"{split} call done at step {summary['global_step']} of {cfg.total_steps()}: checkpoint in {work}/run; "
          "run the same command with --split-call second (or middle, for one more part) on this machine")
    raise SystemExit(0)
if handing_over:
    write_json(state_path, {"finished": True})
save_summary()   # training results are safe before the evaluation starts

try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["tokens"] / 1e6 for r in train_logs], [r["loss"] for r in train_logs], label="train loss")
    if val:
        ax.plot([r["tokens"] / 1e6 for r in val], [r["val_loss"] for r in val], "o-", label="held-out loss")
    b = [r["tokens"] / 1e6 for r in train_logs if r["stage"] == stage_index["decay"]]
    if b:
        ax.axvline(b[0], color="gray", ls="--", lw=1, label="decay, sparse on")
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"SALA-small ({summary['params'] / 1e6:.0f}M params), 4K context")
    ax2 = ax.twinx()
    ax2.plot([r["tokens"] / 1e6 for r in train_logs], [r["lr"] for r in train_logs], color="k", alpha=0.3, lw=1)
    ax2.set_ylabel("learning rate")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "loss.png"), dpi=120)
except Exception as e:
    print("plot failed:", e)

eval_budget = opt.eval_seconds
t_eval = time.time()

def guarded(key: str, run):
    """run() (a run_tasks report), or None with its error under report["errors"][key]: the evaluation goes on."""
    try:
        return run()
    except Exception as e:
        import traceback
        traceback.print_exc()
        report.setdefault("errors", {})[key] = f"{type(e).__name__}: {e}"
        return None

def niah_single_changed(lengths_: list[int], n: int, teacher_forced: bool = False, **config) -> dict:
    """niah_single on the evaluation's prompts (seed 7) with the final model, loaded as the evaluation loads it, with
    `config` fields changed (a diagnostic)."""
    from sala.eval.runner import resolve_device_dtype
    from sala.modeling.tokenizer import load_tokenizer
    from sala.train.model_factory import load_model_dir
    dev, dtype = resolve_device_dtype(None)
    m = load_model_dir(final_dir, dtype=dtype, device=dev)
    for key, value in config.items():
        setattr(m.config, key, value)
    return run_tasks(None, lengths_, ["niah_single"], num_samples=n, seed=7, model=m,
                     tokenizer=load_tokenizer(final_dir), teacher_forced=teacher_forced)

def precision_diagnostic(n: int) -> None:
    """niah_single at 4x (the target's length) on the same prompts again, with fp32 weights and activations: does
    the bf16 evaluation lose answers the model has (copy errors in the last digits of a long context)?"""
    r = guarded("fp32_diagnostic", lambda: run_tasks(final_dir, [lengths[-1]], ["niah_single"], num_samples=n, seed=7,
                                                     dtype="float32", teacher_forced=True))
    if r:
        report["fp32_diagnostic"] = {"note": "the same niah_single prompts at the longest length, fp32 model",
                                     "results": r["results"], "seconds": r["seconds"]}

def hype_diagnostic(n: int) -> None:
    """niah_single at 1x and 4x on the same prompts again with HyPE query scaling at inference (the softmax layers'
    queries times s_t = log(t + a) / log(a), a = --hype-eval-base, default 500 as in HypeNet; 0 skips it). The released
    SALA does not use it (an opt-in of SalaConfig): does sharper attention at long positions recover the misses?"""
    a = opt.hype_eval_base or 0.0
    if a <= 1:
        return
    r = guarded("hype_diagnostic", lambda: niah_single_changed([lengths[0], lengths[-1]], n, teacher_forced=True,
                                                               hype_query_scale_base=a))
    if r:
        report["hype_diagnostic"] = {"note": "the same niah_single prompts, HyPE query scaling at inference "
                                             f"(a = {a:g})",
                                     "base": a, "results": r["results"], "seconds": r["seconds"]}

for task, n in samples.items():
    if time.time() - t_eval > eval_budget:
        print(f"evaluation time budget ({eval_budget:.0f}s) spent: skipping {task}")
        report.setdefault("skipped", []).append(task)
        continue
    # niah_single also teacher-forced: the typical misses are last digits wrong, and the answer's later
    # tokens come from the cached decoding path (sala.eval.teacher_forced says whether that path loses them)
    r = guarded(task, lambda: run_tasks(final_dir, lengths, [task], num_samples=n, seed=7,
                                        teacher_forced=task == "niah_single"))
    if r is None:
        continue
    report["results"].update(r["results"])
    report["tasks"].append(task)
    report["eval_seconds"] = report.get("eval_seconds", 0) + r["seconds"]
    if task == "niah_single":   # before the other tasks: it bears on the target
        precision_diagnostic(n)
        hype_diagnostic(n)
    save_summary()   # after every task: a cut-off run keeps what it measured
if not cpu and time.time() - t_eval < eval_budget:   # diagnostic: the same model with sparse attention off (dense NoPE)
    r = guarded("dense_diagnostic", lambda: niah_single_changed(lengths[:2], 20, use_sparse_attention=False))
    if r:
        report["dense_diagnostic"] = {"note": "sparse layers run dense (use_sparse_attention=False)",
                                      "results": r["results"]}
report["status"] = "done"
save_summary()
table = result["niah_table"]
print(table)
print(json.dumps({k: result["training"][k] for k in ("steps", "tokens", "seconds", "skipped_steps", "final_train_loss",
                                                      "heldout_loss", "corpus_heldout_loss",
                                                      "stable_sparse_off", "decay_sparse_on")}, indent=1))
