"""InfLLM-V2 block-sparse attention over selected key blocks (Triton on GPU, PyTorch reference elsewhere)."""
from __future__ import annotations

import functools

import torch

from sala.ops.dispatch import triton_available, use_triton
from sala.ops.infllmv2 import reference as ref
from sala.ops.infllmv2.blockwise_reference import sparse_attention_blockwise_ref
from sala.ops.infllmv2.params import (
    SparseKernelConfig,
    SparseParams,
    check_block_table,
    check_no_grad,
    check_qkv,
    kernel_config_or_default,
    softmax_scale,
)

if triton_available():
    from sala.ops.infllmv2 import triton_attention as tri
else:  # pragma: no cover - without triton every call takes the reference path
    tri = None

# Reference path: below this many mask entries (B*Hkv*Tq*Tk bytes) one masked SDPA call replaces the gather.
_MASKED_REF_MAX_ELEMENTS = 1 << 26


def sparse_attention_flat(qf, kf, vf, block_idx, pos, kbase, gbase, gid_kstart, gid_blk, n_gid, params, scale,
                          forced_blocks: bool = False, kernel_config: SparseKernelConfig | None = None,
                          block_table: torch.Tensor | None = None):
    """Flat block-sparse attention: qf [N, Hq, D], kf, vf [Nk, Hkv, D], block_idx [B', Hkv, Tq', K] with
    B'*Tq' = N; pos [N] position of each query in its sequence, kbase [N] flat index of its sequence's first key,
    gbase [N] global id of its sequence's first key block, gid_kstart / gid_blk [n_gid] first flat key and
    in-sequence number of every global key block. forced_blocks: block_idx came from the selection with params
    (init and local blocks in every row), so the Triton forward may run those as dense query tiles; kbase must
    ascend. kernel_config: Triton launch settings (None: the defaults). Returns [N, Hq, D].

    block_table int32 [R, NB] (inference only; gbase, gid_kstart, gid_blk, n_gid unused): kf, vf are pages of
    params.block_size keys flattened to [P * block_size, Hkv, D] and kbase [N] is each query's row offset r * NB
    in the flat table (sala.ops.infllmv2.paged)."""
    if block_table is not None:
        check_no_grad("sparse_attention_flat", qf, kf, vf)
        check_block_table("sparse_attention_flat", block_table, (2,), pages=kf)
        table = block_table.contiguous()
        if use_triton(qf, kf, vf):
            band = (params.init_blocks, params.local_blocks) if forced_blocks else None
            return tri.sparse_attention_fwd(qf.contiguous(), kf, vf, block_idx, pos.to(torch.int32),
                                            kbase.to(torch.int64), params.block_size, scale, band,
                                            kernel_config_or_default(kernel_config), block_table=table)[0]
        idx = block_idx.permute(0, 2, 1, 3).reshape(qf.shape[0], block_idx.shape[1], block_idx.shape[3])
        return ref.sparse_attention_flat_ref(qf, kf, vf, idx, pos.to(torch.int64), kbase.to(torch.int64),
                                             params.block_size, scale, block_table=table)
    if use_triton(qf, kf, vf):
        args = (qf, kf, vf, block_idx, pos.to(torch.int32), kbase.to(torch.int64), gbase.to(torch.int64),
                gid_kstart.to(torch.int64), gid_blk.to(torch.int32), n_gid, params.block_size, scale)
        band = (params.init_blocks, params.local_blocks) if forced_blocks else None
        return tri.SparseAttentionFn.apply(*args, band, kernel_config_or_default(kernel_config))
    idx = block_idx.permute(0, 2, 1, 3).reshape(qf.shape[0], block_idx.shape[1], block_idx.shape[3])
    return ref.sparse_attention_flat_ref(qf, kf, vf, idx, pos.to(torch.int64), kbase.to(torch.int64),
                                         params.block_size, scale)


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor,
                           params: SparseParams, *, q_offset: int, scale: float | None = None,
                           forced_blocks: bool = False, kernel_config: SparseKernelConfig | None = None
                           ) -> torch.Tensor:
    """Attention of q [B, Tq, Hq, D] (positions q_offset..) over the selected blocks of k, v [B, Tk, Hkv, D].

    block_idx int32 [B, Hkv, Tq, K] (-1 = none). Token-level causal mask inside the own block; one softmax over
    the union of the selected tokens. Differentiable w.r.t. q, k, v. Returns o [B, Tq, Hq, D] in q.dtype.
    forced_blocks=True promises that block_idx comes from `select_blocks` with the same params (the init blocks
    and the local band are in every row); the GPU forward then runs those blocks as dense query tiles.
    kernel_config: Triton launch settings (None: the defaults).
    """
    check_qkv("block_sparse_attention", q, k, v)
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    if block_idx.dim() != 4 or tuple(block_idx.shape[:3]) != (B, Hkv, Tq):
        raise ValueError(f"block_sparse_attention: block_idx {tuple(block_idx.shape)} must be [B, Hkv, Tq, K] = "
                         f"[{B}, {Hkv}, {Tq}, K]")
    if q_offset < 0 or q_offset + Tq > Tk:
        raise ValueError(f"block_sparse_attention: queries at positions {q_offset}..{q_offset + Tq - 1} need "
                         f"keys up to there, but k has {Tk}")
    dev = q.device
    bs = params.block_size
    if not use_triton(q, k, v):
        # references: one masked SDPA call for short inputs; above, the block-grouped attention (its cost per query
        # does not grow with the context, sala.ops.infllmv2.blockwise_reference)
        if B * Hkv * Tq * Tk <= _MASKED_REF_MAX_ELEMENTS:
            return ref.sparse_attention_masked_ref(q, k, v, block_idx, q_offset, bs, softmax_scale(q, scale))
        return sparse_attention_blockwise_ref(q, k, v, block_idx, q_offset, bs, softmax_scale(q, scale))
    pos, kbase, gbase, gid_kstart, gid_blk, n_gid = _flat_indices(B, Tq, Tk, q_offset, bs, dev,
                                                                  torch.is_inference_mode_enabled())
    o = sparse_attention_flat(q.reshape(B * Tq, Hq, D), k.reshape(B * Tk, Hkv, D), v.reshape(B * Tk, Hkv, D),
                              block_idx.to(torch.int32), pos, kbase, gbase, gid_kstart, gid_blk, n_gid,
                              params, softmax_scale(q, scale), forced_blocks, kernel_config)
    return o.reshape(B, Tq, Hq, D)


@functools.lru_cache(maxsize=8)
def _flat_indices(B: int, Tq: int, Tk: int, q_offset: int, bs: int, dev: torch.device, inference: bool) -> tuple:
    """The flat-token indices of `sparse_attention_flat` for B rows of Tq queries at q_offset.. over Tk keys in
    blocks of bs: pos int32 [B*Tq], kbase / gbase int64 [B*Tq], gid_kstart int64 / gid_blk int32 [B*nbk], n_gid.
    Kept per shape (read-only): the sparse layers of one forward call share them instead of launching the same
    dozen small kernels each. `inference`: made under torch.inference_mode (such tensors cannot be saved for a
    backward outside it, so they are kept apart)."""
    nbk = -(-Tk // bs)
    pos = (q_offset + torch.arange(Tq, device=dev)).repeat(B).to(torch.int32)
    brow = torch.arange(B, device=dev).repeat_interleave(Tq)
    g = torch.arange(B * nbk, device=dev)
    gid_kstart = torch.div(g, nbk, rounding_mode="floor") * Tk + (g % nbk) * bs
    return pos, brow * Tk, brow * nbk, gid_kstart, (g % nbk).to(torch.int32), B * nbk
