#!/usr/bin/env bash
# The deployment features' GPU measurements, in priority order, each under its own time limit so that one device
# call (10 minutes) always returns whatever finished. JSON (and logs) land in $OUT; copy the JSON to bench/results/.
#
#   OUT=/dir SALA_GIT_COMMIT=$(git rev-parse HEAD) bash experiments/gpu_session.sh one     # regression + GPU tests
#   OUT=/dir SALA_GIT_COMMIT=$(git rev-parse HEAD) bash experiments/gpu_session.sh two     # serve, spec, FP8 targets
#
# `one` needs runs/baseline (the tree before the one-forward redesign: `git archive 7c62c84 sala | tar -x -C
# runs/baseline`, carried). Each line: timeout SECONDS, then the command.
set -uo pipefail
part=${1:?usage: gpu_session.sh one|two|three|four}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/sala_gpu}
mkdir -p "$OUT"
export TORCHINDUCTOR_CACHE_DIR=$PWD/runs/compile_cache/inductor TRITON_CACHE_DIR=$PWD/runs/compile_cache/triton
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
gpu=$(python3 -c "import torch; n=torch.cuda.get_device_name().lower(); print('h200' if 'h200' in n else 'h100')")
step() {  # step NAME SECONDS CMD...: run with a limit, log to $OUT/NAME.log, say how it ended
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name: exit $? after $((SECONDS - t0)) s"; tail -4 "$OUT/$name.log"
}
case "$part" in
  one)
    step regression 300 python3 experiments/regression/gpu_regression.py --tree base=runs/baseline --tree new=. \
      --out "$OUT/regression_one_forward_$gpu.json"
    step gpu_tests 240 python3 -m pytest -q -p no:cacheprovider -x -m gpu tests/engine/test_scheduler_gpu.py \
      tests/ops/test_fp8.py tests/model/test_fp8_model.py tests/engine/test_engine_gpu.py ;;
  two)
    step serve_document 200 python3 -m sala.cli bench serve --model minicpm-sala-9b --scenario document \
      --doc-len 131072 --questions 5 --question-len 64 --output-len 32 --max-num-seqs 4 --max-model-len 139264 \
      --compare-no-cache --out "$OUT/serve_document_$gpu.json" --plot "$OUT/serve_document_$gpu.png"
    step serve_load 180 python3 -m sala.cli bench serve --model minicpm-sala-9b --scenario load --num-requests 32 \
      --concurrency 32 --prompt-len 4096 --output-len 256 --max-num-seqs 32 --max-model-len 4608 \
      --sequential-baseline 2 --out "$OUT/serve_load_$gpu.json" --plot "$OUT/serve_load_$gpu.png"
    step spec 150 python3 -m sala.cli bench spec --tasks quote,vt --lengths 16k,64k --num-samples 2 \
      --max-new-tokens 128 --speculative ngram --num-speculative-tokens 8 --cost-preset minicpm-sala-9b \
      --cost-context 65536 --cost-k 8 \
      --out "$OUT/spec_$gpu.json"
    step fp8_shape 90 python3 -m sala.bench.fp8 --parts shape --lengths 65536,262144 --out "$OUT/fp8_shape_$gpu.json" ;;
  three)  # one call after `one`: the regression by part, then the first targets of `two`
    step regression 150 python3 experiments/regression/gpu_regression.py --tree base=runs/baseline --tree new=. \
      --parts sparse,lightning,engine,train --out "$OUT/regression_one_forward_$gpu.json"
    step serve_document 170 python3 -m sala.cli bench serve --model minicpm-sala-9b --scenario document \
      --doc-len 131072 --questions 5 --question-len 64 --output-len 32 --max-num-seqs 4 --max-model-len 139264 \
      --compare-no-cache --out "$OUT/serve_document_$gpu.json" --plot "$OUT/serve_document_$gpu.png"
    step spec 110 python3 -m sala.cli bench spec --tasks quote,vt --lengths 16k --num-samples 2 \
      --max-new-tokens 128 --speculative ngram --num-speculative-tokens 8 --cost-preset minicpm-sala-9b \
      --cost-context 65536 --cost-k 8 --out "$OUT/spec_$gpu.json"
    step fp8_shape 80 python3 -m sala.bench.fp8 --parts shape --lengths 65536 --out "$OUT/fp8_shape_$gpu.json" ;;
  four)   # after `three`: the training step, the serve and spec targets with the serve wheels, GPU tests
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site:$PYTHONPATH
    step regression_train 90 python3 experiments/regression/gpu_regression.py --tree base=runs/baseline --tree new=. \
      --parts train --out "$OUT/regression_train_$gpu.json"
    step serve_document 160 python3 -m sala.cli bench serve --model minicpm-sala-9b --scenario document \
      --doc-len 131072 --questions 5 --question-len 64 --output-len 32 --max-num-seqs 4 --max-model-len 139264 \
      --compare-no-cache --out "$OUT/serve_document_$gpu.json" --plot "$OUT/serve_document_$gpu.png"
    step spec 100 python3 -m sala.cli bench spec --tasks quote,vt --lengths 16k --num-samples 2 \
      --max-new-tokens 128 --speculative ngram --num-speculative-tokens 8 --cost-preset minicpm-sala-9b \
      --cost-context 65536 --cost-k 8 --out "$OUT/spec_$gpu.json"
    step gpu_tests 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/engine/test_scheduler_gpu.py \
      tests/ops/test_fp8.py tests/model/test_fp8_model.py ;;
  *) echo "unknown part $part" >&2; exit 2 ;;
esac
ls -la "$OUT"
