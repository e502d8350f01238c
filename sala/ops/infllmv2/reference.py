"""InfLLM-V2 sparse attention in plain PyTorch: the ground truth for the Triton kernels (CPU and GPU).

Every function processes queries in chunks, so no [T, T] tensor is ever built: the largest temporaries are
[chunk, n1] stage-1 scores and [chunk, total_blocks * block_size, D] gathered keys.

Conventions (see docs/sparse.md):
- q [B, Tq, Hq, D], k/v [B, Tk, Hkv, D]; query heads h*G .. h*G+G-1 share KV head h (G = Hq // Hkv).
- `pos` [B, Tq] int64: the absolute position (0-based, within its sequence) of every query.
- Compressed key j of (kernel, stride) covers keys [stride*j, stride*j + kernel) and is visible to the query at
  position p iff stride*j + kernel - 1 <= p.
- Block indices are int32 [B, Hkv, Tq, total_blocks], ascending, padded with -1 at the end.
"""
from __future__ import annotations

import torch

from sala.ops.infllmv2.params import SparseParams, n_windows

# Elements of the largest chunked temporary (fp32): ~256 MiB.
_CHUNK_ELEMENTS = 1 << 26
# Scores per chunk of rows in the top-k (its int64 scatter index is the largest temporary: 32 MiB).
_TOPK_CHUNK_ELEMENTS = 1 << 22


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def compress_keys_ref(k: torch.Tensor, kernel_size: int, stride: int) -> torch.Tensor:
    """Mean of every full window: k [B, T, Hkv, D] -> [B, n, Hkv, D], n = (T - kernel) // stride + 1 (0 if
    T < kernel)."""
    B, T, H, D = k.shape
    if T < kernel_size:
        return k.new_zeros(B, 0, H, D)
    windows = k.to(_acc_dtype(k)).unfold(1, kernel_size, stride)  # [B, n, H, D, kernel]
    return windows.mean(dim=-1).to(k.dtype)


