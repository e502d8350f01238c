"""experiments/train_small/train_small_gpu.py (the GPU training run) works end to end: its --cpu dry run with a plan by
steps (deterministic whatever the machine's speed), the retrieval stages and the retrieval-rich decay stage switched
on, so a broken script cannot waste a GPU call. End-to-end runs of a research script: marked slow."""
from __future__ import annotations

import json

import pytest
import torch

SCRIPT = "train_small_gpu.py"


def argv(out, **opts) -> list[str]:
    """[SCRIPT, out, --option value, ...]: option names with '_' for '-'; True: a flag; None: left out."""
    args = [SCRIPT, str(out)]
    for key, value in opts.items():
        if value is None or value is False:
            continue
        args += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return args


def _packed_corpus(tmp_path, prepare_in):
    """30 small text documents packed with the shipped BPE into tmp_path/packed (20% held out)."""
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(30):
        (docs / f"d{i}.txt").write_text(" ".join(f"word{j % 17} item {i}" for j in range(120)) + "\n")
    prepare_in(tmp_path, "packed", ["docs"], tokenizer="sala", val_fraction=0.2, seed=0)
    return tmp_path / "packed"


# the --cpu plan: stages of 2 x 256 tokens per step; these steps, the retrieval stages' share taken out of them
STABLE, DECAY, TOK_STEP = 8, 4, 512


@pytest.mark.slow
@pytest.mark.parametrize("retrieval_seq,retrieval_steps,long,warm,stable",
                         # warm: 0.3 of the sparse-off tokens in windows of the retrieval stage; or the steps asked
                         # for, whose tokens the stable stage gives up (6 x 128 x 3 = 4.5 stable steps, rounded to 4)
                         [(None, None, False, 2, 6), (128, None, False, 4, 6), (128, 6, True, 6, 1)])
