"""InfLLM-V2 reference ops against naive definitions (CPU, float64, small configs)."""
from __future__ import annotations

import math
import sys

import pytest
import torch

from sala.ops.dense import dense_causal_attention
from sala.ops.infllmv2 import (
    SparseParams,
    block_sparse_attention,
    compress_keys,
    compressed_lengths,
    infllmv2_attention,
    infllmv2_decode,
    select_blocks,
    update_compressed_keys,
)
from sala.ops.infllmv2 import reference as ref

# block 16, kernel 8 / stride 4 (K2: 32 / 16), topk 2 + window 32 (2 local blocks) -> 4 blocks, sparse from 64
SMALL = SparseParams(block_size=16, kernel_size=8, kernel_stride=4, topk=2, init_blocks=1, window_size=32)


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch):
    monkeypatch.setenv("SALA_KERNELS", "reference")


def _qkv(B, T, Hkv, G, D, dtype=torch.float64, seed=0, Tq=None):
    g = torch.Generator().manual_seed(seed)
    Tq = T if Tq is None else Tq
    q = torch.randn(B, Tq, Hkv * G, D, generator=g, dtype=dtype)
    k = torch.randn(B, T, Hkv, D, generator=g, dtype=dtype)
    v = torch.randn(B, T, Hkv, D, generator=g, dtype=dtype)
    return q, k, v


# ------------------------------------------------------------------------------------------- naive definitions
def naive_compress(k, kernel, stride):
    B, T, H, D = k.shape
    n = (T - kernel) // stride + 1 if T >= kernel else 0
    out = torch.zeros(B, n, H, D, dtype=k.dtype)
    for j in range(n):
        out[:, j] = k[:, stride * j: stride * j + kernel].mean(dim=1)
    return out


