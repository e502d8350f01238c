"""Block-sparse attention in plain PyTorch whose cost per query does not grow with the context (CPU long inputs).

`sparse_attention_masked_ref` builds a [Tq, Tk] mask (quadratic in the context) and `sparse_attention_flat_ref`
gathers K * block_size keys for every query (a per-token gather of K * block_size * D values, slow on the CPU).
Here the work is organised by key block instead: every (query, selected block) pair is put in the group of its
block, and each group runs one matrix product of its queries against the block's keys (and, after the softmax,
of its probabilities against the block's values). Only queries (D values per head) and probabilities are gathered,
the keys and values are read in place, and the work per query is K * block_size keys whatever the context length.

The same attention as the two references: query i (position q_offset + i) attends to key t iff t's block is among
the query's selected blocks (block_idx >= 0) and t <= q_offset + i, with one softmax. A block listed twice in a
row counts once and a query that sees no key gets 0 (both as in `sparse_attention_masked_ref`).

Selection: `select_blocks_blockwise` gives `select_blocks_ref`'s result (the scores of `pooled_block_scores_ref`,
then the top-k with ties at the cut-off going to the lowest block index, `topk_lowest_index`) while scoring each
chunk of queries only against the compressed keys its last query can see. Stage 1 stays quadratic in the context
(every query scores every visible compressed key, T/16 of them), as in the references.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from sala.ops.infllmv2.params import SparseParams

# Elements of the largest temporary (scores of one batch of block groups, or of one query chunk's pairs): 64 MiB fp32.
_MAX_ELEMENTS = 1 << 24


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _dedupe_rows(idx: Tensor, limit: int) -> Tensor:
    """idx int64 [..., K] with every entry outside [0, limit) and every repeat within a row set to -1."""
    idx = torch.where((idx >= 0) & (idx < limit), idx, -1)
    srt = torch.sort(idx, dim=-1).values
    repeat = torch.zeros_like(srt, dtype=torch.bool)
    repeat[..., 1:] = (srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)
    return torch.where(repeat, -1, srt)


def _group_batches(counts: list[int], row_elements: int, kinds: list[int]) -> list[tuple[int, int]]:
    """Split groups sorted by size (largest first) within runs of one kind into [start, stop) batches of one kind,
    each padded to its first (largest) count: at most _MAX_ELEMENTS padded elements, and no group below 3/4 of the
    batch's width (little padding)."""
    batches, start = [], 0
    while start < len(counts):
        width = counts[start]
        per = max(1, _MAX_ELEMENTS // max(1, width * row_elements))
        stop = start + 1
        while (stop < len(counts) and stop - start < per and 4 * counts[stop] >= 3 * width
               and kinds[stop] == kinds[start]):
            stop += 1
        batches.append((start, stop))
        start = stop
    return batches


def sparse_attention_blockwise_ref(q: Tensor, k: Tensor, v: Tensor, block_idx: Tensor, q_offset: int,
                                   block_size: int, scale: float) -> Tensor:
    """Block-sparse attention of q [B, Tq, Hq, D] (positions q_offset..) over k, v [B, Tk, Hkv, D].

    block_idx int [B, Hkv, Tq, K] (-1 = none); Hq a multiple of Hkv (query heads h*G .. h*G+G-1 read KV head h).
    Differentiable w.r.t. q, k, v. Returns o [B, Tq, Hq, D] in q.dtype.
    """
    B, Tq, Hq, D = q.shape
    Hkv, K = k.shape[2], block_idx.shape[-1]
    G = Hq // Hkv
    bs = block_size
    acc = _acc_dtype(q)
    dev = q.device
    if Tq == 0:
        return q.new_zeros(B, 0, Hq, D)
    # keys past the last query are invisible to every query: dropped, so nothing a cache holds there (uninitialised
    # memory, NaN) meets a product; the last block is padded with zero keys (always masked)
    Tk = min(k.shape[1], q_offset + Tq)
    nbk = -(-Tk // bs)
    pad = nbk * bs - Tk
    kb = torch.nn.functional.pad(k[:, :Tk].to(acc), (0, 0, 0, 0, 0, pad)).view(B, nbk, bs, Hkv, D)
    vb = torch.nn.functional.pad(v[:, :Tk].to(acc), (0, 0, 0, 0, 0, pad)).view(B, nbk, bs, Hkv, D)
    kb = kb.permute(0, 3, 1, 2, 4).reshape(B * Hkv * nbk, bs, D)           # block (b, h, j) at (b*Hkv + h)*nbk + j
    vb = vb.permute(0, 3, 1, 2, 4).reshape(B * Hkv * nbk, bs, D)
    # query rows (b, h, i) at (b*Hkv + h)*Tq + i, each [G, D]
    qr = (q.to(acc) * scale).view(B, Tq, Hkv, G, D).permute(0, 2, 1, 3, 4).reshape(B * Hkv * Tq, G, D)
    idx = _dedupe_rows(block_idx.to(torch.int64), nbk)                       # [B, Hkv, Tq, K]
    qpos = q_offset + torch.arange(Tq, device=dev)
    # a block that starts after the query is invisible to it: not a pair
    idx = torch.where(idx * bs <= qpos[:, None], idx, -1)
    outs = []
    chunk = max(1, _MAX_ELEMENTS // max(1, B * Hkv * K * G * bs))         # queries per chunk (pair scores bound)
    for c0 in range(0, Tq, chunk):
        c1 = min(Tq, c0 + chunk)
        outs.append(_chunk_attention(qr, kb, vb, idx[:, :, c0:c1], Tq, c0, q_offset, nbk, bs))
    o = torch.cat(outs, dim=2)                                              # [B, Hkv, Tq, G, D]
    o = o.permute(0, 2, 1, 3, 4).reshape(B, Tq, Hq, D)
    return o.to(q.dtype)


def _chunk_attention(qr: Tensor, kb: Tensor, vb: Tensor, sub: Tensor, Tq: int, c0: int, q_offset: int, nbk: int,
                     bs: int) -> Tensor:
    """Outputs [B, Hkv, C, G, D] of the queries c0 .. c0+C-1 whose selections are sub [B, Hkv, C, K] (deduplicated,
    -1 = none); qr [B*Hkv*Tq, G, D] query rows times the scale, kb, vb [B*Hkv*nbk, bs, D] key and value blocks."""
    B, Hkv, C, K = sub.shape
    G, D = qr.shape[1], qr.shape[2]
    dev, acc = qr.device, qr.dtype
    n_rows = B * Hkv * C
    flat = sub.reshape(n_rows, K)
    row, slot = torch.nonzero(flat >= 0, as_tuple=True)                     # row: (b*Hkv + h)*C + i
    if row.numel() == 0:
        return qr.new_zeros(B, Hkv, C, G, D)
    bh = torch.div(row, C, rounding_mode="floor")
    blk = flat[row, slot]
    qpos = q_offset + c0 + row % C                                          # the pair's query position
    own = blk == torch.div(qpos, bs, rounding_mode="floor")                 # the query's own block: causal inside
    group = (bh * nbk + blk) * 2 + own.to(torch.int64)                      # a key block, own-block pairs apart
    # groups largest first, the own-block groups (which need the causal mask) after the others; pairs in group
    # order, so that a batch of groups is a run of pairs
    gid, inverse, counts = torch.unique(group, return_inverse=True, return_counts=True)
    by_size = torch.argsort(counts, descending=True, stable=True)
    by_size = by_size[torch.argsort(gid[by_size] % 2, stable=True)]
    rank = torch.empty_like(by_size)
    rank[by_size] = torch.arange(by_size.numel(), device=dev)
    order = torch.argsort(rank[inverse], stable=True)
    row, qpos = row[order], qpos[order]
    gid, counts = gid[by_size], counts[by_size]
    causal = (gid % 2).tolist()
    gid = torch.div(gid, 2, rounding_mode="floor")                          # key block (b*Hkv + h)*nbk + j
    starts = torch.cumsum(counts, 0) - counts
    counts_list = counts.tolist()
    offs = torch.arange(bs, device=dev)
    qrow = bh[order] * Tq + c0 + row % C                                    # the pair's row of qr
    inplace = not torch.is_grad_enabled() or not (qr.requires_grad or kb.requires_grad or vb.requires_grad)
    # pass 1: the scores of a batch of groups [nG, W, G, bs] (padded to its largest group; the pads count for a
    # spare row) and the maximum of every (query row, head)
    peak = torch.full((n_rows + 1, G), float("-inf"), dtype=acc, device=dev)    # row n_rows: the pads
    batches = []
    for b0, b1 in _group_batches(counts_list, G * bs, causal):
        width = counts_list[b0]
        slots = torch.arange(width, device=dev)
        used = slots[None, :] < counts[b0:b1, None]                         # [nG, W]
        pid = torch.where(used, starts[b0:b1, None] + slots[None, :], 0)
        rows = torch.where(used, row[pid], n_rows)
        s = torch.bmm(qr[qrow[pid]].view(b1 - b0, width * G, D), kb[gid[b0:b1]].transpose(1, 2))
        s = s.view(b1 - b0, width, G, bs)
        if causal[b0]:
            keypos = (gid[b0:b1] % nbk)[:, None, None] * bs + offs          # [nG, 1, bs]
            hidden = (keypos > qpos[pid][..., None])[:, :, None, :]         # [nG, W, 1, bs]
            s = s.masked_fill_(hidden, float("-inf")) if inplace else s.masked_fill(hidden, float("-inf"))
        with torch.no_grad():
            peak.scatter_reduce_(0, rows.view(-1, 1).expand(-1, G), s.amax(dim=-1).view(-1, G), "amax")
        batches.append((b0, b1, rows, s))
    peak = torch.where(torch.isfinite(peak), peak, 0.0)
    # pass 2: exp(s - peak) times the block's values, and the softmax denominators, summed per (query row, head)
    num = torch.zeros(n_rows + 1, G, D, dtype=acc, device=dev)
    den = torch.zeros(n_rows + 1, G, dtype=acc, device=dev)
    for b0, b1, rows, s in batches:
        if inplace:
            e = s.sub_(peak[rows][..., None]).exp_()
        else:
            e = torch.exp(s - peak[rows][..., None])                        # [nG, W, G, bs]
        den = den.index_add(0, rows.view(-1), e.sum(dim=-1).view(-1, G))
        pv = torch.bmm(e.view(b1 - b0, -1, bs), vb[gid[b0:b1]])            # [nG, W*G, D]
        num = num.index_add(0, rows.view(-1), pv.view(-1, G, D))
    o = num[:n_rows] / torch.where(den[:n_rows] > 0, den[:n_rows], 1.0)[..., None]
    return o.view(B, Hkv, C, G, D)


# ------------------------------------------------------------------------------------------------ selection
def _visible_windows(p: int, kernel: int, stride: int, n: int) -> int:
    """How many of the first n compressed keys (kernel, stride) a query at position p sees (j*stride + kernel - 1
    <= p)."""
    return 0 if p < kernel - 1 else min(n, (p - kernel + 1) // stride + 1)


def pooled_block_scores_blockwise(q: Tensor, k1: Tensor, k2: Tensor, pos: Tensor, params: "SparseParams",
                                  scale: float, n_blocks: int) -> Tensor:
    """`pooled_block_scores_ref` (same arguments, same result [B, Hkv, Tq, n_blocks]) at a cost that follows
    causality: each chunk of queries scores only the compressed keys its last query can see, masks only the few
    that not all of its queries see, and max-pools the stride groups without a padded copy."""
    B, Tq, Hq, D = q.shape
    Hkv = k1.shape[2]
    G = Hq // Hkv
    acc = _acc_dtype(q)
    dev = q.device
    n1, n2 = k1.shape[1], k2.shape[1]
    r = params.block_size // params.kernel_stride
    halo = (params.kernel_size - 1) // params.kernel_stride
    k1c = k1.to(acc).permute(0, 2, 3, 1).reshape(B * Hkv, D, n1)            # [B*Hkv, D, n1]
    k2c = k2.to(acc).permute(0, 2, 3, 1).reshape(B * Hkv, D, n2)
    blocks = torch.arange(n_blocks, device=dev)
    out = torch.empty(B, Hkv, Tq, n_blocks, dtype=acc, device=dev)
    chunk = max(1, min(1024, _MAX_ELEMENTS // max(1, B * Hq * max(n1, n2, 1))))
    for c0 in range(0, Tq, chunk):
        c1 = min(Tq, c0 + chunk)
        C = c1 - c0
        p = pos[:, c0:c1]                                                   # [B, C]
        p_lo, p_hi = int(p.min()), int(p.max())
        qc = (q[:, c0:c1].to(acc).view(B, C, Hkv, G, D).permute(0, 2, 3, 1, 4)
              .reshape(B * Hkv, G * C, D))                                   # rows (g, query)
        prow = p.repeat_interleave(Hkv, dim=0).repeat(1, G)[..., None]      # [B*Hkv, G*C, 1] positions of the rows
        # log-sum-exp over the visible K2 (0 where none is)
        v2 = _visible_windows(p_hi, params.k2_kernel, params.k2_stride, n2)
        if v2 == 0:
            lse = torch.zeros(B * Hkv, G * C, 1, dtype=acc, device=dev)
        else:
            s2 = torch.bmm(qc, k2c[..., :v2]) * scale
            a2 = _visible_windows(p_lo, params.k2_kernel, params.k2_stride, n2)
            if a2 < v2:
                end2 = torch.arange(a2, v2, device=dev) * params.k2_stride + params.k2_kernel - 1
                s2[..., a2:] = s2[..., a2:].masked_fill(end2 > prow, float("-inf"))
            lse = torch.logsumexp(s2, dim=-1, keepdim=True)
            lse = torch.where(torch.isfinite(lse), lse, torch.zeros((), dtype=acc, device=dev))
        # stage-1 probabilities of the visible K1, summed over the G heads of a KV head (0 where invisible)
        v1 = _visible_windows(p_hi, params.kernel_size, params.kernel_stride, n1)
        width = r * n_blocks
        score = torch.zeros(B * Hkv, C, width, dtype=acc, device=dev)
        if v1 > 0:
            s1 = torch.bmm(qc, k1c[..., :v1]) * scale
            prob = torch.exp(s1 - lse)
            a1 = _visible_windows(p_lo, params.kernel_size, params.kernel_stride, n1)
            if a1 < v1:
                end1 = torch.arange(a1, v1, device=dev) * params.kernel_stride + params.kernel_size - 1
                prob[..., a1:] = prob[..., a1:].masked_fill(end1 > prow, 0.0)
            take = min(v1, width)
            score[..., :take] = prob.view(B * Hkv, G, C, v1).sum(dim=1)[..., :take]
        # max-pool: block b takes the max over K1 r*b - halo .. r*b + r - 1 (indices < 0 count as 0)
        if halo <= r:
            grouped = score.view(B * Hkv, C, n_blocks, r)
            pooled = grouped.amax(dim=-1)
            if halo > 0 and n_blocks > 1:
                pooled[..., 1:] = torch.maximum(pooled[..., 1:], grouped[..., :-1, r - halo:].amax(dim=-1))
        else:
            padded = torch.nn.functional.pad(score, (halo, 0))
            pooled = padded.unfold(-1, r + halo, r).amax(dim=-1)
        qblk = torch.div(p, params.block_size, rounding_mode="floor").repeat_interleave(Hkv, dim=0)[:, :, None]
        b = blocks[None, None, :]
        forced = (b < params.init_blocks) | ((b >= qblk - params.local_blocks) & (b <= qblk))
        pooled = pooled.masked_fill(forced, float("inf")).masked_fill(b > qblk, float("-inf"))
        out[:, :, c0:c1] = pooled.view(B, Hkv, C, n_blocks)
    return out


def topk_lowest_index(pooled: Tensor, total_blocks: int) -> Tensor:
    """The `total_blocks` highest of pooled scores [..., n_blocks], ties at the cut-off going to the lowest block
    index: int32 [..., total_blocks], ascending, padded with -1 (blocks scored -inf are never selected)."""
    n = pooled.shape[-1]
    if n < total_blocks:
        pooled = torch.nn.functional.pad(pooled, (0, total_blocks - n), value=float("-inf"))
        n = total_blocks
    cut = torch.topk(pooled, total_blocks, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
    above = pooled > cut
    at_cut = (pooled == cut) & (cut > float("-inf"))
    room = total_blocks - above.sum(dim=-1, keepdim=True)
    keep = above | (at_cut & (torch.cumsum(at_cut.to(torch.int32), dim=-1) <= room))
    big = torch.iinfo(torch.int32).max
    cols = torch.where(keep, torch.arange(n, device=pooled.device, dtype=torch.int32), big)
    idx = torch.topk(cols, total_blocks, dim=-1, largest=False, sorted=True).values
    return torch.where(idx == big, -1, idx)


def select_blocks_blockwise(q: Tensor, k1: Tensor, k2: Tensor, pos: Tensor, params: "SparseParams",
                            scale: float) -> Tensor:
    """`select_blocks_ref` (same arguments and result, int32 [B, Hkv, Tq, total_blocks]) through
    `pooled_block_scores_blockwise` and `topk_lowest_index`, a chunk of queries at a time."""
    B, Tq = pos.shape
    Hkv = k1.shape[2]
    out = torch.empty(B, Hkv, Tq, params.total_blocks, dtype=torch.int32, device=q.device)
    chunk = 4096
    for c0 in range(0, Tq, chunk):
        c1 = min(Tq, c0 + chunk)
        n_blocks = int(pos[:, c0:c1].max()) // params.block_size + 1
        pooled = pooled_block_scores_blockwise(q[:, c0:c1], k1, k2, pos[:, c0:c1], params, scale, n_blocks)
        out[:, :, c0:c1] = topk_lowest_index(pooled, params.total_blocks)
    return out
