"""InfLLM-V2 sparse attention: public API and kernel dispatch (Triton on GPU, PyTorch reference elsewhere).

Semantics (docs/sparse.md, SALA.md §2): for a query at position p with q_blk = p // block_size, block selection
applies at every position. If q_blk + 1 <= total_blocks (= topk + window_size // block_size) the query keeps all
its blocks, i.e. exact dense causal attention: positions < `dense_positions` run through SDPA. Otherwise stage-1
scores (coarse K2 log-sum-exp, fine K1 probabilities summed over the G heads of the group) are max-pooled into
blocks, init and local blocks forced, the top `total_blocks` kept, and one causal softmax runs over their tokens.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from sala.ops import infllmv2_reference as ref
from sala.ops.dense import dense_causal_attention
from sala.ops.dispatch import use_triton

# Sparse queries per selection+attention step when no gradient is needed (bounds block-index memory).
_NO_GRAD_QUERY_CHUNK = 16384

# Triton kernel variants, read at call time (docs/sparse.md): env var -> (allowed values, default).
# The decode splits are the defaults since the H200 run of 2026-12-02 (bench/results/sparse_decode_variants_h200.json:
# selection 0.21 vs 1.44 ms and attention 0.08 vs 0.12 ms at 1M; 1M decode 101 vs 47 tokens/s end to end).
_VARIANTS = {"SALA_SPARSE_ATTN": (("default", "tiled"), "default"),
             "SALA_SPARSE_DECODE": (("splitk", "single"), "splitk"),
             "SALA_SPARSE_DECODE_SELECT": (("split", "single"), "split"),
             "SALA_SPARSE_VARLEN": (("default", "fused"), "default")}


def kernel_variant(env: str) -> str:
    """The validated value of a kernel-variant env var (SALA_SPARSE_ATTN, SALA_SPARSE_DECODE,
    SALA_SPARSE_DECODE_SELECT, SALA_SPARSE_VARLEN); unset, empty or `default` give the variable's default."""
    allowed, default = _VARIANTS[env]
    value = os.environ.get(env, default).strip().lower() or default
    if value == "default":
        value = default
    if value not in allowed:
        raise ValueError(f"{env}={value!r} is not one of {', '.join(allowed)} (or default = {default})")
    return value