def naive_select(q, k, p: SparseParams, q_offset: int, scale: float):
    """Block indices [B, Hkv, Tq, total] from the definition, one query at a time (full score rows)."""
    B, Tq, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    k1 = naive_compress(k, p.kernel_size, p.kernel_stride)
    k2 = naive_compress(k, p.k2_kernel, p.k2_stride)
    out = torch.full((B, Hkv, Tq, p.total_blocks), -1, dtype=torch.int32)
    for b in range(B):
        for h in range(Hkv):
            for t in range(Tq):
                pos = q_offset + t
                qb = pos // p.block_size
                if qb + 1 <= p.total_blocks:
                    out[b, h, t, :qb + 1] = torch.arange(qb + 1, dtype=torch.int32)
                    continue
                score = torch.zeros(k1.shape[1], dtype=torch.float64)
                vis1 = [j for j in range(k1.shape[1]) if p.kernel_stride * j + p.kernel_size - 1 <= pos]
                vis2 = [j for j in range(k2.shape[1]) if p.k2_stride * j + p.k2_kernel - 1 <= pos]
                for gi in range(G):
                    qh = q[b, t, h * G + gi]
                    lse = torch.logsumexp(torch.stack([qh @ k2[b, j, h] * scale for j in vis2]), 0)
                    for j in vis1:
                        score[j] += torch.exp(qh @ k1[b, j, h] * scale - lse)
                blocks = []
                for blk in range(qb + 1):
                    lo, hi = blk * p.block_size, blk * p.block_size + p.block_size   # block tokens [lo, hi)
                    over = [score[j] for j in vis1
                            if p.kernel_stride * j < hi and p.kernel_stride * j + p.kernel_size > lo]
                    s = max(over) if over else 0.0
                    if blk < p.init_blocks or qb - p.local_blocks <= blk <= qb:
                        s = math.inf
                    blocks.append((float(s), blk))
                chosen = sorted(blk for _, blk in sorted(blocks, reverse=True)[:p.total_blocks])
                out[b, h, t, :len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
    return out


def naive_masked_attention(q, k, v, block_idx, block_size, q_offset, scale):
    """Dense attention with a token mask built from the selected blocks (full [Tq, Tk] matrix)."""
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    out = torch.empty_like(q)
    for b in range(B):
        for hq in range(Hq):
            h = hq // G
            mask = torch.zeros(Tq, Tk, dtype=torch.bool)
            for t in range(Tq):
                for blk in block_idx[b, h, t].tolist():
                    if blk >= 0:
                        mask[t, blk * block_size: (blk + 1) * block_size] = True
                mask[t, q_offset + t + 1:] = False
            s = (q[b, :, hq] @ k[b, :, h].T) * scale
            out[b, :, hq] = torch.softmax(s.masked_fill(~mask, -math.inf), -1) @ v[b, :, h]
    return out


def naive_causal(q, k, v, scale):
    B, Tq, Hq, D = q.shape
    Tk, G = k.shape[1], Hq // k.shape[2]
    kk, vv = k.repeat_interleave(G, 2), v.repeat_interleave(G, 2)
    s = torch.einsum("bthd,bshd->bhts", q, kk) * scale
    mask = torch.arange(Tk)[None, :] <= torch.arange(Tq)[:, None] + (Tk - Tq)
    return torch.einsum("bhts,bshd->bthd", torch.softmax(s.masked_fill(~mask, -math.inf), -1), vv)


# ------------------------------------------------------------------------------------------- params
def test_params_released_and_properties():
    p = SparseParams()
    assert (p.local_blocks, p.total_blocks, p.k2_kernel, p.k2_stride, p.dense_positions) == (32, 96, 128, 64, 6144)
    assert (SMALL.total_blocks, SMALL.dense_positions) == (4, 64)


@pytest.mark.parametrize("kwargs, word", [
    (dict(block_size=60), "block_size"), (dict(kernel_size=24, kernel_stride=16), "kernel_size"),
    (dict(window_size=100), "window_size"), (dict(topk=0), "topk"), (dict(init_blocks=-1), "init_blocks"),
    (dict(topk=1, init_blocks=1), "topk"), (dict(block_size=16, kernel_size=128, kernel_stride=16, topk=2,
                                                   window_size=32), r"4 \* kernel_size"),
])
def test_params_validation(kwargs, word):
    with pytest.raises(ValueError, match=word):
        SparseParams(**kwargs)


# ------------------------------------------------------------------------------------------- compression
@pytest.mark.parametrize("T", [5, 8, 37, 64])
def test_compress_keys_matches_naive(T):
    k = torch.randn(2, T, 3, 8, dtype=torch.float64)
    for kernel, stride in ((8, 4), (32, 16)):
        out = compress_keys(k, kernel, stride)
        assert out.shape[1] == compressed_lengths(T, SMALL)[0 if kernel == 8 else 1]
        torch.testing.assert_close(out, naive_compress(k, kernel, stride))


def test_compress_keys_bf16_mean_in_fp32():
    k = torch.randn(1, 40, 2, 16).to(torch.bfloat16)
    out = compress_keys(k, 8, 4)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), naive_compress(k.double(), 8, 4).float(), atol=1e-2, rtol=1e-2)


def test_update_compressed_keys_decode_and_prefill_forms():
    B, S, H, D = 2, 100, 2, 8
    k = torch.randn(B, S, H, D, dtype=torch.float64)
    n1, n2 = compressed_lengths(S, SMALL)
    k1c = torch.full((B, n1 + 2, H, D), float("nan"), dtype=torch.float64)
    k2c = torch.full((B, n2 + 2, H, D), float("nan"), dtype=torch.float64)
    lengths = torch.tensor([30, 45])
    update_compressed_keys(k, k1c, k2c, lengths, SMALL, new_tokens=45)      # prompts (all windows)
    lengths = lengths + 21
    update_compressed_keys(k, k1c, k2c, lengths, SMALL, new_tokens=21)      # a prefill chunk
    for _ in range(19):                                                       # then one token at a time
        lengths = lengths + 1
        update_compressed_keys(k, k1c, k2c, lengths, SMALL)
    for b in range(B):
        L = int(lengths[b])
        m1, m2 = compressed_lengths(L, SMALL)
        torch.testing.assert_close(k1c[b, :m1], naive_compress(k[b:b + 1, :L], 8, 4)[0])
        torch.testing.assert_close(k2c[b, :m2], naive_compress(k[b:b + 1, :L], 32, 16)[0])
        assert torch.isnan(k1c[b, m1:]).all() and torch.isnan(k2c[b, m2:]).all()   # nothing written past


