#!/bin/bash
# 2026-12-05 (fifteenth session, no GPU lent): length extrapolation of from-scratch SALA hybrids, and HyPE at
# inference. Both runs at once, one thread each (~27 and ~38 min on this 2-core CPU).
cd "$(dirname "$0")"; P=${PYTHON:-python3}   # from its folder; PYTHON: an interpreter with sala installed
mkdir -p logs
$P train.py L4_sala4_softmax0-3_len192_2500 --layers 4 --softmax-layers 0,3 --steps 2500 --hype 0,500,100 \
  --out results.jsonl > logs/L4.log 2>&1 &
$P train.py L8_sala8_softmax0-7_len192_2500 --layers 8 --softmax-layers 0,7 --steps 2500 --hype 0,500,100 \
  --out results.jsonl > logs/L8.log 2>&1 &
wait