@dataclass(frozen=True)
class SparseParams:
    """InfLLM-V2 settings (released: block 64, kernel 32, stride 16, topk 64, init 1, window 2048)."""

    block_size: int = 64
    kernel_size: int = 32
    kernel_stride: int = 16
    topk: int = 64
    init_blocks: int = 1
    window_size: int = 2048

    def __post_init__(self) -> None:
        for name in ("block_size", "kernel_size", "kernel_stride", "topk", "window_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"SparseParams.{name} must be a positive int, got {value!r}")
        if not isinstance(self.init_blocks, int) or self.init_blocks < 0:
            raise ValueError(f"SparseParams.init_blocks must be an int >= 0, got {self.init_blocks!r}")
        if self.block_size % self.kernel_stride:
            raise ValueError(f"SparseParams: block_size {self.block_size} must be a multiple of "
                             f"kernel_stride {self.kernel_stride}")
        if self.kernel_size % self.kernel_stride:
            raise ValueError(f"SparseParams: kernel_size {self.kernel_size} must be a multiple of "
                             f"kernel_stride {self.kernel_stride}")
        if self.window_size % self.block_size:
            raise ValueError(f"SparseParams: window_size {self.window_size} must be a multiple of "
                             f"block_size {self.block_size}")
        if self.topk < self.init_blocks + 1:
            raise ValueError(f"SparseParams: topk {self.topk} must be >= init_blocks + 1 = {self.init_blocks + 1} "
                             f"so the forced blocks (init + local window + own block) fit in the selection")
        if self.k2_kernel > self.dense_positions:
            raise ValueError(f"SparseParams: 4 * kernel_size = {self.k2_kernel} exceeds the dense positions "
                             f"{self.dense_positions} (= (topk + window_size/block_size) * block_size): sparse "
                             f"queries would have no coarse key to score with")

    @property
    def local_blocks(self) -> int:
        return self.window_size // self.block_size

    @property
    def total_blocks(self) -> int:
        """Blocks attended per query: topk + local_blocks."""
        return self.topk + self.local_blocks

    @property
    def k2_kernel(self) -> int:
        return 4 * self.kernel_size

    @property
    def k2_stride(self) -> int:
        return 4 * self.kernel_stride

    @property
    def dense_positions(self) -> int:
        """Positions below this keep every block (exact dense causal attention)."""
        return self.total_blocks * self.block_size


def _scale(q: torch.Tensor, scale: float | None) -> float:
    return float(q.shape[-1]) ** -0.5 if scale is None else float(scale)


def _check_qkv(fn: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"{fn}: q and k must be [B, T, H, D]; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if v is not None and v.shape != k.shape:
        raise ValueError(f"{fn}: v {tuple(v.shape)} must have the shape of k {tuple(k.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"{fn}: batch and head_dim of q {tuple(q.shape)} and k {tuple(k.shape)} must match")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{fn}: query heads {q.shape[2]} (q {tuple(q.shape)}) not a multiple of KV heads "
                         f"{k.shape[2]} (k {tuple(k.shape)})")


# ------------------------------------------------------------------------------------------------ compression
def compress_keys(k: torch.Tensor, kernel_size: int, stride: int) -> torch.Tensor:
    """Mean-pooled keys: k [B, T, Hkv, D] -> [B, n, Hkv, D], n = (T - kernel_size) // stride + 1 (0 if T < kernel).

    Window j covers keys [stride*j, stride*j + kernel_size); mean in fp32, output in k.dtype.
    """
    if k.dim() != 4:
        raise ValueError(f"compress_keys: k must be [B, T, Hkv, D], got {tuple(k.shape)}")
    if kernel_size <= 0 or stride <= 0:
        raise ValueError(f"compress_keys: kernel_size {kernel_size} and stride {stride} must be positive")
    if use_triton(k):
        from sala.ops.infllmv2_triton import compress_keys_triton

        return compress_keys_triton(k, kernel_size, stride)
    return ref.compress_keys_ref(k, kernel_size, stride)


def compress_window_range(k: torch.Tensor, first: int, end: int, kernel_size: int, stride: int) -> torch.Tensor:
    """Windows first..end-1 of `compress_keys(k, kernel_size, stride)`, reading only the keys they cover.

    k [B, T, Hkv, D] -> [B, end - first, Hkv, D]: how a cache extends its compressed keys after an append.
    """
    return compress_keys(k[:, stride * first: stride * (end - 1) + kernel_size], kernel_size, stride)


def compressed_lengths(T: int, params: SparseParams) -> tuple[int, int]:
    """(n1, n2): numbers of K1 and K2 windows among T keys."""
    n1 = (T - params.kernel_size) // params.kernel_stride + 1 if T >= params.kernel_size else 0
    n2 = (T - params.k2_kernel) // params.k2_stride + 1 if T >= params.k2_kernel else 0
    return n1, n2


def update_compressed_keys(k_cache: torch.Tensor, k1_cache: torch.Tensor, k2_cache: torch.Tensor,
                           cache_seqlens: torch.Tensor, params: SparseParams, *, new_tokens: int = 1) -> None:
    """Extend compressed key caches in place after keys were appended (CUDA-graph friendly, no host sync).

    k_cache [B, S, Hkv, D]; k1_cache [B, S1, Hkv, D]; k2_cache [B, S2, Hkv, D]; cache_seqlens int [B]: valid keys
    per sequence *after* the append. The last `new_tokens` keys of every sequence are new (decode: 1; a prefill
    chunk: its length), so windows [n(len - new_tokens), n(len)) are written; windows past S1/S2 are dropped.
    """
    if k_cache.dim() != 4 or k1_cache.dim() != 4 or k2_cache.dim() != 4:
        raise ValueError(f"update_compressed_keys: caches must be [B, S, Hkv, D]; got k {tuple(k_cache.shape)}, "
                         f"k1 {tuple(k1_cache.shape)}, k2 {tuple(k2_cache.shape)}")
    if cache_seqlens.shape != (k_cache.shape[0],):
        raise ValueError(f"update_compressed_keys: cache_seqlens {tuple(cache_seqlens.shape)} must be "
                         f"[{k_cache.shape[0]}] (batch of k_cache {tuple(k_cache.shape)})")
    if new_tokens < 1:
        raise ValueError(f"update_compressed_keys: new_tokens must be >= 1, got {new_tokens}")
    if use_triton(k_cache, k1_cache, k2_cache, cache_seqlens):
        from sala.ops.infllmv2_triton import update_compressed_keys_triton

        update_compressed_keys_triton(k_cache, k1_cache, k2_cache, cache_seqlens, params, new_tokens)
    else:
        ref.update_compressed_keys_ref(k_cache, k1_cache, k2_cache, cache_seqlens, params, new_tokens)


# ------------------------------------------------------------------------------------------------ selection
def select_blocks(q: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, params: SparseParams, *, q_offset: int,
                  scale: float | None = None) -> torch.Tensor:
    """Selected blocks int32 [B, Hkv, Tq, total_blocks]: ascending, -1 padded (never a block after the own one).

    q [B, Tq, Hq, D] at positions q_offset .. q_offset + Tq - 1; k1/k2 [B, n1|n2, Hkv, D] compressed keys (extra
    windows not yet visible are ignored). Queries are processed in chunks (memory O(chunk * n_blocks)).
    """
    _check_qkv("select_blocks", q, k1)
    if k2.dim() != 4 or k2.shape[0] != k1.shape[0] or k2.shape[2:] != k1.shape[2:]:
        raise ValueError(f"select_blocks: k2 {tuple(k2.shape)} must be [B, n2, Hkv, D] like k1 {tuple(k1.shape)}")
    if q_offset < 0:
        raise ValueError(f"select_blocks: q_offset must be >= 0, got {q_offset}")
    B, Tq = q.shape[:2]
    pos = (q_offset + torch.arange(Tq, device=q.device))[None].expand(B, Tq)
    s = _scale(q, scale)
    with torch.no_grad():
        if use_triton(q, k1, k2):
            from sala.ops.infllmv2_triton import select_blocks_triton

            return select_blocks_triton(q, k1, k2, pos, params, s, pos_max=q_offset + Tq - 1)
        return ref.select_blocks_ref(q, k1, k2, pos, params, s)


# ------------------------------------------------------------------------------------------------ attention
# Reference path: below this many mask entries (B*Hkv*Tq*Tk bytes) one masked SDPA call replaces the gather.
_MASKED_REF_MAX_ELEMENTS = 1 << 26


def _sparse_flat(qf, kf, vf, block_idx, pos, kbase, gbase, gid_kstart, gid_blk, n_gid, params, scale,
                 forced_blocks: bool = False):
    """Dispatch flat block-sparse attention: qf [N, Hq, D], block_idx [B', Hkv, Tq', K] with B'*Tq' = N.
    forced_blocks: block_idx came from the selection with params (init and local blocks in every row), so the
    Triton forward may run those as dense query tiles (TUNING["band_split"]); kbase must ascend."""
    if use_triton(qf, kf, vf):
        from sala.ops import infllmv2_triton as tri

        args = (qf, kf, vf, block_idx, pos.to(torch.int32), kbase.to(torch.int64), gbase.to(torch.int64),
                gid_kstart.to(torch.int64), gid_blk.to(torch.int32), n_gid, params.block_size, scale)
        if kernel_variant("SALA_SPARSE_ATTN") == "tiled":
            return tri.TiledSparseAttentionFn.apply(*args)
        band = (params.init_blocks, params.local_blocks) if forced_blocks and tri.TUNING["band_split"] else None
        return tri.SparseAttentionFn.apply(*args, band)
    idx = block_idx.permute(0, 2, 1, 3).reshape(qf.shape[0], block_idx.shape[1], block_idx.shape[3])
    return ref.sparse_attention_flat_ref(qf, kf, vf, idx, pos.to(torch.int64), kbase.to(torch.int64),
                                         params.block_size, scale)


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor,
                           params: SparseParams, *, q_offset: int, scale: float | None = None,
                           forced_blocks: bool = False) -> torch.Tensor:
    """Attention of q [B, Tq, Hq, D] (positions q_offset..) over the selected blocks of k, v [B, Tk, Hkv, D].

    block_idx int32 [B, Hkv, Tq, K] (-1 = none). Token-level causal mask inside the own block; one softmax over
    the union of the selected tokens. Differentiable w.r.t. q, k, v. Returns o [B, Tq, Hq, D] in q.dtype.
    forced_blocks=True promises that block_idx comes from `select_blocks` with the same params (the init blocks
    and the local band are in every row); the GPU forward then runs those blocks as dense query tiles.
    """
    _check_qkv("block_sparse_attention", q, k, v)
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
    if not use_triton(q, k, v) and B * Hkv * Tq * Tk <= _MASKED_REF_MAX_ELEMENTS:
        return ref.sparse_attention_masked_ref(q, k, v, block_idx, q_offset, bs, _scale(q, scale))
    nbk = -(-Tk // bs)
    pos = (q_offset + torch.arange(Tq, device=dev)).repeat(B)
    brow = torch.arange(B, device=dev).repeat_interleave(Tq)
    g = torch.arange(B * nbk, device=dev)
    o = _sparse_flat(q.reshape(B * Tq, Hq, D), k.reshape(B * Tk, Hkv, D), v.reshape(B * Tk, Hkv, D),
                     block_idx.to(torch.int32), pos, brow * Tk, brow * nbk,
                     torch.div(g, nbk, rounding_mode="floor") * Tk + (g % nbk) * bs, g % nbk, B * nbk,
                     params, _scale(q, scale), forced_blocks)
    return o.reshape(B, Tq, Hq, D)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def infllmv2_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: SparseParams, *,
                       scale: float | None = None, k1: torch.Tensor | None = None, k2: torch.Tensor | None = None,
                       cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """InfLLM-V2 attention of q [B, Tq, Hq, D] at the last Tq positions of k, v [B, Tk, Hkv, D].

    k1/k2: compressed keys of the whole k if the caller keeps them (else computed here). cu_seqlens (B == 1,
    Tq == Tk): packed documents, each with positions from 0. Positions < params.dense_positions use dense SDPA,
    later ones select blocks and attend to them. Differentiable w.r.t. q, k, v. Returns [B, Tq, Hq, D].
    """
    _check_qkv("infllmv2_attention", q, k, v)
    B, Tq, Hq, D = q.shape
    Tk = k.shape[1]
    if Tk < Tq:
        raise ValueError(f"infllmv2_attention: key length {Tk} (k {tuple(k.shape)}) < query length {Tq}")
    s = _scale(q, scale)
    if cu_seqlens is not None:
        if k1 is not None or k2 is not None:
            raise ValueError("infllmv2_attention: k1/k2 cannot be passed with cu_seqlens (computed per document)")
        return _infllmv2_varlen(q, k, v, params, s, cu_seqlens)
    q_off = Tk - Tq
    dp = params.dense_positions
    n_dense = min(max(dp - q_off, 0), Tq)
    grad = _needs_grad(q, k, v)
    parts = []
    # inference: write every piece into one preallocated output (no concatenation copy)
    out = None if grad else torch.empty_like(q)
    if n_dense > 0:
        o_d = dense_causal_attention(q[:, :n_dense], k[:, :q_off + n_dense], v[:, :q_off + n_dense], scale=s)
        if out is None:
            parts.append(o_d)
        else:
            out[:, :n_dense] = o_d
        del o_d
    if n_dense < Tq:
        kd = k.detach()
        k1 = compress_keys(kd, params.kernel_size, params.kernel_stride) if k1 is None else k1
        k2 = compress_keys(kd, params.k2_kernel, params.k2_stride) if k2 is None else k2
        Ts = Tq - n_dense
        chunk = Ts if grad else _NO_GRAD_QUERY_CHUNK
        for c0 in range(0, Ts, chunk):
            a, b = n_dense + c0, min(Tq, n_dense + c0 + chunk)
            qc = q[:, a:b]
            off = q_off + a
            idx = select_blocks(qc.detach(), k1, k2, params, q_offset=off, scale=s)
            o_s = block_sparse_attention(qc, k, v, idx, params, q_offset=off, scale=s, forced_blocks=True)
            if out is None:
                parts.append(o_s)
            else:
                out[:, a:b] = o_s
            del idx, o_s
    if out is not None:
        return out
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _infllmv2_varlen(q, k, v, params: SparseParams, scale: float, cu_seqlens: torch.Tensor) -> torch.Tensor:
    B, T, Hq, D = q.shape
    if B != 1 or k.shape[1] != T:
        raise ValueError(f"infllmv2_attention: cu_seqlens needs B == 1 and Tq == Tk; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    bounds = [int(x) for x in cu_seqlens.tolist()]
    if not bounds or bounds[0] != 0 or bounds[-1] != T or any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
        raise ValueError(f"infllmv2_attention: cu_seqlens {bounds} must rise from 0 to T = {T}")
    if kernel_variant("SALA_SPARSE_VARLEN") == "fused" and use_triton(q, k, v):
        from sala.ops.infllmv2_varlen import infllmv2_varlen_fused

        return infllmv2_varlen_fused(q, k, v, params, scale, bounds)
    dp, bs, dev = params.dense_positions, params.block_size, q.device
    if all(e - s <= dp for s, e in zip(bounds[:-1], bounds[1:])):   # every document short: dense only
        return dense_causal_attention(q, k, v, scale=scale, cu_seqlens=torch.tensor(bounds))
    # The dense-exact prefixes of all documents in one packed call (FlashAttention varlen on CUDA): one SDPA
    # call per document would meet a new shape, and with cuDNN a new execution plan, almost every step.
    docs = [(s, e) for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
    dense_tok = torch.cat([torch.arange(s, s + min(e - s, dp)) for s, e in docs]).to(dev, non_blocking=True)
    prefix_cu = [0]
    for s, e in docs:
        prefix_cu.append(prefix_cu[-1] + min(e - s, dp))
    o_dense = dense_causal_attention(q[:, dense_tok], k[:, dense_tok], v[:, dense_tok], scale=scale,
                                     cu_seqlens=torch.tensor(prefix_cu))[0]
    dense_parts, idx_parts, tok, pos, kbase, gbase, gks, gblk = [], [], [], [], [], [], [], []
    n_gid = 0
    for (s, e), p0, p1 in zip(docs, prefix_cu[:-1], prefix_cu[1:]):
        L = e - s
        dense_parts.append(o_dense[p0:p1])
        if L > dp:
            kd = k[:, s:e].detach()
            k1 = compress_keys(kd, params.kernel_size, params.kernel_stride)
            k2 = compress_keys(kd, params.k2_kernel, params.k2_stride)
            idx_parts.append(select_blocks(q[:, s + dp:e].detach(), k1, k2, params, q_offset=dp, scale=scale))
            nb = -(-L // bs)
            ar = torch.arange(dp, L, device=dev)
            tok.append(s + ar)
            pos.append(ar)
            kbase.append(torch.full_like(ar, s))
            gbase.append(torch.full_like(ar, n_gid))
            gb = torch.arange(nb, device=dev)
            gks.append(s + gb * bs)
            gblk.append(gb)
            n_gid += nb
        else:
            idx_parts.append(None)
    tok_all = torch.cat(tok)
    o_s = _sparse_flat(q[0, tok_all], k[0], v[0], torch.cat([p for p in idx_parts if p is not None], dim=2),
                       torch.cat(pos), torch.cat(kbase), torch.cat(gbase), torch.cat(gks), torch.cat(gblk), n_gid,
                       params, scale, forced_blocks=True)
    out, used = [], 0
    for dense, idx in zip(dense_parts, idx_parts):
        out.append(dense)
        if idx is not None:
            out.append(o_s[used:used + idx.shape[2]])
            used += idx.shape[2]
    return torch.cat(out, dim=0)[None]


# ------------------------------------------------------------------------------------------------ decode
def infllmv2_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k1_cache: torch.Tensor,
                    k2_cache: torch.Tensor, cache_seqlens: torch.Tensor, params: SparseParams, *,
                    scale: float | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """One new token per sequence (CUDA-graph friendly: no host sync, shapes fixed by the caches).

    q [B, Hq, D]; k_cache, v_cache [B, S, Hkv, D]; k1_cache [B, S1, Hkv, D], k2_cache [B, S2, Hkv, D] kept
    up to date (update_compressed_keys); cache_seqlens int [B]: valid keys including the new token, which is at
    position cache_seqlens - 1. Returns o [B, Hq, D] (written into `out` if given).
    """
    if q.dim() != 3:
        raise ValueError(f"infllmv2_decode: q must be [B, Hq, D], got {tuple(q.shape)}")
    _check_qkv("infllmv2_decode", q[:, None], k_cache, v_cache)
    B, Hq, D = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    for name, t in (("k1_cache", k1_cache), ("k2_cache", k2_cache)):
        if t.dim() != 4 or t.shape[0] != B or t.shape[2:] != k_cache.shape[2:]:
            raise ValueError(f"infllmv2_decode: {name} {tuple(t.shape)} must be [B, S', Hkv, D] matching k_cache "
                             f"{tuple(k_cache.shape)}")
    if cache_seqlens.shape != (B,):
        raise ValueError(f"infllmv2_decode: cache_seqlens {tuple(cache_seqlens.shape)} must be [{B}]")
    s = _scale(q, scale)
    pos = (cache_seqlens.to(torch.int64) - 1)[:, None]                  # [B, 1]
    n_blocks = -(-S // params.block_size)
    kbase = torch.arange(B, device=q.device) * S
    kf, vf = k_cache.reshape(B * S, Hkv, D), v_cache.reshape(B * S, Hkv, D)
    with torch.no_grad():
        if use_triton(q, k_cache, v_cache, k1_cache, k2_cache):
            from sala.ops import infllmv2_triton as tri

            if kernel_variant("SALA_SPARSE_DECODE_SELECT") == "split":
                pooled = tri.pooled_block_scores_decode_split(q, k1_cache, k2_cache, pos.view(-1).to(torch.int32),
                                                              params, s, n_blocks)
            else:
                pooled = tri.pooled_block_scores_triton(q[:, None], k1_cache, k2_cache, pos.to(torch.int32), params,
                                                        s, n_blocks)
            idx = tri.topk_blocks_triton(pooled, params.total_blocks)
            if kernel_variant("SALA_SPARSE_DECODE") == "splitk":
                o = tri.sparse_decode_splitk(q.contiguous(), kf, vf, idx, pos.view(-1).to(torch.int32), kbase,
                                             params.block_size, s)
            else:
                o, _ = tri.sparse_attention_fwd(q.contiguous(), kf, vf, idx, pos.view(-1).to(torch.int32), kbase,
                                                params.block_size, s)
        else:
            pooled = ref.pooled_block_scores_ref(q[:, None], k1_cache, k2_cache, pos, params, s, n_blocks)
            idx = ref.topk_block_indices(pooled, params.total_blocks)
            o = ref.sparse_attention_flat_ref(q, kf, vf, idx.permute(0, 2, 1, 3).reshape(B, Hkv, -1), pos.view(-1),
                                              kbase, params.block_size, s)
    if out is not None:
        out.copy_(o)
        return out
    return o
