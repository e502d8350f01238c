#!/usr/bin/env bash
# Small-scale reproduction of MiniCPM-SALA's conversion claims , one command per step, offline.
# Steps marked GPU were run on one H200 in a single time-budgeted call (`gpu`); each also runs alone.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=.
DATA=${DATA:-repro_data}          # packed stdlib + 30% synthetic retrieval tokens, and eval prompts
WORK=${WORK:-/tmp/repro}
OUT=${OUT:-/tmp/repro_out}
step=${1:-all}

case "$step" in
  prepare)  python3 experiments/repro_halo/repro_halo.py prepare --data "$DATA" --max-docs 100000 ;;              # CPU, ~3 min
  teacher)  python3 experiments/repro_halo/repro_halo.py teacher --data "$DATA" --out "$WORK/teacher" --seconds 110 ;;  # GPU
  convert)  python3 experiments/repro_halo/repro_halo.py convert --data "$DATA" --teacher "$WORK/teacher" --out "$WORK" ;; # GPU
  eval)     python3 experiments/repro_halo/repro_halo.py eval --data "$DATA" --models "$WORK" --out "$OUT/eval.json" ;;   # GPU
  gpu)      mkdir -p "$OUT"; python3 experiments/repro_halo/repro_halo.py gpu --data "$DATA" --work "$WORK" --out "$OUT" \
                --teacher-seconds "${TEACHER_SECONDS:-110}" --bundle-seconds "${BUNDLE_SECONDS:-35}" \
                --total-seconds "${TOTAL_SECONDS:-480}" ;;                                              # GPU, ~8 min
  bundle)   python3 experiments/repro_halo/repro_halo.py bundle --sala "${BUNDLE_SALA:-$WORK/bundle_sala}" \
                --teacher "${BUNDLE_TEACHER:-$WORK/bundle_teacher}" ;;                                   # CPU
  plot)     python3 experiments/repro_halo/repro_halo.py plot --results bench/results/repro_halo.json \
                --png bench/results/repro_halo.png --table bench/results/repro_halo_table.md ;;         # CPU
  all)      "$0" prepare; "$0" gpu; cp "$OUT/repro_results.json" bench/results/repro_halo.json; "$0" plot ;;
  *) echo "usage: $0 prepare|teacher|convert|eval|gpu|bundle|plot|all" >&2; exit 2 ;;
esac
