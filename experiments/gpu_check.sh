#!/usr/bin/env bash
# The project's GPU work, one part per device call (each part fits one 10-minute call on an H200).
#
#   OUT=/dir bash experiments/gpu_check.sh tests      # every GPU test: compiled Triton kernels (lightning, sparse, fused)
#                                                 # vs references, engine 1M
#   OUT=/dir bash experiments/gpu_check.sh kernels    # lightning vs fla, sparse (all variants) vs SDPA -> JSON
#   OUT=/dir bash experiments/gpu_check.sh lightning  # lightning GPU tests, then lightning vs fla only (launch sweep at 64K with registers/spills)
#   OUT=/dir bash experiments/gpu_check.sh sparse     # sparse GPU tests, sparse layer vs SDPA/fla 32K..2M
#                                                 # (TUNE=1: sweep launch settings at 128K first;
#                                                 #  SPARSE_VARIANTS=chunk1g,decode: variants too;
#                                                 #  PROFILE=1: selection time by kernel at 128K and 1M;
#                                                 #  SPARSE_INPUT_SMOOTHING=16: neighbour-correlated inputs,
#                                                 #  JSON sparse_kernels_smooth16_h200.json;
#                                                 #  SPARSE_BACKWARD_MAX_LEN=262144: fwd+bwd to 256K only;
#                                                 #  SPARSE_SKIP_TESTS=1: the benchmark alone)
#   OUT=/dir bash experiments/gpu_check.sh decode     # sparse decode variants (split-K attention, split-N selection)
#                                                 # at 128K and 1M, then 1M end to end with both switched on
#   OUT=/dir bash experiments/gpu_check.sh latency    # SALA 9B shape vs HF Qwen3-8B shape, 64K..2M -> JSON + PNG
#   OUT=/dir bash experiments/gpu_check.sh ab         # same-process A/B: fused elementwise kernels at 64K, 128K
#   OUT=/dir bash experiments/gpu_check.sh fused      # fused elementwise kernels: GPU tests, then a same-process
#                                                 # A/B against the unfused torch ops at 64K and 256K
#   OUT=/dir bash experiments/gpu_check.sh gaps       # a 128K prefill: wall vs GPU busy time, host syncs by call site
#                                                 # (GAPS_LENGTH=256K, GAPS_CHUNKS=32768: other chunk sizes too)
#   OUT=/dir bash experiments/gpu_check.sh train [ARGS]  # the small SALA model: data built there, trained, evaluated
#                                                 # (experiments/train_small/config.yaml; ARGS: its options, e.g.
#                                                 #  --split-call first, then middle, second while the machine is
#                                                 #  warm; --branch NAME --decay-synthetic-fraction 0.6: another
#                                                 #  decay stage from that run's stable end)
#   OUT=/dir bash experiments/gpu_check.sh repro      # HALO reproduction: teacher, SALA, ablations (needs repro_data/)
#   OUT=/dir bash experiments/gpu_check.sh profile    # where a training step's time goes, fp32 vs bf16 residual stream
#   OUT=/dir bash experiments/gpu_check.sh levers     # the training-step MFU levers (fused projections, compiled loss)
#                                                 # against the same baseline (carry train_data/retrieval_long*)
#                                                 # (needs train_data/: carry it)
#
# fla (the lightning baseline) comes as a wheel in .whl/ (carry it); the JSON lands in $OUT, to be copied into
# bench/results/ and turned into README tables by scripts/make_results_tables.py. The device copy has no .git:
# start the command with SALA_GIT_COMMIT=<git rev-parse HEAD here> so the JSON names the commit measured.
set -uo pipefail
part=${1:?usage: gpu_check.sh tests|kernels|lightning|sparse|decode|latency|ab|fused|gaps|train|repro|profile|levers}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/sala_gpu}
mkdir -p "$OUT"
# compiled kernels (inductor's FX graph and kernel caches, Triton's) under the repo's ignored runs/, which a warm
# device machine keeps between calls: a later call of a split run reuses the first call's compilations
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/runs/compile_cache/inductor}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/runs/compile_cache/triton}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
case "$part" in
  tests)
    python3 -m pytest -q -p no:cacheprovider tests/ops/test_lightning_triton.py tests/ops/test_infllmv2_triton.py \
      tests/ops/test_fused.py tests/engine/test_engine_gpu.py -k "not interpreter" 2>&1 | tee "$OUT/gpu_tests.log" | tail -15 ;;
  kernels)
    python3 -m sala.bench.kernels_lightning --out "$OUT/lightning_kernels_h200.json" 2>&1 | tail -20
    python3 -m sala.bench.kernels_sparse --out "$OUT/sparse_variants_h200.json" \
      --lengths 32768,131072,524288,1048576 --no-fla --variants default,chunk1g,decode \
      --time-budget-s 300 2>&1 | tail -20 ;;
  lightning)
    python3 -m pytest -q -p no:cacheprovider tests/ops/test_lightning_triton.py tests/ops/test_triton_sm90_compile.py \
      -k "not interpreter" 2>&1 | tee "$OUT/gpu_tests_lightning.log" | tail -3
    python3 -m sala.bench.kernels_lightning --out "$OUT/lightning_kernels_h200.json" 2>&1 | grep -v "^tune" | tail -20 ;;
  sparse)
    if [ -z "${SPARSE_SKIP_TESTS:-}" ]; then
      python3 -m pytest -q -p no:cacheprovider tests/ops/test_infllmv2_triton.py -k "not interpreter" \
        2>&1 | tee "$OUT/gpu_tests_sparse.log" | tail -5
    fi
    python3 -m sala.bench.kernels_sparse --out "$OUT/sparse_kernels${SPARSE_INPUT_SMOOTHING:+_smooth$SPARSE_INPUT_SMOOTHING}_h200.json" \
      ${TUNE:+--tune} --time-budget-s "${2:-240}" ${SPARSE_VARIANTS:+--variants default,$SPARSE_VARIANTS} \
      --backward-max-len "${SPARSE_BACKWARD_MAX_LEN:-1048576}" \
      ${SPARSE_INPUT_SMOOTHING:+--input-smoothing $SPARSE_INPUT_SMOOTHING} \
      --lengths 32768,65536,131072,262144,524288,1048576,2097152 2>&1 | grep -v "^sweep" | tail -12
    if [ -n "${PROFILE:-}" ]; then
      python3 experiments/profiling/profile_selection.py --lengths 131072,1048576 --out "$OUT/profile_selection_h200.json" 2>&1 \
        | grep -v USDT | cut -c1-400
    fi ;;
  decode)
    python3 -m sala.bench.kernels_sparse --out "$OUT/sparse_decode_variants_h200.json" --lengths 131072,1048576 \
      --no-fla --variants default,decode --time-budget-s 150 2>&1 | tail -4 | cut -c1-600
    python3 -m sala.bench.latency --lengths 1M \
      --no-baseline --no-profile --no-plots --out "$OUT/latency_1m_split_decode_h200.json" 2>&1 | grep -v USDT | tail -3 ;;
  latency)
    OUT="$OUT" bash experiments/gpu_latency.sh "${2:-480}" ;;
  ab)
    python3 experiments/profiling/ab_engine.py --lengths "${AB_LENGTHS:-64K,128K}" --reps 2 --decode-tokens 256 \
      --out "$OUT/engine_ab_h200.json" 2>&1 | grep -v USDT | tail -9 ;;
  fused)
    python3 -m pytest -q -p no:cacheprovider tests/ops/test_fused.py 2>&1 | tee "$OUT/gpu_tests_fused.log" | tail -3
    python3 experiments/profiling/ab_engine.py --axes fused --lengths "${AB_LENGTHS:-64K,256K}" --reps 2 --decode-tokens 256 \
      --out "$OUT/engine_ab_fused_h200.json" 2>&1 | grep -v USDT | tail -7 ;;
  gaps)
    python3 experiments/profiling/prefill_gaps.py --length "${GAPS_LENGTH:-128K}" --other-chunk-sizes "${GAPS_CHUNKS:-}" \
      --out "$OUT/prefill_gaps_h200.json" 2>&1 \
      | grep -v USDT | tail -4 ;;
  train)
    # the recipe of experiments/train_small/config.yaml; further arguments go to the script (they win)
    python3 experiments/train_small/train_small_gpu.py "$OUT" --config experiments/train_small/config.yaml "${@:2}" ;;
  repro)
    bash experiments/repro_halo/repro_halo.sh gpu ;;
  profile)
    # the 12-layer model as the trainer runs it (fp32 weights, bf16 autocast), stable stage compiled: fp32 vs bf16
    # residual stream (precision bf16 vs bf16-residual)
    for res in "" "--bf16-residual"; do
      python3 experiments/profiling/profile_train_step.py --compile --layers 12 --trainer-precision $res \
        --only sala_sparse_off_compiled,sala_sparse_on_compiled \
        --out "$OUT/profile_train_step_12l${res:+_bf16res}_h200.json" 2>&1 | grep -v USDT | grep "=="
    done ;;
  levers)
    # the MFU levers of docs/training.md against the same baseline, one process each, on one machine (12 layers,
    # 16 x 4096, compiled, sparse off, fp32 weights under bf16 autocast): LEVERS, variants separated by ';' (an
    # empty one: the plain model), default the config's fused projections alone and with the compiled loss
    # (measured before: ';--loss-chunk 4096', see docs/training.md); PROFILE_DATA: a packed set (carry it),
    # default the long retrieval set of train_data/
    # (built here when missing: the same mix from 60 documents, ~7 s). A variant "name:flags" names its file.
    data=${PROFILE_DATA:-train_data/retrieval_long4096_niah_single}
    if [ ! -f "$data/meta.json" ]; then
      python3 -c "import sys; sys.path.insert(0, 'experiments/train_small'); from small_run_common import long_retrieval_set
long_retrieval_set('$data', 4096, cpu=False, tasks=('niah_single',), max_docs=60)" | tail -1
    fi
    IFS=';' read -ra variants <<< "${LEVERS:---fuse-projections;--fuse-projections --compile-loss}"
    for variant in "${variants[@]}"; do
      if [[ "$variant" == *:* ]]; then tag=${variant%%:*}; flags=${variant#*:}
      else flags=$variant; tag=$(echo "${flags:-baseline}" | tr -d '-' | tr ' ' '_'); fi
      python3 experiments/profiling/profile_train_step.py --data "$data" \
        --compile --layers 12 --trainer-precision --only sala_sparse_off_compiled --sites 30 $flags \
        --out "$OUT/profile_levers_${tag}_h200.json" 2>&1 | grep -v USDT | grep "=="
    done ;;
  *)
    echo "unknown part $part" >&2; exit 2 ;;
esac
