#!/bin/bash
# 2026-12-02 (fifth session): depth follow-up after GPU run 6 (12 layers, 51M) also scored 0%. The toy setting of A2
# (hidden 128, lr 3e-3, niah_single at ~130 tokens) at the GPU model's depth and softmax pattern:
#   I: SALA, 12 layers, softmax (minicpm4) layers 0, 6 and 11 as in configs/train/sala_small_gpu.yaml;
#   J: the dense RoPE Llama, 12 layers (control: is depth alone slower?).
# Both at once, one thread each, 1250 steps (the 4-layer SALA went 11% -> 81% exact between steps 1000 and 1250).
cd "$(dirname "$0")"; P=${PYTHON:-python3}   # from its folder; PYTHON: an interpreter with sala installed
$P train.py I_sala12_softmax0-6-11_lr3e-3_1250 --arch sala --layers 12 --softmax-layers 0,6,11 --init 0.1 --lr 3e-3 \
  --steps 1250 --eval-every 250 > logs/I.log 2>&1 &
$P train.py J_llama12_lr3e-3_1250 --arch llama --layers 12 --init 0.1 --lr 3e-3 --steps 1250 --eval-every 250 \
  > logs/J.log 2>&1 &
wait
# Then: I2 = I continued to 2000 steps (same seed, so identical to I up to 1250: does it get there?), and K = I at
# batch 8 for 2500 steps (the same samples in twice the optimizer steps: steps or samples?). I2 was stopped after
# its step-1500 checkpoint (session time) and added to results.jsonl from its log.
$P train.py I2_sala12_softmax0-6-11_lr3e-3_2000 --arch sala --layers 12 --softmax-layers 0,6,11 --init 0.1 --lr 3e-3 \
  --steps 2000 --eval-every 250 > logs/I2.log 2>&1 &
$P train.py K_sala12_batch8_lr3e-3_2500 --arch sala --layers 12 --softmax-layers 0,6,11 --init 0.1 --lr 3e-3 --batch 8 \
  --steps 2500 --eval-every 250 > logs/K.log 2>&1 &
wait