# ------------------------------------------------------------------------------------------- selection
def test_select_dense_regime_keeps_all_blocks():
    q, k, _ = _qkv(1, 64, 2, 2, 8)
    idx = select_blocks(q, compress_keys(k, 8, 4), compress_keys(k, 32, 16), SMALL, q_offset=0)
    for t in range(64):
        qb = t // 16
        assert idx[0, :, t, :qb + 1].tolist() == [list(range(qb + 1))] * 2
        assert (idx[0, :, t, qb + 1:] == -1).all()


def test_select_hand_checkable_block_wins():
    """Keys of block 1 point along q (others orthogonal): query 100 (block 6) must pick 0, 1, 4, 5, 6."""
    D, T = 8, 101
    k = torch.zeros(1, T, 1, D, dtype=torch.float64)
    k[0, :, 0, 1] = 1.0
    k[0, 16:32, 0, 0] = 5.0
    k[0, 16:32, 0, 1] = 0.0
    q = torch.zeros(1, T, 2, D, dtype=torch.float64)
    q[..., 0] = 3.0
    p = SparseParams(block_size=16, kernel_size=8, kernel_stride=4, topk=3, init_blocks=1, window_size=32)
    idx = select_blocks(q[:, 100:], compress_keys(k, 8, 4), compress_keys(k, 32, 16), p, q_offset=100)
    assert idx[0, 0, 0].tolist() == [0, 1, 4, 5, 6]
    q[..., 0] = -3.0                      # now block 1 is the least attractive: another block is taken
    idx = select_blocks(q[:, 100:], compress_keys(k, 8, 4), compress_keys(k, 32, 16), p, q_offset=100)
    assert 1 not in idx[0, 0, 0].tolist() and idx[0, 0, 0, -1] == 6


@pytest.mark.parametrize("G, q_offset, Tq", [(2, 0, 150), (4, 120, 30)])
def test_select_matches_naive(G, q_offset, Tq):
    B, T, Hkv, D = 2, q_offset + Tq, 2, 8
    q, k, _ = _qkv(B, T, Hkv, G, D, seed=G, Tq=Tq)
    scale = D ** -0.5
    got = select_blocks(q, compress_keys(k, 8, 4), compress_keys(k, 32, 16), SMALL, q_offset=q_offset)
    assert got.dtype == torch.int32 and got.shape == (B, Hkv, Tq, 4)
    torch.testing.assert_close(got, naive_select(q, k, SMALL, q_offset, scale), rtol=0, atol=0)


def test_select_uses_only_visible_keys():
    """Compressed keys of later tokens (a full-sequence cache) must not change earlier selections."""
    q, k, _ = _qkv(1, 200, 2, 2, 8, seed=3)
    short = select_blocks(q[:, 100:130], compress_keys(k[:, :130], 8, 4), compress_keys(k[:, :130], 32, 16),
                          SMALL, q_offset=100)
    full = select_blocks(q[:, 100:130], compress_keys(k, 8, 4), compress_keys(k, 32, 16), SMALL, q_offset=100)
    assert torch.equal(short, full)


# ------------------------------------------------------------------------------------------- attention
def test_block_sparse_attention_matches_masked_dense():
    B, T, Hkv, G, D = 2, 130, 2, 2, 8
    q, k, v = _qkv(B, T, Hkv, G, D, seed=5, Tq=50)
    idx = select_blocks(q, compress_keys(k, 8, 4), compress_keys(k, 32, 16), SMALL, q_offset=80)
    scale = 0.3
    got = block_sparse_attention(q, k, v, idx, SMALL, q_offset=80, scale=scale)
    torch.testing.assert_close(got, naive_masked_attention(q, k, v, idx, 16, 80, scale))


def test_dense_positions_equal_sdpa():
    q, k, v = _qkv(1, 150, 2, 4, 8, seed=7)
    out = infllmv2_attention(q, k, v, SMALL)
    torch.testing.assert_close(out[:, :64], naive_causal(q[:, :64], k[:, :64], v[:, :64], 8 ** -0.5))
    short = infllmv2_attention(q[:, :60], k[:, :60], v[:, :60], SMALL)
    torch.testing.assert_close(short, dense_causal_attention(q[:, :60], k[:, :60], v[:, :60]))
    # with all blocks selected, the sparse kernel is dense attention as well
    idx = select_blocks(q[:, :64], compress_keys(k, 8, 4), compress_keys(k, 32, 16), SMALL, q_offset=0)
    torch.testing.assert_close(block_sparse_attention(q[:, :64], k[:, :64], v[:, :64], idx, SMALL, q_offset=0),
                               out[:, :64])


