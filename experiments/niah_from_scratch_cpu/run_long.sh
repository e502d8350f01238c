#!/bin/bash
# Longer matched pair (after the 500-step screen showed no learning in any run).
cd "$(dirname "$0")"; P=${PYTHON:-python3}   # from its folder; PYTHON: an interpreter with sala installed
$P train.py C2_llama_init0.02_lr3e-3_1000 --arch llama --init 0.02 --lr 3e-3 --steps 1000 --eval-every 200 > logs/C2.log 2>&1
$P train.py A2_sala_init0.1_lr3e-3_1000   --arch sala  --init 0.1  --lr 3e-3 --steps 1000 --eval-every 200 > logs/A2.log 2>&1
