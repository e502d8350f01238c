#!/bin/bash
# 2026-12-02: is NoPE in the softmax layers what slows SALA's copying? RoPE kept (D2) and HyPE query scaling
# (F, base 16: s_t = log(t+16)/log(16)) at the A2 setting, 1000 steps each, run side by side (one thread each).
cd "$(dirname "$0")"; P=${PYTHON:-python3}   # from its folder; PYTHON: an interpreter with sala installed
$P train.py D2_sala_rope_init0.1_lr3e-3_1000 --arch sala --init 0.1 --lr 3e-3 --attn-rope 1 --steps 1000 --eval-every 200 > logs/D2.log 2>&1 &
$P train.py F_sala_hype16_init0.1_lr3e-3_1000 --arch sala --init 0.1 --lr 3e-3 --hype 16 --steps 1000 --eval-every 200 > logs/F.log 2>&1 &
wait