def test_infllmv2_attention_matches_definition():
    B, T, Hkv, G, D = 1, 140, 2, 2, 8
    q, k, v = _qkv(B, T, Hkv, G, D, seed=11)
    out = infllmv2_attention(q, k, v, SMALL)
    idx = naive_select(q, k, SMALL, 0, D ** -0.5)
    torch.testing.assert_close(out, naive_masked_attention(q, k, v, idx, 16, 0, D ** -0.5))


def test_prefill_in_pieces_equals_one_shot():
    q, k, v = _qkv(2, 170, 2, 2, 8, seed=13)
    full = infllmv2_attention(q, k, v, SMALL)
    pieces, t = [], 0
    for n in (50, 1, 37, 82):
        pieces.append(infllmv2_attention(q[:, t:t + n], k[:, :t + n], v[:, :t + n], SMALL))
        t += n
    torch.testing.assert_close(torch.cat(pieces, 1), full)
    # caller-kept compressed keys of the whole cache give the same result
    k1, k2 = compress_keys(k, 8, 4), compress_keys(k, 32, 16)
    torch.testing.assert_close(infllmv2_attention(q[:, 100:], k, v, SMALL, k1=k1, k2=k2), full[:, 100:])


def test_varlen_equals_separate_calls():
    lens = [70, 20, 99]
    q, k, v = _qkv(1, sum(lens), 2, 2, 8, seed=17)
    cu = torch.tensor([0, 70, 90, 189])
    out = infllmv2_attention(q, k, v, SMALL, cu_seqlens=cu)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        torch.testing.assert_close(out[:, s:e], infllmv2_attention(q[:, s:e], k[:, s:e], v[:, s:e], SMALL))


def test_decode_equals_last_row_of_prefill():
    B, S, Hkv, G, D = 2, 160, 2, 2, 8
    q, k, v = _qkv(B, S, Hkv, G, D, seed=19)
    lengths = torch.tensor([150, 97])
    n1, n2 = compressed_lengths(S, SMALL)
    k1c = torch.zeros(B, n1, Hkv, D, dtype=q.dtype)
    k2c = torch.zeros(B, n2, Hkv, D, dtype=q.dtype)
    update_compressed_keys(k, k1c, k2c, lengths - 1, SMALL, new_tokens=int(S))   # prompt
    update_compressed_keys(k, k1c, k2c, lengths, SMALL)                          # the new token
    kc, vc = k.clone(), v.clone()
    kc[1, 97:] = float("nan")   # stale cache slots past the valid length must be ignored
    vc[1, 97:] = float("nan")
    qd = torch.stack([q[b, int(lengths[b]) - 1] for b in range(B)])
    out = infllmv2_decode(qd, kc, vc, k1c, k2c, lengths.to(torch.int32), SMALL)
    for b in range(B):
        L = int(lengths[b])
        full = infllmv2_attention(q[b:b + 1, :L], k[b:b + 1, :L], v[b:b + 1, :L], SMALL)
        torch.testing.assert_close(out[b], full[0, -1])
    buf = torch.empty_like(qd)
    assert infllmv2_decode(qd, kc, vc, k1c, k2c, lengths, SMALL, out=buf) is buf
    torch.testing.assert_close(buf, out)


