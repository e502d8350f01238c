#!/bin/bash
# Sequential runs (one process at a time); same data, same data order, same model seed.
cd "$(dirname "$0")"; P=${PYTHON:-python3}   # from its folder; PYTHON: an interpreter with sala installed
S=500; E=100
$P train.py A_sala_init0.1_lr3e-3      --arch sala  --init 0.1  --lr 3e-3 --steps $S --eval-every $E > logs/A.log 2>&1
$P train.py B_sala_init0.02_lr3e-3     --arch sala  --init 0.02 --lr 3e-3 --steps $S --eval-every $E > logs/B.log 2>&1
$P train.py C_llama_init0.02_lr3e-3    --arch llama --init 0.02 --lr 3e-3 --steps $S --eval-every $E > logs/C.log 2>&1
$P train.py D_sala_init0.1_rope_lr3e-3 --arch sala  --init 0.1  --lr 3e-3 --attn-rope 1 --steps $S --eval-every $E > logs/D.log 2>&1
$P train.py E_sala_init0.1_lr1e-3      --arch sala  --init 0.1  --lr 1e-3 --steps $S --eval-every $E > logs/E.log 2>&1