def update_compressed_keys_ref(k_cache: torch.Tensor, k1_cache: torch.Tensor, k2_cache: torch.Tensor,
                               cache_seqlens: torch.Tensor, params: SparseParams, new_tokens: int = 1,
                               block_table: torch.Tensor | None = None) -> None:
    """Write, in place, every K1/K2 window completed by the last `new_tokens` keys of each sequence.

    k_cache [B, S, Hkv, D]; k1_cache [B, S1, Hkv, D]; k2_cache [B, S2, Hkv, D]; cache_seqlens int [B] (lengths
    after the append). block_table int [B, NB]: k_cache is pages [P, BS, Hkv, D] instead, row b's key t at
    k_cache[block_table[b, t // BS], t % BS] (S = NB * BS). No host synchronisation: windows are written with
    masked scatters.
    """
    if block_table is None:
        B, S = k_cache.shape[:2]
    else:
        B, S = block_table.shape[0], block_table.shape[1] * k_cache.shape[1]
    lengths = cache_seqlens.to(torch.int64)
    old = (lengths - new_tokens).clamp(min=0)
    barange = torch.arange(B, device=k_cache.device)
    for cache, kernel, stride in ((k1_cache, params.kernel_size, params.kernel_stride),
                                  (k2_cache, params.k2_kernel, params.k2_stride)):
        n_old, n_new = n_windows(old, kernel, stride), n_windows(lengths, kernel, stride)
        for w in range(new_tokens // stride + 1):
            j = n_old + w                                                  # [B]
            valid = j < n_new
            jc = torch.where(valid, j, torch.zeros_like(j)).clamp(max=cache.shape[1] - 1)
            tok = (jc * stride)[:, None] + torch.arange(kernel, device=k_cache.device)   # [B, kernel]
            tok = tok.clamp(max=S - 1)
            if block_table is None:
                win = k_cache[barange[:, None], tok]                       # [B, kernel, H, D]
            else:
                bs = k_cache.shape[1]
                win = k_cache[block_table[barange[:, None], tok // bs].long(), tok % bs]
            mean = win.to(_acc_dtype(k_cache)).mean(dim=1).to(cache.dtype)  # [B, H, D]
            old_val = cache[barange, jc]
            cache[barange, jc] = torch.where(valid[:, None, None], mean, old_val)


def pooled_block_scores_ref(q: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, pos: torch.Tensor,
                            params: SparseParams, scale: float, n_blocks: int) -> torch.Tensor:
    """Block scores after max-pooling and forcing: [B, Hkv, Tq, n_blocks] in fp32/fp64.

    +inf for forced blocks (init and local), -inf for blocks after the query's own block. Stage-1 score of
    compressed key j: sum over the G heads of exp(q.K1_j*scale - lse), lse = logsumexp over visible K2
    (0 when no K2 is visible yet); invisible K1 score 0.
    """
    B, Tq, Hq, D = q.shape
    Hkv = k1.shape[2]
    G = Hq // Hkv
    acc = _acc_dtype(q)
    dev = q.device
    n1, n2 = k1.shape[1], k2.shape[1]
    j1 = torch.arange(n1, device=dev)
    j2 = torch.arange(n2, device=dev)
    end1 = j1 * params.kernel_stride + params.kernel_size - 1
    end2 = j2 * params.k2_stride + params.k2_kernel - 1
    r = params.block_size // params.kernel_stride
    halo = (params.kernel_size - 1) // params.kernel_stride
    # K1 indices of block b: r*b - halo .. r*b + r - 1 (clipped to >= 0)
    blocks = torch.arange(n_blocks, device=dev)
    k1c, k2c = k1.to(acc), k2.to(acc)
    out = torch.empty(B, Hkv, Tq, n_blocks, dtype=acc, device=dev)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, B * Hq * max(n1, n2, 1)))
    for c0 in range(0, Tq, chunk):
        c1 = min(Tq, c0 + chunk)
        p = pos[:, c0:c1]                                                   # [B, C]
        qc = q[:, c0:c1].to(acc).view(B, c1 - c0, Hkv, G, D)
        s2 = torch.einsum("bckgd,bnkd->bkgcn", qc, k2c) * scale             # [B, Hkv, G, C, n2]
        vis2 = (end2[None, None, :] <= p[:, :, None])[:, None, None]       # [B, 1, 1, C, n2]
        lse = torch.logsumexp(s2.masked_fill(~vis2, float("-inf")), dim=-1)
        lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        s1 = torch.einsum("bckgd,bnkd->bkgcn", qc, k1c) * scale            # [B, Hkv, G, C, n1]
        vis1 = (end1[None, None, :] <= p[:, :, None])[:, None, None]
        prob = torch.where(vis1, torch.exp(s1 - lse[..., None]), torch.zeros((), dtype=acc, device=dev))
        score = prob.sum(dim=2)                                              # [B, Hkv, C, n1]
        # max-pool: block b takes max over score[r*b - halo : r*b + r]; pad so every window exists
        width = r * n_blocks + halo
        padded = score.new_zeros(B, Hkv, c1 - c0, width)
        take = min(n1, r * n_blocks)
        padded[..., halo:halo + take] = score[..., :take]
        pooled = padded.unfold(-1, r + halo, r).amax(dim=-1)                 # [B, Hkv, C, n_blocks]
        qblk = torch.div(p, params.block_size, rounding_mode="floor")[:, None, :, None]  # [B, 1, C, 1]
        b = blocks[None, None, None, :]
        forced = (b < params.init_blocks) | ((b >= qblk - params.local_blocks) & (b <= qblk))
        pooled = pooled.masked_fill(forced, float("inf")).masked_fill(b > qblk, float("-inf"))
        out[:, :, c0:c1] = pooled
    return out


def topk_block_indices(pooled: torch.Tensor, total_blocks: int) -> torch.Tensor:
    """Top-`total_blocks` of pooled scores [.., n_blocks] -> int32 [.., total_blocks], ascending, -1 padded.

    Blocks scored -inf (after the query's own block) are never selected. Tie rule (docs/sparse.md): with K =
    total_blocks, every block scored above the K-th largest score is kept, and among the blocks scored exactly
    that much the lowest indices fill the remaining slots (as the Triton top-k does). Stated explicitly here
    because `torch.topk` leaves the order of equal values unspecified, and adjacent blocks often tie (their
    max-pooling windows share one K1 window). Rows are processed in chunks of about `_TOPK_CHUNK_ELEMENTS`
    scores, so the temporaries stay small for wide rows; no host synchronisation.
    """
    n = pooled.shape[-1]
    K = total_blocks
    if n < K:
        pad = pooled.new_full(pooled.shape[:-1] + (K - n,), float("-inf"))
        pooled = torch.cat([pooled, pad], dim=-1)
        n = K
    rows = pooled.reshape(-1, n)
    out = torch.empty(rows.shape[0], K, dtype=torch.int32, device=pooled.device)
    step = max(1, _TOPK_CHUNK_ELEMENTS // n)
    for r0 in range(0, rows.shape[0], step):
        out[r0:r0 + step] = _topk_rows(rows[r0:r0 + step], K)
    return out.reshape(pooled.shape[:-1] + (K,))


def _topk_rows(x: torch.Tensor, K: int) -> torch.Tensor:
    """`topk_block_indices` of rows x [R, n] (n >= K)."""
    cut = torch.topk(x, K, dim=-1, sorted=True).values[:, K - 1:]                # the K-th largest score [R, 1]
    above = x > cut
    tie = x == cut
    need = K - above.sum(dim=-1, keepdim=True, dtype=torch.int32)
    sel = (above | (tie & (torch.cumsum(tie, dim=-1, dtype=torch.int32) <= need))) & (x > float("-inf"))
    slot = torch.cumsum(sel, dim=-1, dtype=torch.int32) - 1                     # ascending slot of each selected block
    out = torch.full((x.shape[0], K + 1), -1, dtype=torch.int32, device=x.device)
    cols = torch.arange(x.shape[-1], dtype=torch.int32, device=x.device).expand_as(slot)
    out.scatter_(-1, torch.where(sel, slot, K).to(torch.int64), torch.where(sel, cols, -1))
    return out[:, :K]


def select_blocks_ref(q: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, pos: torch.Tensor,
                      params: SparseParams, scale: float) -> torch.Tensor:
    """Selected blocks int32 [B, Hkv, Tq, total_blocks] for queries at positions pos [B, Tq]."""
    B, Tq = pos.shape
    Hkv = k1.shape[2]
    out = torch.empty(B, Hkv, Tq, params.total_blocks, dtype=torch.int32, device=q.device)
    if Tq == 0:
        return out
    n1 = max(k1.shape[1], 1)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, B * q.shape[2] * n1))
    for c0 in range(0, Tq, chunk):
        c1 = min(Tq, c0 + chunk)
        n_blocks = int(pos[:, c0:c1].max().item()) // params.block_size + 1
        pooled = pooled_block_scores_ref(q[:, c0:c1], k1, k2, pos[:, c0:c1], params, scale, n_blocks)
        out[:, :, c0:c1] = topk_block_indices(pooled, params.total_blocks)
    return out