def test_decode_with_several_queries_per_row_equals_one_query_per_row():
    # A verify step: T consecutive queries of each cache row; query j sees the row's keys up to its own position.
    B, S, Hkv, G, D, T = 2, 160, 2, 2, 8, 5
    q, k, v = _qkv(B, S, Hkv, G, D, seed=29)
    ends = [150, 97]                                  # keys after the T tokens
    n1, n2 = compressed_lengths(S, SMALL)
    k1c = torch.zeros(B, n1, Hkv, D, dtype=q.dtype)
    k2c = torch.zeros(B, n2, Hkv, D, dtype=q.dtype)
    update_compressed_keys(k, k1c, k2c, torch.tensor(ends), SMALL, new_tokens=S)
    qs = torch.stack([q[b, e - T:e] for b, e in enumerate(ends)]).reshape(B * T, G * Hkv, D)
    seqlens = torch.tensor([e - T + j + 1 for e in ends for j in range(T)], dtype=torch.int32)
    got = infllmv2_decode(qs, k, v, k1c, k2c, seqlens, SMALL, queries_per_row=T)
    for b, e in enumerate(ends):
        full = infllmv2_attention(q[b:b + 1, :e], k[b:b + 1, :e], v[b:b + 1, :e], SMALL)
        torch.testing.assert_close(got[b * T:(b + 1) * T], full[0, e - T:e])
    with pytest.raises(ValueError, match="queries_per_row=3"):
        infllmv2_decode(qs, k, v, k1c, k2c, seqlens, SMALL, queries_per_row=3)


def test_reference_gradients():
    """Autograd of the reference equals autograd of the naive masked definition; plus a fast gradcheck."""
    q, k, v = _qkv(1, 90, 2, 2, 4, seed=23, Tq=20)
    idx = select_blocks(q, compress_keys(k, 8, 4), compress_keys(k, 32, 16), SMALL, q_offset=70)
    grads = []
    for fn in (lambda a, b, c: block_sparse_attention(a, b, c, idx, SMALL, q_offset=70, scale=0.7),
               lambda a, b, c: naive_masked_attention(a, b, c, idx, 16, 70, 0.7)):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads.append([t.grad for t in leaves])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want)
    small = [t.requires_grad_() for t in _qkv(1, 70, 1, 2, 4, seed=24, Tq=3)]
    idx1 = select_blocks(small[0].detach(), compress_keys(small[1].detach(), 8, 4),
                         compress_keys(small[1].detach(), 32, 16), SMALL, q_offset=67)
    assert torch.autograd.gradcheck(lambda a, b, c: block_sparse_attention(a, b, c, idx1, SMALL, q_offset=67),
                                    small, eps=1e-6, atol=1e-6, fast_mode=True)


def test_no_quadratic_temporaries(monkeypatch):
    """With a small chunk budget, results stay identical (the chunked path is exercised)."""
    q, k, v = _qkv(1, 150, 2, 2, 8, seed=29)
    full = infllmv2_attention(q, k, v, SMALL)
    monkeypatch.setattr(ref, "_CHUNK_ELEMENTS", 512)
    torch.testing.assert_close(infllmv2_attention(q, k, v, SMALL), full)


def test_inference_is_query_chunked_without_concatenation(monkeypatch):
    """No-grad forward: selection and attention see at most _NO_GRAD_QUERY_CHUNK queries at a time (block indices
    O(chunk * k), not O(N * k)) and the pieces land in one preallocated output, equal to the unchunked result."""
    import sala.ops.infllmv2.attention as mod

    q, k, v = _qkv(1, 200, 2, 2, 8, seed=31)
    with torch.no_grad():
        full = infllmv2_attention(q, k, v, SMALL)
    seen = []
    real_select = mod.select_blocks

    def spy_select(qc, *args, **kwargs):
        out = real_select(qc, *args, **kwargs)
        seen.append(tuple(out.shape))
        return out

    monkeypatch.setattr(mod, "select_blocks", spy_select)
    monkeypatch.setattr(mod, "_NO_GRAD_QUERY_CHUNK", 40)
    real_cat = torch.cat

    def guarded_cat(*args, **kwargs):
        if sys._getframe(1).f_code.co_filename == mod.__file__:
            pytest.fail("the inference path of infllmv2_attention concatenated its output")
        return real_cat(*args, **kwargs)

    monkeypatch.setattr(torch, "cat", guarded_cat)
    with torch.no_grad():
        out = infllmv2_attention(q, k, v, SMALL)
    monkeypatch.undo()
    assert [s[2] for s in seen] == [40, 40, 40, 16]        # 136 sparse queries (positions 64..199)
    torch.testing.assert_close(out, full)


# ------------------------------------------------------------------------------------------- tie rule
# Ties at the top-k cut-off go to the lowest block index on every path (docs/sparse.md, "Tie rule").
TIES = SparseParams(block_size=16, kernel_size=8, kernel_stride=4, topk=3, init_blocks=1, window_size=32)


