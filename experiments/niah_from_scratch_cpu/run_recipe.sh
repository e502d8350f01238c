#!/bin/bash
# 2026-12-02 (fourth session): recipe levers for the GPU run, at the A2 setting unless named.
#   G:  trained on niah_multiquery at 256 tokens (prep_multiquery.py; 2 needles, 1 answered question), scored
#       on the same niah_single prompts as every other run;
#   E2: learning rate 1e-3 (the never-run run E);   H: learning rate 6e-3;
#   A3: A2 continued to 2500 steps (does the hybrid get there, and when?).
# Two at a time, one thread each.
cd "$(dirname "$0")"; P=${PYTHON:-python3}   # from its folder; PYTHON: an interpreter with sala installed
$P prep_multiquery.py
$P train.py G_sala_multiquery256_init0.1_lr3e-3_1000 --arch sala --init 0.1 --lr 3e-3 --steps 1000 --eval-every 200 \
  --data /work/exp_niah/data_multiquery.pt > logs/G.log 2>&1 &
$P train.py E2_sala_init0.1_lr1e-3_1000 --arch sala --init 0.1 --lr 1e-3 --steps 1000 --eval-every 200 > logs/E2.log 2>&1
$P train.py A3_sala_init0.1_lr3e-3_2500 --arch sala --init 0.1 --lr 3e-3 --steps 2500 --eval-every 250 > logs/A3.log 2>&1 &
wait %1
$P train.py H_sala_init0.1_lr6e-3_1000 --arch sala --init 0.1 --lr 6e-3 --steps 1000 --eval-every 200 > logs/H.log 2>&1
wait
