"""Functional ops of SALA (no nn.Module): plain-PyTorch references and Triton kernels.

- `lightning_attention`, `lightning_decode_step`, `lightning_state_after`: Lightning linear attention
  (sala.ops.lightning); the Triton launch settings are a frozen `LightningConfig` passed as `config=`
  (sala.ops.lightning_plan).
- `infllmv2_attention` and its stages: InfLLM-V2 sparse attention (sala.ops.infllmv2).
- `dense_causal_attention`: softmax attention through torch SDPA (sala.ops.dense).
- `rms_norm`, `add_rms_norm`, `qk_norm_rope`, `rms_norm_gate`, `silu_mul`: fused inference elementwise ops
  (sala.ops.fused).
- `alibi_slopes`, `lightning_log_decay`: the per-head decay schedule (sala.ops.slopes).
- `linear_cross_entropy`: LM head + cross-entropy over token chunks, without the full logits (training;
  sala.ops.linear_cross_entropy, plain PyTorch, checked against F.cross_entropy).
Which implementation runs is chosen by `sala.ops.dispatch` (env `SALA_KERNELS=reference|triton|auto`).
"""
from sala.ops.dense import dense_causal_attention
from sala.ops.dispatch import kernel_mode, use_triton
from sala.ops.fused import add_rms_norm, qk_norm_rope, rms_norm, rms_norm_gate, silu_mul
from sala.ops.infllmv2 import (
    SparseParams,
    block_sparse_attention,
    compress_keys,
    infllmv2_attention,
    infllmv2_decode,
    select_blocks,
    update_compressed_keys,
)
from sala.ops.lightning import lightning_attention, lightning_decode_step, lightning_state_after
from sala.ops.lightning_plan import LightningConfig
from sala.ops.linear_cross_entropy import linear_cross_entropy
from sala.ops.slopes import alibi_slopes, lightning_log_decay

__all__ = [
    "LightningConfig", "SparseParams", "add_rms_norm", "alibi_slopes", "block_sparse_attention", "compress_keys",
    "dense_causal_attention", "infllmv2_attention", "infllmv2_decode", "kernel_mode", "lightning_attention",
    "lightning_decode_step", "lightning_log_decay", "lightning_state_after", "linear_cross_entropy",
    "qk_norm_rope", "rms_norm", "rms_norm_gate", "select_blocks", "silu_mul", "update_compressed_keys",
    "use_triton",
]