def tie_case(kind: str, T: int = 200, D: int = 16):
    """q [1, T, 4, D], k [1, T, 2, D] whose pooled block scores tie exactly at the cut-off of TIES (one free slot
    beside the init block, the local band and the own block). "flat": k = 0, so every K1 window and every block
    scores the same. "shared": k = 0 except the keys of K1 window 4*5 + 3 = 23, the one window that blocks 5 and
    6 share (halo), so those two blocks tie above all others. Returns (q, k, v, the expected free block)."""
    q = torch.ones(1, T, 4, D)
    k = torch.zeros(1, T, 2, D)
    if kind == "shared":
        k[:, 23 * 4:23 * 4 + 8] = 1.0
    v = torch.randn(1, T, 2, D, generator=torch.Generator().manual_seed(3))
    return q, k, v, {"flat": 1, "shared": 5}[kind]


def expected_tie_indices(T: int, q_offset: int, free: int) -> torch.Tensor:
    """Blocks [B=1, Hkv=2, Tq, total_blocks] of the tie cases: init block 0, the free block when it is not forced, the
    local band and the own block, ascending, -1 padded."""
    rows = []
    for p in range(q_offset, T):
        qb = p // TIES.block_size
        forced = {0, *range(max(qb - TIES.local_blocks, 0), qb + 1)}
        candidates = [b for b in range(qb + 1) if b not in forced]
        chosen = sorted(forced | ({free} if free in candidates else set(candidates[:1])))
        rows.append(chosen + [-1] * (TIES.total_blocks - len(chosen)))
    return torch.tensor(rows, dtype=torch.int32)[None, None].expand(1, 2, -1, -1)


def test_topk_ties_go_to_the_lowest_block_index(monkeypatch):
    x = torch.tensor([[5.0, 3, 3, 3, 1], [1, 1, 1, 1, 1], [2, -math.inf, -math.inf, -math.inf, -math.inf],
                      [math.inf, 0, math.inf, 0, 0], [0, 7, 0, 7, 7]])
    assert ref.topk_block_indices(x, 2).tolist() == [[0, 1], [0, 1], [0, -1], [0, 2], [1, 3]]
    assert ref.topk_block_indices(x, 3).tolist() == [[0, 1, 2], [0, 1, 2], [0, -1, -1], [0, 1, 2], [1, 3, 4]]
    assert ref.topk_block_indices(x[:, :2], 3).tolist() == [[0, 1, -1], [0, 1, -1], [0, -1, -1], [0, 1, -1],
                                                           [0, 1, -1]]
    # many rows, random ties: the result is "all above the K-th value + the lowest-index ties"
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (64, 40), generator=g).float()
    got = ref.topk_block_indices(y, 7)
    for row, idx in zip(y, got):
        cut = row.sort(descending=True).values[6]
        want = [i for i in range(40) if row[i] > cut]
        want += [i for i in range(40) if row[i] == cut][:7 - len(want)]
        assert idx.tolist() == sorted(want)
    monkeypatch.setattr(ref, "_TOPK_CHUNK_ELEMENTS", 100)          # rows in chunks of 2: the same result
    assert torch.equal(ref.topk_block_indices(y.view(8, 8, 40), 7), got.view(8, 8, 7))


