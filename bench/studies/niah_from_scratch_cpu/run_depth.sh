#!/bin/bash
# 2026-12-02 (fifth session): depth follow-up after GPU run 6 (12 layers, 51M) also scored 0%. The toy setting of A2
# (hidden 128, lr 3e-3, niah_single at ~130 tokens) at the GPU model's depth and softmax pattern:
#   I: SALA, 12 layers, softmax (minicpm4) layers 0, 6 and 11 as in configs/train/sala_small_gpu.yaml;
#   J: the dense RoPE Llama, 12 layers (control: is depth alone slower?).
# Both at once, one thread each, 1250 steps (the 4-layer SALA went 11% -> 81% exact between steps 1000 and 1250).
P=/work/main/.venv/bin/python
$P train.py I_sala12_softmax0-6-11_lr3e-3_1250 --arch sala --layers 12 --softmax-layers 0,6,11 --init 0.1 --lr 3e-3 \
  --steps 1250 --eval-every 250 > logs/I.log 2>&1 &
$P train.py J_llama12_lr3e-3_1250 --arch llama --layers 12 --init 0.1 --lr 3e-3 --steps 1250 --eval-every 250 \
  > logs/J.log 2>&1 &
wait
