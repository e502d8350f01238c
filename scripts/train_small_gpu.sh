#!/usr/bin/env bash
# Train the small SALA model for real on one GPU, then evaluate it on the NIAH tasks at 1x..4x its
# training length, and write metrics, held-out loss, the NIAH table, a loss plot and a summary JSON.
#
#   scripts/train_small_gpu.sh OUT_DIR            # OUT_DIR default: runs/train_small
# env: TRAIN_SECONDS (training time budget, default 200), DATA (packed dataset, default
#      train_data/py-bpe8k-synth; with PREPARE_SOURCES set it is built first when missing),
#      SMALL_CPU=1 (a seconds-long dry run of the same script with the tiny preset on the CPU),
#      WORK_DIR (scratch folder for the runs, default runs/train_small_work),
#      TOTAL_SECONDS (cap the whole script: training gets what preparation and calibration leave),
#      PREPARE_SOURCES (e.g. "stdlib,python-packages": build DATA first when it does not exist, with
#      SYNTHETIC_FRACTION (default 0.4) of synthetic retrieval samples of 512 to 4K tokens; DATA_MAX_DOCS: at most
#      this many corpus documents, to spend less of a device call on building data: stdlib + packages are ~28K
#      documents, 265M tokens with 50% synthetic, ~100 s on the H200 host's 16 cores),
#      SYNTHETIC_TASKS (default niah_single,niah_multikey,niah_multivalue,vt: the synthetic tasks of both
#      datasets; run 5 used niah_multiquery in place of niah_single, with no gain: docs/training.md),
#      SYNTHETIC_LENGTHS (default 256,512,1024,2048,4096: sample lengths in tokens, as many samples of each; runs
#      1-5 had no 256, and the CPU study's hybrid learned to retrieve on ~130-token samples),
#      DECAY_SYNTHETIC_FRACTION (e.g. 0.6: the decay stage trains on the standard library plus this share
#      of synthetic retrieval samples, built first: the recipe that taught the converted model to retrieve),
#      DECAY_SOURCES (default stdlib: the decay set's text, ~7M tokens with 60% synthetic, which run 12's decay
#      stage read ~7 times; stdlib,python-packages with DECAY_MAX_DOCS=5000 builds a set read ~2 times, and run 13
#      lost most of its retrieval with it: docs/training.md), DECAY_MAX_DOCS (at most this many documents),
#      RETRIEVAL_WARMUP_SHARE (e.g. 0.15: this share of the sparse-off steps becomes a first stage on short
#      retrieval samples, 256-1024 tokens, 90% of its tokens: the CPU study's hybrid learned to retrieve on short
#      samples after a phase transition ~20K samples in; runs 1-5 never saw that many short ones),
#      RETRIEVAL_SEQ_LEN (e.g. 512: that stage in windows of this many tokens, on samples of a quarter and half of
#      it, so the same tokens make more, smaller optimizer steps; the CPU depth study suggests retrieval needs steps),
#      RETRIEVAL_TASKS (that stage's synthetic tasks, default SYNTHETIC_TASKS; the CPU study trained on niah_single),
#      RETRIEVAL_STEPS (e.g. 2000: that stage's number of optimizer steps instead of a share of the tokens; its time,
#      measured by a calibration run at its shape, is taken from the stable stage), RETRIEVAL_MICRO_BATCH (that
#      stage's micro-batch, default the stable stage's; the CPU study learned retrieval sooner at batch 8 than 16),
#      (with a retrieval stage, the run stops after it, scores niah_single at that stage's longest sample length,
#      goes on, and scores it again at the end: summary "retrieval_probe" tells whether retrieval formed there,
#      whether it survived the corpus stages, and, against the NIAH table, whether it carried to longer contexts)
#      RETRIEVAL_MAX_SHARE (default 0.5: at most this share of the training time goes to that stage; fewer steps
#      are run, with a message, when RETRIEVAL_STEPS would take longer),
#      RETRIEVAL_LONG_STEPS (e.g. 300: a second retrieval-only stage after that one, in RETRIEVAL_LONG_SEQ_LEN-token
#      windows (default the stable stage's) of the stable stage's micro-batch, on RETRIEVAL_TASKS samples of an
#      eighth, a quarter and half of the window: run 8's retrieval formed at 256 tokens but did not reach 4K; its
#      steps come out of the stable stage, which keeps at least a third of the steps it has after the short stage),
#      DECAY_SPEED_RATIO (default 0.6: the decay stage's sparse-on speed relative to sparse-off, which sizes it),
#      CALIBRATE_VARIANTS (e.g. "blocks:model.compile_blocks=true;dkdv:env.SALA_LIGHTNING_FUSED_BWD=1": after the
#      calibration of the config as it stands ("base"), the same calibration once per variant, each a list of config
#      overrides and env.NAME=VALUE variables, on this machine and data; the fastest trains the run when it beats the
#      base by more than VARIANT_MIN_GAIN (default 0.01 = 1%), VARIANT=NAME forces one; summary calibration.variants
#      has every measurement. A variant with env.SALA_LIGHTNING_FUSED_BWD=1 first checks the fused dk/dv backward
#      against the two-walk one on the GPU and is rejected above 2e-2 relative error. Later SPLIT_CALLs reuse the
#      first call's choice),
#      RETRIEVAL_DATA_DIR (build the retrieval datasets there, as retrieval_short*/retrieval_long*, instead of next
#      to DATA: build them once on a CPU with PREPARE_ONLY=1 and carry them to the device instead of spending
#      ~100 s of the call on them), RETRIEVAL_DATA_EPOCHS (default 1: the retrieval datasets hold 1/this of the
#      tokens their stages read, so they are smaller to build and carry; the stages loop over them),
#      PREPARE_ONLY=1 (build the datasets the other variables ask for, then stop),
#      SPLIT_CALL=first|middle|second (one run over several device calls on a machine that stays warm between them:
#      the first builds data, calibrates, plans stages for TRAIN_SECONDS and trains until TOTAL_SECONDS, then
#      checkpoints into WORK_DIR and writes a partial summary; each middle call, run with the same variables,
#      resumes exactly from there and hands over again at its TOTAL_SECONDS; the second (last) finishes the stages
#      and evaluates; a middle call that finishes the stages evaluates too). Keep DATA and WORK_DIR under the repo's ignored runs/, which a warm device
#      machine keeps between calls), SPLIT_STOP_AFTER (a first or middle call stops at this global step instead: tests),
#      SPLIT_FINAL_SECONDS (the seconds the last call plans for, default its time limit: when the rest of the stable
#      stage and the whole decay stage, at the speeds the earlier calls logged plus REPLAN_WARMUP_SECONDS, default
#      40, of recompilation, do not fit, the stable stage ends sooner so that the decay stage reaches its end;
#      summary split_calls.stable_stage_replanned),
#      HYPE_EVAL_BASE (default 500; 0: off): the evaluation also scores niah_single at 1x and 4x with HyPE query
#      scaling at inference (summary niah.hype_diagnostic; opt-in, not the released SALA's behaviour),
#      BRANCH=NAME (after a finished run, on the same machine with the same DATA and WORK_DIR: another decay stage
#      from the run's stable-stage end, on the decay set DECAY_SOURCES / DECAY_MAX_DOCS / DECAY_SYNTHETIC_FRACTION
#      give it, then niah_single as the run scores it: OUT_DIR/branch_NAME_summary.json; scripts/train_small_branch.py).
set -euo pipefail
OUT_DIR=${1:-runs/train_small}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-.}
export SALA_ROOT="$(cd "$(dirname "$0")/.." && pwd)"
export OUT_DIR TRAIN_SECONDS=${TRAIN_SECONDS:-200} DATA=${DATA:-train_data/py-bpe8k-synth} SMALL_CPU=${SMALL_CPU:-0}
if [ -n "${BRANCH:-}" ]; then
  python3 "$SALA_ROOT/scripts/train_small_branch.py"
else
  python3 "$SALA_ROOT/scripts/train_small_gpu.py"
fi