@pytest.mark.parametrize("kind", ["flat", "shared"])
def test_selection_ties_go_to_the_lowest_block_index(kind):
    """Constructed exact ties in stage 1 (all windows equal; two adjacent blocks sharing one K1 window maximum):
    prefill selection and decode selection of the reference keep the lowest block index."""
    from sala.ops.infllmv2.decode import decode_select_blocks

    q, k, _, free = tie_case(kind)
    k1, k2 = compress_keys(k, 8, 4), compress_keys(k, 32, 16)
    pooled = ref.pooled_block_scores_ref(q[:, 150:151].double(), k1.double(), k2.double(), torch.tensor([[150]]),
                                         TIES, 0.25, 10)
    free_scores = pooled[0, 0, 0, 1:7]                      # query block 9: blocks 1..6 are not forced
    assert free_scores.isfinite().all() and (free_scores == free_scores.max()).sum() == (6 if kind == "flat" else 2)
    idx = select_blocks(q[:, 64:], k1, k2, TIES, q_offset=64, scale=0.25)
    assert torch.equal(idx, expected_tie_indices(200, 64, free))
    n1, n2 = compressed_lengths(256, TIES)
    k1c, k2c = torch.zeros(2, n1, 2, 16), torch.zeros(2, n2, 2, 16)
    kc = torch.cat([k, k], 0)
    kc = torch.cat([kc, torch.zeros(2, 56, 2, 16)], 1)
    lengths = torch.tensor([200, 150])
    update_compressed_keys(kc, k1c, k2c, lengths, TIES, new_tokens=200)
    dec = decode_select_blocks(torch.cat([q[:, 199], q[:, 149]], 0), k1c, k2c, lengths, TIES, 16, scale=0.25)
    want = expected_tie_indices(200, 64, free)[0, :, [199 - 64, 149 - 64]]      # [Hkv, 2 tokens, K]
    assert torch.equal(dec[:, :, 0], want.permute(1, 0, 2))


def test_kernel_config_is_validated():
    from sala.ops.infllmv2 import SparseKernelConfig

    assert SparseKernelConfig().select_chunk_bytes == 256 << 20
    with pytest.raises(ValueError, match="SparseKernelConfig.select_rows must be a power of two"):
        SparseKernelConfig(select_rows=100)
    with pytest.raises(ValueError, match="SparseKernelConfig.fwd_warps must be a positive int"):
        SparseKernelConfig(fwd_warps=0)
    with pytest.raises(TypeError, match="kernel_config must be a SparseKernelConfig"):
        infllmv2_attention(*_qkv(1, 80, 2, 2, 8)[:3], SMALL, kernel_config={"select_rows": 64})


# ------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_clear_errors():
    q, k, v = _qkv(1, 80, 2, 2, 8)
    with pytest.raises(ValueError, match="query heads 3"):
        infllmv2_attention(q[:, :, :3], k, v, SMALL)
    with pytest.raises(ValueError, match="key length 40"):
        infllmv2_attention(q, k[:, :40], v[:, :40], SMALL)
    with pytest.raises(ValueError, match="block_idx"):
        block_sparse_attention(q, k, v, torch.zeros(1, 2, 5, 4, dtype=torch.int32), SMALL, q_offset=0)
    with pytest.raises(ValueError, match="cu_seqlens"):
        infllmv2_attention(q, k, v, SMALL, cu_seqlens=torch.tensor([0, 50, 60]))
    with pytest.raises(ValueError, match="cache_seqlens"):
        infllmv2_decode(q[:, 0], k, v, k[:, :5], k[:, :2], torch.tensor([3, 4]), SMALL)