def test_train_small_gpu_dry_run_with_all_stages(tmp_path, run_script, prepare_in, retrieval_seq, retrieval_steps,
                                                  long, warm, stable):
    data = _packed_corpus(tmp_path, prepare_in)
    out, work = tmp_path / "out", tmp_path / "work"
    opts = dict(cpu=True, data=data, work_dir=work, decay_synthetic_fraction=0.6, retrieval_warmup_share=0.3,
                stable_steps=STABLE, decay_steps=DECAY, retrieval_seq_len=retrieval_seq,
                **({"retrieval_steps": retrieval_steps, "retrieval_micro_batch": 3,
                    "retrieval_tasks": "niah_single"} if retrieval_steps else {}))
    prefix = str(data)
    if long:   # a second retrieval stage; retrieval data built first in their own folder (--prepare-only), reused
        opts.update(retrieval_long_steps=3, retrieval_data_dir=tmp_path / "rdata", retrieval_data_epochs=2)
        run_script(argv(out, prepare_only=True, **opts), tmp_path)
        assert not (out / "summary.json").exists()
        built = sorted(p.name for p in (tmp_path / "rdata").iterdir())
        assert built == ["retrieval_long256_niah_single", f"retrieval_short{retrieval_seq}_niah_single"], built
        prefix = str(tmp_path / "rdata" / "retrieval")
        mtime = (tmp_path / "rdata" / built[0] / "meta.json").stat().st_mtime_ns
    run_script(argv(out, **opts), tmp_path)
    summary = json.loads((out / "summary.json").read_text())
    stages = summary["config"]["stages"]
    assert [s["name"] for s in stages] == ["retrieval"] + ["retrieval_long"] * long + ["stable", "decay"]
    assert [s["steps"] for s in stages] == [warm] + [3] * long + [stable, DECAY]
    if long:
        assert (tmp_path / "rdata" / built[0] / "meta.json").stat().st_mtime_ns == mtime   # reused, not rebuilt
        assert stages[1]["data"] == prefix + "_long256_niah_single" and stages[1]["steps"] == 3
        assert stages[1]["micro_batch"] == stages[2]["micro_batch"] and summary["retrieval_long"]["steps"] == 3
        # the long steps come out of the stable stage (same window and batch), which keeps a third of its steps
        assert stages[2]["steps"] >= (stages[1]["steps"] + stages[2]["steps"]) // 3
        stages = [stages[0]] + stages[2:]   # the rest as without the long stage
    short = (("_short" if retrieval_seq is None else f"_short{retrieval_seq}")
             + ("_niah_single" if retrieval_steps else ""))
    assert stages[0]["data"] == prefix + short and stages[2]["data"] == str(data) + "_decay"
    seq = retrieval_seq or stages[1]["seq_len"]
    assert stages[0]["seq_len"] == seq == summary["retrieval_warmup"]["seq_len"]
    if retrieval_steps:   # a fixed number of steps at its own micro-batch, on niah_single only, speed measured
        warm_report = summary["retrieval_warmup"]
        assert warm_report["steps_requested"] == retrieval_steps == warm_report["steps"]
        assert stages[0]["micro_batch"] == 3 and warm_report["tokens_per_s"] > 0
        assert json.loads(open(prefix + short + "/meta.json").read())["synthetic"]["tasks"] == ["niah_single"]
    else:   # the retrieval stage takes its share of the sparse-off tokens, in windows of `seq` tokens
        warm_tokens = stages[0]["steps"] * seq * stages[0]["micro_batch"]
        off_tokens = warm_tokens + stages[1]["steps"] * stages[1]["seq_len"] * stages[1]["micro_batch"]
        assert abs(warm_tokens / off_tokens - 0.3) < 0.15, (warm_tokens, off_tokens)
    assert stages[2]["sparse"] is True
    assert summary["training"]["steps"] == sum(s["steps"] for s in summary["config"]["stages"])
    assert summary["training"]["time_limit_reached"] is False
    assert summary["retrieval_warmup"]["share"] == 0.3
    assert summary["training"]["decay_sparse_on"]["median_tokens_per_s"] > 0
    # the retrieval probe: niah_single at the retrieval samples' length after that stage and at the end
    rp = summary["retrieval_probe"]
    assert rp["length"] == 256 and set(rp["scores"]) == {"after_retrieval_stage", "final"}
    assert all(0.0 <= x <= 100.0 for x in rp["scores"].values())
    assert summary["niah"]["status"] == "done" and summary["niah"]["results"]["niah_single"]
    assert summary["niah"]["sparse_attention"] is True   # the decay stage (sparse on) was the last one trained
    # the fp32 re-run of niah_single at the longest length: the same prompts as the main table
    fp32 = summary["niah"]["fp32_diagnostic"]["results"]["niah_single"]
    main = summary["niah"]["results"]["niah_single"]
    longest = str(max(int(x) for x in main))
    assert list(fp32) == [longest] and fp32[longest]["n"] == main[longest]["n"]
    assert [e["gold"] for e in fp32[longest]["examples"]] == [e["gold"] for e in main[longest]["examples"]]
    # HyPE query scaling at inference (a = 500 by default) on the same prompts at the shortest and longest length
    hype = summary["niah"]["hype_diagnostic"]
    assert hype["base"] == 500 and list(hype["results"]["niah_single"]) == [str(min(map(int, main))), longest]
    assert [e["gold"] for e in hype["results"]["niah_single"][longest]["examples"]] == \
        [e["gold"] for e in main[longest]["examples"]]
    # niah_single teacher-forced beside greedy decoding on the same prompts, in bf16/fp32 as run and in fp32
    for by_len in (main, fp32, hype["results"]["niah_single"]):
        tf = by_len[longest]["teacher_forced"]
        assert tf["n"] == by_len[longest]["n"] and tf["greedy_exact"] == pytest.approx(by_len[longest]["score"])
    for task, by_len in summary["niah"]["results"].items():   # misses: the samples below full marks, all of them
        for r in by_len.values():
            if task in ("niah_single", "niah_multikey"):   # one gold string per sample: a miss scores 0
                assert len(r["misses"]) == round(r["n"] * (1 - r["score"] / 100)), (task, r)
            assert all({"gold", "pred", "depth"} <= set(m) for m in r["misses"])
    # the corpus' held-out loss of the final model, next to the last stage's (decay set) one; data reads per stage
    tr = summary["training"]
    assert tr["heldout_loss_data"] == str(data) + "_decay" and 0 < tr["corpus_heldout_loss"] < 20
    assert tr["corpus_heldout_loss"] != tr["heldout_loss"]
    assert set(tr["data_epochs"]) == {s["name"] for s in summary["config"]["stages"]}
    assert all(x > 0 for x in tr["data_epochs"].values())
    assert (out / "metrics.jsonl").is_file() and (out / "loss.png").is_file()


