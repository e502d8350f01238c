#!/usr/bin/env bash
# One GPU job: the latency benchmark (SALA 9B shape vs HF Qwen3-8B shape, 64K..2M) and the engine's GPU test.
# Usage (device machine, repo root): OUT=/some/dir bash experiments/gpu_latency.sh [budget seconds, default 330]
# LATENCY_ARGS adds options to the bench (e.g. "--compile" for the compiled prefill, "--lengths 256K").
set -uo pipefail
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/sala_latency}
BUDGET=${1:-330}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader
python3 -m sala.bench.latency --out "$OUT/latency.json" --budget-s "$BUDGET" ${LATENCY_ARGS:-} 2>&1 | tee "$OUT/latency.log"
echo "== engine GPU test (1M-token prefill, two chunk sizes)"
python3 -m pytest -q -m gpu tests/engine/test_engine_gpu.py -p no:cacheprovider 2>&1 | tail -5 | tee "$OUT/gpu_test.log"