# ------------------------------------------------------------------------------- fused varlen: dense-prefix adapter
def _fake_varlen_attn(causal_kw: str, with_scale: bool, gqa: bool, causal: bool = True):
    """A stand-in for torch.nn.attention.varlen.varlen_attn with one of its signatures (reference math)."""
    import torch.nn.functional as F

    def attend(q, k, v, cu, scale):
        outs = []
        for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
            qq, kk, vv = (t[s:e].transpose(0, 1) for t in (q, k, v))
            if kk.shape[0] != qq.shape[0]:
                if not gqa:
                    raise RuntimeError("head counts differ")
                kk, vv = (t.repeat_interleave(qq.shape[0] // t.shape[0], 0) for t in (kk, vv))
            outs.append(F.scaled_dot_product_attention(qq, kk, vv, is_causal=causal, scale=scale).transpose(0, 1))
        return torch.cat(outs)

    if causal_kw == "window_size" and with_scale and gqa:
        def fake(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                 enable_gqa=False):
            assert window_size == (-1, 0) and (enable_gqa or key.shape[1] == query.shape[1])
            return attend(query, key, value, cu_seq_q, scale)
    elif causal_kw == "window_size":
        def fake(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                 window_size=(-1, -1)):
            assert window_size == (-1, 0)
            return attend(query, key, value, cu_seq_q, scale)
    else:
        def fake(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False):
            assert is_causal                     # (the causal=False stand-in ignores it: a broken build)
            return attend(query, key, value, cu_seq_q, None)
    return fake


@pytest.mark.parametrize("sig", ["new", "mid", "old", "noncausal"])
def test_fused_varlen_flash_adapter_and_probe(monkeypatch, sig):
    """The FlashAttention-varlen adapter handles both torch signatures (scale / GQA folded in where absent), and
    the probe accepts it only when it matches masked SDPA (a non-causal build is rejected)."""
    import torch.nn.attention.varlen as tv

    from sala.ops import dense as iv

    fake = {"new": _fake_varlen_attn("window_size", True, True), "mid": _fake_varlen_attn("window_size", True, False),
            "old": _fake_varlen_attn("is_causal", False, False),
            "noncausal": _fake_varlen_attn("is_causal", False, False, causal=False)}[sig]
    monkeypatch.setattr(tv, "varlen_attn", fake)
    fn = iv._flash_varlen()
    assert fn is not None
    assert iv._check_varlen_fn(fn, "cpu", torch.float64, 16) is (sig != "noncausal")


def test_dense_packed_rows_use_the_varlen_fn(monkeypatch):
    """dense_causal_attention hands packed rows to the (probed) varlen fn where one exists, with the same result
    and gradients as per-document SDPA."""
    import torch.nn.attention.varlen as tv

    from sala.ops import dense as D

    monkeypatch.setattr(tv, "varlen_attn", _fake_varlen_attn("window_size", True, True))
    fn, calls = D._flash_varlen(), []
    monkeypatch.setattr(D, "flash_varlen_fn", lambda q: (lambda *a: calls.append(a[4]) or fn(*a)))
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 50, h, 16, generator=g, dtype=torch.float64, requires_grad=True) for h in (4, 2, 2))
    cu = torch.tensor([0, 7, 30, 50])
    got = D.dense_causal_attention(q, k, v, scale=0.2, cu_seqlens=cu)
    want = torch.cat([D._sdpa(q[:, a:b], k[:, a:b], v[:, a:b], 0.2) for a, b in ((0, 7), (7, 30), (30, 50))], 1)
    assert calls == [[0, 7, 30, 50]]
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got.sum(), (q, k, v)), torch.autograd.grad(want.sum(), (q, k, v))):
        torch.testing.assert_close(a, b)


def test_masked_reference_equals_gather_reference(monkeypatch):
    """The reference's two forms (one masked SDPA for short contexts, per-query gather otherwise) agree."""
    import sala.ops.infllmv2 as I
    import sala.ops.infllmv2.sparse_attention as sparse_attention
    p = SparseParams(block_size=16, kernel_size=8, kernel_stride=4, topk=2, init_blocks=1, window_size=32)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 200, h, 16, generator=g, dtype=torch.float64, requires_grad=True) for h in (4, 2, 2))
    qs = q[:, 100:]
    idx = I.select_blocks(qs.detach(), I.compress_keys(k.detach(), 8, 4), I.compress_keys(k.detach(), 32, 16), p,
                          q_offset=100)
    monkeypatch.setenv("SALA_KERNELS", "reference")
    masked = I.block_sparse_attention(qs, k, v, idx, p, q_offset=100)
    monkeypatch.setattr(sparse_attention, "_MASKED_REF_MAX_ELEMENTS", 0)
    gathered = I.block_sparse_attention(qs, k, v, idx, p, q_offset=100)
    torch.testing.assert_close(masked, gathered, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(masked.sum(), (q, k, v)), torch.autograd.grad(gathered.sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("lens", [[70, 20, 0, 99, 5], [30, 64, 1], [150]])
def test_varlen_dense_prefixes_in_one_call_keep_values_and_gradients(lens):
    """Packed rows (documents longer and shorter than the dense positions, an empty one, all short, one long):
    output and gradients equal separate per-document calls."""
    T = sum(lens)
    q, k, v = (t.requires_grad_() for t in _qkv(1, T, 2, 2, 8, seed=23))
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    out = infllmv2_attention(q, k, v, SMALL, cu_seqlens=cu)
    want = torch.cat([infllmv2_attention(q[:, s:e], k[:, s:e], v[:, s:e], SMALL)
                      for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()) if e > s], 1)
    torch.testing.assert_close(out, want)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(want, (q, k, v), g)):
        torch.testing.assert_close(a, b)