@pytest.mark.slow
def test_train_small_gpu_split_over_two_calls(tmp_path, run_script, prepare_in):
    """--split-call first trains part of the plan and checkpoints; middle (same options) resumes and hands over
    again; second resumes, finishes the stages and evaluates; a later call with other options, or without the first's
    state, stops with a message. Then decay branches (--branch NAME) from the run's stable-stage end."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from sala.train.metrics import read_metrics

    data = _packed_corpus(tmp_path, prepare_in)
    out, work = tmp_path / "out", tmp_path / "work"
    opts = dict(cpu=True, data=data, work_dir=work, decay_synthetic_fraction=0.6, retrieval_seq_len=128,
                retrieval_steps=4, retrieval_micro_batch=3, retrieval_tasks="niah_single", decay_max_docs=30,
                stable_steps=12, decay_steps=4)
    root = Path(__file__).resolve().parents[2]
    script = root / "experiments" / "train_small" / SCRIPT

    def failing(**extra) -> str:
        full = {**os.environ, "PYTHONPATH": str(root), "PATH": os.path.dirname(sys.executable) + os.pathsep
                + os.environ.get("PATH", "")}
        full.pop("TRITON_INTERPRET", None)
        done = subprocess.run([sys.executable, str(script), *argv(out, **{**opts, **extra})[1:]], cwd=tmp_path,
                              env=full, capture_output=True, text=True, timeout=900)
        assert done.returncode != 0, done.stdout[-2000:]
        return done.stdout + done.stderr

    assert "split_state.json is missing" in failing(split_call="second")
    assert "where key=value was expected" in failing(calibrate_variants="a:model.compile_blocks")
    assert "go together" in failing(decay_steps=None)
    # calibration variants: each measured like the config as it stands; --variant forces the one the run trains with
    # (here a larger micro-batch), and the later calls, run without these options, keep the first call's choice
    variants = dict(calibrate_variants="mb3:stages.0.micro_batch=3,stages.1.micro_batch=3;flag:env.SALA_UNUSED=1",
                    variant="mb3")
    log = run_script(argv(out, split_call="first", split_stop_after=7, **opts, **variants), tmp_path)
    assert "<- chosen" in log
    first = json.loads((out / "summary.json").read_text())
    cal = first["calibration"]
    assert cal["variant"] == "mb3" and cal["variants"]["chosen"] == "mb3" and cal["variants"]["forced"] is True
    assert [r["name"] for r in cal["variants"]["variants"]] == ["base", "mb3", "flag"]
    assert all(r["tokens_per_s"] > 0 for r in cal["variants"]["variants"]), cal
    assert cal["tokens_per_s_sparse_off"] == cal["variants"]["variants"][1]["tokens_per_s"]
    assert [s["micro_batch"] for s in first["config"]["stages"] if s["name"] in ("stable", "decay")] == [3, 3]
    planned = sum(s["steps"] for s in first["config"]["stages"])
    decay_set = first["config"]["stages"][-1]["data"]   # --decay-max-docs: its own, smaller set
    assert decay_set == str(data) + "_decay_stdlib_30"
    meta = json.loads(open(decay_set + "/meta.json").read())
    natural = sum(split["docs"] for split in meta["splits"].values()) - meta["synthetic"]["docs"]
    assert 0 < natural <= 30
    assert first["training"]["steps"] == 7 < planned and first["niah"]["status"].startswith("training continues")
    assert first["retrieval_probe"]["scores"].keys() == {"after_retrieval_stage"}
    assert any((work / "run" / "checkpoints").iterdir())
    state = json.loads((work / "split_state.json").read_text())
    assert state["global_step"] == 7 and state["finished"] is False

    # other options would give another plan: refused before any training
    assert "differs from the first call's" in failing(split_call="second", retrieval_steps=5)
    first_log = (out / "metrics.jsonl").read_text().splitlines()
    # a middle call resumes and hands over again
    log = run_script(argv(out, split_call="middle", split_stop_after=10, **opts), tmp_path)
    assert "resumed from" in log and "at step 7" in log
    middle = json.loads((out / "summary.json").read_text())
    assert middle["training"]["steps"] == 10 and middle["niah"]["status"].startswith("training continues")
    state = json.loads((work / "split_state.json").read_text())
    assert state["global_step"] == 10 and state["calls"] == 2
    # the last call plans for 1 s (--split-final-seconds, less than the 40 s of recompilation it allows for): the
    # stable stage gives up every step it has not run yet, so that the decay stage still runs to its end
    log = run_script(argv(out, split_call="second", split_final_seconds=1, **opts), tmp_path)
    assert "resumed from" in log and "at step 10" in log
    # the first call's records are kept as they were (resumed, not retrained), the second call's follow them
    assert (out / "metrics.jsonl").read_text().splitlines()[:len(first_log)] == first_log
    second = json.loads((out / "summary.json").read_text())
    assert second["calibration"]["variant"] == "mb3" and second["calibration"]["variants"] == cal["variants"]
    names = [s["name"] for s in first["config"]["stages"]]
    i_stable = names.index("stable")
    stable_done = 10 - sum(s["steps"] for s in first["config"]["stages"][:i_stable])
    assert 0 < stable_done < first["config"]["stages"][i_stable]["steps"]   # the hand-over was inside the stable stage
    assert "the stable stage ends at step" in log
    replanned = second["split_calls"]["stable_stage_replanned"]
    assert replanned["planned"] == first["config"]["stages"][i_stable]["steps"] and replanned["now"] == stable_done
    shortened = [dict(s, steps=stable_done) if s["name"] == "stable" else s for s in first["config"]["stages"]]
    assert second["config"]["stages"] == shortened
    planned -= replanned["planned"] - stable_done
    assert second["training"]["steps"] == planned and second["niah"]["status"] == "done"
    decay_recs = [r for r in read_metrics(out / "metrics.jsonl") if r.get("stage_name") == "decay" and "loss" in r]
    assert decay_recs[-1]["stage_step"] == first["config"]["stages"][-1]["steps"]   # the decay stage ran to its end
    # the resumed call's final model is evaluated on the corpus too, not only on the decay set
    assert 0 < second["training"]["corpus_heldout_loss"] != second["training"]["heldout_loss"], second["training"]
    assert second["retrieval_probe"]["scores"].keys() == {"after_retrieval_stage", "final"}
    assert second["training"]["seconds"] > middle["training"]["seconds"] > first["training"]["seconds"]
    assert second["split_calls"]["calls"] == 3

    # decay branches from the finished run's stable-stage end (--branch NAME): with the run's own decay set the branch
    # repeats the run's decay stage step for step; with another mix it trains on its own, separately built set
    def step_losses(path, stage=None):
        return [(r["step"], r["step_loss"]) for r in read_metrics(path)
                if "step_loss" in r and (stage is None or r["stage_name"] == stage)]

    main_decay = step_losses(out / "metrics.jsonl", "decay")
    run_script(argv(out, branch="same", **opts), tmp_path)
    same = json.loads((out / "branch_same_summary.json").read_text())
    assert same["decay_stage"]["data"] == decay_set and same["training"]["steps"] == planned
    got = step_losses(out / "branch_same_metrics.jsonl")
    assert [s_ for s_, _ in got] == [s_ for s_, _ in main_decay] and len(got) > 1
    assert all(abs(a - b) <= 1e-5 * max(1.0, abs(a)) for (_, a), (_, b) in zip(main_decay, got)), (main_decay, got)
    assert same["niah"]["results"]["niah_single"] and "| niah_single |" in same["niah_table"]
    assert 0 < same["training"]["corpus_heldout_loss"] < 20
    run_script(argv(out, branch="rich", **{**opts, "decay_synthetic_fraction": 0.8}), tmp_path)
    rich = json.loads((out / "branch_rich_summary.json").read_text())
    assert rich["decay_stage"]["data"] == decay_set + "_syn80"
    assert rich["decay_data_meta"]["synthetic"]["fraction"] == 0.8
    assert step_losses(out / "branch_rich_metrics.jsonl")[0][0] == main_decay[0][0]
    # refusals, with the reason: a name that cannot name files, a machine without the run, a set built with another mix
    assert "use letters, digits" in failing(branch="a b")
    assert "run the whole training first" in failing(branch="b", work_dir=tmp_path / "nowhere")
    assert "exists with synthetic tasks" in failing(branch="c", synthetic_tasks="niah_single")
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == sorted(set(steps)) and steps[-1] == planned   # one log across both calls, no step twice


def _small_run_common():
    import importlib
    import sys
    from pathlib import Path

    scripts = str(Path(__file__).resolve().parents[2] / "experiments" / "train_small")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    return importlib.import_module("small_run_common")


def test_calibration_variants_parse_and_choose():
    """--calibrate-variants: names with config overrides and env.NAME variables; malformed specs are refused with the
    part at fault. The choice: the fastest when it beats the base by more than the minimum gain, a forced name
    (which must have been measured), and no choice of a variant that failed (None)."""
    common = _small_run_common()
    got = common.parse_variants(" blocks:model.compile_blocks=true ; both:model.compile_blocks=true,"
                                "env.TORCHINDUCTOR_MAX_AUTOTUNE=1;")
    assert got == [("blocks", ["model.compile_blocks=true"]),
                   ("both", ["model.compile_blocks=true", "env.TORCHINDUCTOR_MAX_AUTOTUNE=1"])]
    assert common.split_variant(got[1][1]) == (["model.compile_blocks=true"], {"TORCHINDUCTOR_MAX_AUTOTUNE": "1"})
    assert common.parse_variants("") == []
    for spec, message in [("blocks", "is not 'name:key=value"), ("x:a=1;x:b=2", "used twice"),
                          ("base:a=1", "reserved"), ("x:=1", "where key=value was expected"), (":a=1", "is not")]:
        with pytest.raises(SystemExit, match=message):
            common.parse_variants(spec)
    choose = common.choose_variant
    assert choose({"base": 100.0, "a": 100.5, "b": 99.0}, 0.01) == "base"    # 0.5% is inside the noise allowance
    assert choose({"base": 100.0, "a": 102.0, "b": 104.0}, 0.01) == "b"
    assert choose({"base": 100.0, "a": None}, 0.01) == "base"                # failed: never chosen
    assert choose({"base": 100.0, "a": 90.0}, 0.01, force="a") == "a"
    with pytest.raises(SystemExit, match="not one of the calibrated variants"):
        choose({"base": 100.0}, 0.01, force="zz")
    import os
    old = common.set_env({"SALA_TEST_A": "1"})
    assert os.environ["SALA_TEST_A"] == "1" and old == {"SALA_TEST_A": None}
    common.restore_env(old)
    assert "SALA_TEST_A" not in os.environ


def test_stable_steps_to_finish_gives_up_stable_steps_so_the_decay_ends():
    """The last call of a split run: what fits keeps the plan; what does not shortens the stable stage by the
    missing seconds at its own speed, never below the steps already run."""
    f = _small_run_common().stable_steps_to_finish
    kw = dict(tok_step=1000, tps_stable=10_000.0, tps_decay=5_000.0, warmup_s=10.0)
    # 100 stable steps left (10 s) + 100 decay steps (20 s) + 10 s = 40 s
    assert f(300, 200, 100, 0, seconds=40.0, **kw) == 300
    assert f(300, 200, 100, 0, seconds=35.0, **kw) == 250        # 5 s short: 50 stable steps fewer
    assert f(300, 200, 100, 0, seconds=34.95, **kw) == 249       # rounded up, never short of time
    assert f(300, 200, 100, 0, seconds=5.0, **kw) == 200         # the steps already run stay
    assert f(300, 200, 100, 40, seconds=32.0, **kw) == 300       # 60 decay steps left: 10 + 10 + 12 s fits


def test_replan_last_call_reads_the_checkpoint_position_and_logged_speeds(tmp_path):
    """replan_last_call: the newest checkpoint's stage position and the median logged tokens/s of the earlier calls
    (the first window of a stage left out), the decay stage's own speed once it has started; None when it fits,
    when the stable stage is over, or when nothing was logged yet."""
    from sala.train.config import StageConfig

    common = _small_run_common()
    run = tmp_path / "run"
    stages = [StageConfig(name="retrieval", steps=5, seq_len=8, micro_batch=2),
              StageConfig(name="stable", steps=300, seq_len=10, micro_batch=10),
              StageConfig(name="decay", steps=100, seq_len=10, micro_batch=10)]

    def write(stage: int, stage_step: int, global_step: int, records: list[dict]) -> None:
        ck = run / "checkpoints" / f"step_{global_step:08d}"
        ck.mkdir(parents=True, exist_ok=True)
        (ck / "trainer.json").write_text(json.dumps({"state": {"stage": stage, "stage_step": stage_step,
                                                               "global_step": global_step}}))
        for name in ("model.pt", "optim.pt"):     # whole archives: a checkpoint the trainer would resume from
            torch.save({}, ck / name)
        (run / "checkpoints" / "latest").write_text(ck.name)
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    assert common.replan_last_call(str(run), stages, 10.0, decay_speed_ratio=0.5, warmup_s=10.0) is None
    # stable records: a slow first window (compiling), then 10,000 tok/s; a record after the checkpoint is ignored
    recs = ([{"step": 5, "stage": 0, "tokens_per_s": 50.0}, {"step": 10, "stage": 1, "tokens_per_s": 10.0}]
            + [{"step": 10 + 10 * i, "stage": 1, "tokens_per_s": 10_000.0} for i in range(1, 20)]
            + [{"step": 215, "stage": 1, "val_loss": 2.0}, {"step": 400, "stage": 1, "tokens_per_s": 1.0}])
    write(1, 200, 205, recs)
    # 100 stable steps at 100 steps/s (1 s), 100 decay steps at half that (2 s), 10 s warm-up: 13 s
    assert common.replan_last_call(str(run), stages, 13.0, decay_speed_ratio=0.5, warmup_s=10.0) is None
    got = common.replan_last_call(str(run), stages, 12.5, decay_speed_ratio=0.5, warmup_s=10.0)
    assert got["planned"] == 300 and got["now"] == 250 and "10,000 tok/s" in got["reason"]
    # the decay stage's own logged speed, once there is one, replaces the ratio
    write(1, 200, 205, recs[:-1] + [{"step": 50, "stage": 2, "tokens_per_s": 1.0}]
          + [{"step": 60 + i, "stage": 2, "tokens_per_s": 2_500.0} for i in range(3)])
    got = common.replan_last_call(str(run), stages, 12.5, decay_speed_ratio=0.5, warmup_s=10.0)
    assert got["now"] == 200   # 100 decay steps at 25 steps/s take 4 s: every stable step left goes
    # the stable stage is over: nothing to shorten
    write(2, 10, 315, recs)
    assert common.replan_last_call(str(run), stages, 1.0, decay_speed_ratio=0.5, warmup_s=10.0) is None
    # handed over inside the retrieval stage (run 16): its 3 steps left at its logged 16 tok/s (3 s), the stable
    # stage at its calibrated 10,000 tok/s (3 s), the decay at half (2 s), 10 s warm-up: 18 s
    write(0, 2, 2, [{"step": 1, "stage": 0, "tokens_per_s": 1.0}, {"step": 2, "stage": 0, "tokens_per_s": 16.0}])
    kw = dict(decay_speed_ratio=0.5, warmup_s=10.0, calibrated_tps={1: 10_000.0})
    assert common.replan_last_call(str(run), stages, 18.0, **kw) is None
    got = common.replan_last_call(str(run), stages, 17.0, **kw)
    assert got["now"] == 200 and "3 s for the rest of the stages before" in got["reason"]
    # without a stable-stage speed (none logged, none calibrated) there is no plan to make
    assert common.replan_last_call(str(run), stages, 17.0, decay_speed_ratio=0.5, warmup_s=10.0) is None
