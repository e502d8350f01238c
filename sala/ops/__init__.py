"""Functional ops of SALA (no nn.Module): plain-PyTorch references and Triton kernels.

- `lightning_attention`, `lightning_decode_step`: Lightning linear attention (sala.ops.lightning).
- `infllmv2_attention` and its stages: InfLLM-V2 sparse attention (sala.ops.infllmv2).
- `dense_causal_attention`: softmax attention through torch SDPA (sala.ops.dense).
- `alibi_slopes`, `lightning_log_decay`: the per-head decay schedule (sala.ops.slopes).
Which implementation runs is chosen by `sala.ops.dispatch` (env `SALA_KERNELS`).
"""
from sala.ops.slopes import alibi_slopes, lightning_log_decay
from sala.ops.dispatch import kernel_mode, use_triton
