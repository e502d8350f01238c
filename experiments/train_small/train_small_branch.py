"""Another decay stage for a finished small-model run: `train_small_gpu.py OUT --branch NAME` (same --data and
--work-dir as the run, on the machine that holds it) starts from the run's stable-stage end, trains the decay stage
on the decay set that --decay-sources / --decay-max-docs / --decay-synthetic-fraction describe, with the run's plan
(steps, schedule, sparse attention), and scores niah_single as the run does. The run's other stages are shared,
so branches compare decay recipes without the spread between whole runs. Writes OUT/branch_NAME_summary.json
and OUT/branch_NAME_metrics.jsonl."""
from __future__ import annotations

import json
import os
import re
import shutil
import time

import torch
from small_run_common import data_epochs, decay_set, eval_plan, parse_options

from sala.bench.common import run_metadata, write_json
from sala.data import read_meta
from sala.eval.runner import format_table, run_tasks
from sala.train import Trainer, load_config
from sala.train.metrics import read_metrics

t0 = time.time()
opt = parse_options()
out, data, cpu = opt.out, opt.data, opt.cpu
os.makedirs(out, exist_ok=True)
name = opt.branch
if not name or not re.fullmatch(r"[A-Za-z0-9_-]+", name):
    raise SystemExit(f"--branch {name!r}: use letters, digits, '_' and '-' (it names files)")
work = opt.work_dir
run_config = os.path.join(work, "run", "config.json")
if not os.path.isfile(run_config):
    raise SystemExit(f"--branch {name}: {run_config} is missing: run the whole training first, on this machine, "
                     "with the same --data and --work-dir (a device machine keeps them only while it stays warm)")
stages = json.load(open(run_config))["stages"]
names = [st["name"] for st in stages]
if "stable" not in names or names[-1] != "decay":
    raise SystemExit(f"--branch {name}: the run's stages are {names}; "
                     "a branch needs a 'stable' stage and a final 'decay'")
i_stable = names.index("stable")
start = os.path.join(work, "run", "stage_ends", f"{i_stable}_stable")
if not os.path.isfile(os.path.join(start, "trainer.json")):
    raise SystemExit(f"--branch {name}: {start} is missing: the run did not keep its stable-stage end (it needs "
                     "keep_stage_ends, which experiments/train_small/train_small_gpu.py sets since the branches came) "
                     "or has not reached it")
decay_data = decay_set(opt) or data
branch_dir = os.path.join(work, f"branch_{name}")
shutil.rmtree(branch_dir, ignore_errors=True)
cfg = load_config(run_config, [f"out_dir={branch_dir}", "resume=false", f"resume_from={start}", "keep_stage_ends=false",
                               "stop_after=null", "time_limit_s=null", "save_final=true", "progress=false",
                               f"stages.{len(stages) - 1}.data={decay_data}"])
t_train = time.time()
trainer = Trainer(cfg)
fit = trainer.fit()
corpus_heldout = trainer.evaluate(stage_index=i_stable)
del trainer
if torch.cuda.is_available():
    torch.cuda.empty_cache()
train_seconds = time.time() - t_train
recs = read_metrics(os.path.join(branch_dir, "metrics.jsonl"))
shutil.copy(os.path.join(branch_dir, "metrics.jsonl"), os.path.join(out, f"branch_{name}_metrics.jsonl"))
logs = [r for r in recs if "loss" in r]
val = [r for r in recs if "val_loss" in r]
decay = cfg.stages[-1]
result = {
    "meta": run_metadata(), "branch": name, "run_config": run_config, "started_from": start,
    "decay_stage": {"steps": decay.steps, "data": decay_data, "sparse": decay.sparse, "lr_end": decay.lr_end,
                    "data_epochs": data_epochs(decay, decay_data)},
    "decay_data_meta": read_meta(decay_data),
    "training": {"steps": fit["global_step"], "seconds": train_seconds, "skipped_steps": fit.get("skipped_steps", 0),
                 "final_train_loss": logs[-1]["loss"] if logs else None,
                 "heldout_loss": val[-1]["val_loss"] if val else None, "heldout_loss_data": decay_data,
                 "corpus_heldout_loss": corpus_heldout},
    "niah": {}, "niah_table": "",
}
summary_path = os.path.join(out, f"branch_{name}_summary.json")
write_json(summary_path, result)   # training results are safe before the evaluation

lengths, samples = eval_plan(cpu)
final = os.path.join(branch_dir, "final")
r = run_tasks(final, lengths, ["niah_single"], num_samples=samples["niah_single"], seed=7, teacher_forced=True)
result["niah"] = {"results": r["results"], "lengths": lengths, "tasks": ["niah_single"], "eval_seconds": r["seconds"]}
result["niah_table"] = format_table(result["niah"])
result["total_seconds"] = time.time() - t0
write_json(summary_path, result)
print(result["niah_table"])
print(json.dumps(result["training"], indent=1))