def sparse_attention_flat_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor,
                              pos: torch.Tensor, kbase: torch.Tensor, block_size: int, scale: float,
                              block_table: torch.Tensor | None = None) -> torch.Tensor:
    """Block-sparse attention on flattened tokens (differentiable w.r.t. q, k, v).

    q [N, Hq, D]; k, v [Nk, Hkv, D]; block_idx int [N, Hkv, K] (-1 = none); pos [N] position of each query in
    its sequence; kbase [N] flat index of its sequence's first key. Query n attends to keys kbase[n] + t with t in
    a selected block and t <= pos[n], with one softmax. Returns o [N, Hq, D] in q.dtype.
    block_table int [R, NB]: k, v are pages of block_size keys flattened to [P * block_size, Hkv, D], kbase[n]
    the offset r * NB of the query's row in the flat table, and key t is K/V row
    table[kbase + t // block_size] * block_size + t % block_size.
    """
    N, Hq, D = q.shape
    Nk, Hkv, _ = k.shape
    G = Hq // Hkv
    K = block_idx.shape[-1]
    acc = _acc_dtype(q)
    dev = q.device
    offs = torch.arange(block_size, device=dev)
    table = None if block_table is None else block_table.reshape(-1).to(torch.int64)
    outs = []
    chunk = max(1, _CHUNK_ELEMENTS // max(1, Hkv * K * block_size * D))
    for c0 in range(0, N, chunk):
        c1 = min(N, c0 + chunk)
        idx = block_idx[c0:c1].to(torch.int64)                              # [C, Hkv, K]
        t = idx.clamp(min=0)[..., None] * block_size + offs                  # [C, Hkv, K, bs]
        ok = (idx >= 0)[..., None] & (t <= pos[c0:c1, None, None, None])
        if table is None:
            flat = kbase[c0:c1, None, None, None] + t
        else:
            ent = kbase[c0:c1, None, None, None] + torch.div(t, block_size, rounding_mode="floor")
            flat = table[ent.clamp(0, table.numel() - 1)] * block_size + t % block_size
        flat = flat.clamp(0, Nk - 1).reshape(c1 - c0, Hkv, K * block_size)
        ok = ok.reshape(c1 - c0, Hkv, K * block_size)
        heads = torch.arange(Hkv, device=dev)[None, :, None]
        kg = k[flat, heads].to(acc)                                          # [C, Hkv, K*bs, D]
        vg = v[flat, heads].to(acc)
        vg = torch.where(ok[..., None], vg, torch.zeros((), dtype=acc, device=dev))
        qc = q[c0:c1].to(acc).view(c1 - c0, Hkv, G, D)
        s = torch.einsum("chgd,chnd->chgn", qc, kg) * scale
        s = s.masked_fill(~ok[:, :, None, :], float("-inf"))
        p = torch.softmax(s, dim=-1)
        outs.append(torch.einsum("chgn,chnd->chgd", p, vg).reshape(c1 - c0, Hq, D))
    if not outs:
        return q.new_zeros(0, Hq, D)
    return torch.cat(outs, dim=0).to(q.dtype)


def sparse_attention_masked_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor,
                                q_offset: int, block_size: int, scale: float) -> torch.Tensor:
    """The same attention as `sparse_attention_flat_ref`, as one SDPA call with a [B, Hq, Tq, Tk] boolean mask.

    q [B, Tq, Hq, D] at positions q_offset.., k, v [B, Tk, Hkv, D], block_idx int [B, Hkv, Tq, K] (-1 = none).
    The mask costs B*Hkv*Tq*Tk bytes: meant for short contexts (CPU demos, tests), where gathering K*block_size
    keys per query is far slower than one masked dense product. Differentiable w.r.t. q, k, v.
    """
    B, Tq, Hq, D = q.shape
    # Keys past the last query's position are invisible to every query: drop them, so whatever a cache holds there
    # (uninitialised memory, NaN) never meets the dense product.
    Tk, Hkv = min(k.shape[1], q_offset + Tq), k.shape[2]
    k, v = k[:, :Tk], v[:, :Tk]
    nbk = -(-Tk // block_size)
    idx = block_idx.to(torch.int64)
    idx = torch.where(idx >= 0, idx, nbk)                                   # -1 -> a spare column
    sel = torch.zeros(B, Hkv, Tq, nbk + 1, dtype=torch.bool, device=q.device)
    sel.scatter_(-1, idx, True)
    mask = sel[..., :nbk].repeat_interleave(block_size, dim=-1)[..., :Tk]   # [B, Hkv, Tq, Tk]
    causal = torch.arange(Tk, device=q.device)[None, :] <= (q_offset + torch.arange(Tq, device=q.device))[:, None]
    mask = (mask & causal).repeat_interleave(Hq // Hkv, dim=1)            # [B, Hq, Tq, Tk]
    acc = _acc_dtype(q)
    o = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2).to(acc), k.transpose(1, 2).to(acc), v.transpose(1, 2).to(acc), attn_mask=mask,
        scale=scale, enable_gqa=Hq != Hkv)
    return o.transpose(1, 2).to(q.dtype)
