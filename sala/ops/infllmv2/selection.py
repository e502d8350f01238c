"""InfLLM-V2 block selection: stage-1 scores, max-pooling into blocks and top-k (Triton on GPU, PyTorch
reference elsewhere)."""
from __future__ import annotations

import functools

import torch

from sala.ops.dispatch import triton_available, use_triton
from sala.ops.infllmv2.blockwise_reference import select_blocks_blockwise
from sala.ops.infllmv2.params import (
    SparseKernelConfig,
    SparseParams,
    check_qkv,
    kernel_config_or_default,
    softmax_scale,
)

if triton_available():
    from sala.ops.infllmv2 import triton_selection as tri
else:  # pragma: no cover - without triton every call takes the reference path
    tri = None


def select_blocks(q: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, params: SparseParams, *, q_offset: int,
                  scale: float | None = None, kernel_config: SparseKernelConfig | None = None) -> torch.Tensor:
    """Selected blocks int32 [B, Hkv, Tq, total_blocks]: ascending, -1 padded (never a block after the own one).

    q [B, Tq, Hq, D] at positions q_offset .. q_offset + Tq - 1; k1/k2 [B, n1|n2, Hkv, D] compressed keys (extra
    windows not yet visible are ignored). Queries are processed in chunks (memory O(chunk * n_blocks)). Ties at
    the cut-off go to the lowest block index (docs/sparse.md). kernel_config: Triton launch settings (None: the
    defaults).
    """
    check_qkv("select_blocks", q, k1)
    if k2.dim() != 4 or k2.shape[0] != k1.shape[0] or k2.shape[2:] != k1.shape[2:]:
        raise ValueError(f"select_blocks: k2 {tuple(k2.shape)} must be [B, n2, Hkv, D] like k1 {tuple(k1.shape)}")
    if q_offset < 0:
        raise ValueError(f"select_blocks: q_offset must be >= 0, got {q_offset}")
    B, Tq = q.shape[:2]
    pos = _positions(B, Tq, q_offset, q.device, torch.is_inference_mode_enabled())
    s = softmax_scale(q, scale)
    config = kernel_config_or_default(kernel_config)
    with torch.no_grad():
        if use_triton(q, k1, k2):
            return tri.select_blocks_triton(q, k1, k2, pos, params, s, config, pos_max=q_offset + Tq - 1)
        # select_blocks_ref's result; each chunk of queries scores only the compressed keys it can see
        return select_blocks_blockwise(q, k1, k2, pos, params, s)


@functools.lru_cache(maxsize=8)
def _positions(B: int, Tq: int, q_offset: int, dev: torch.device, inference: bool) -> torch.Tensor:
    """Query positions int64 [B, Tq] (q_offset ..), kept per shape (read-only): the sparse layers of one forward
    call share them. `inference`: made under torch.inference_mode (kept apart from tensors made outside it)."""
    return (q_offset + torch.arange(Tq, device=dev))[None].expand(B, Tq)
