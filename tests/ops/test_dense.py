"""Dense causal attention (SDPA) against a naive float64 definition."""
from __future__ import annotations

import math

import pytest
import torch

from sala.ops.dense import dense_causal_attention


def naive(q, k, v, scale):
    Tq, Tk, G = q.shape[1], k.shape[1], q.shape[2] // k.shape[2]
    kk, vv = k.repeat_interleave(G, 2), v.repeat_interleave(G, 2)
    s = torch.einsum("bthd,bshd->bhts", q, kk) * scale
    mask = torch.arange(Tk)[None, :] <= torch.arange(Tq)[:, None] + (Tk - Tq)
    return torch.einsum("bhts,bshd->bthd", torch.softmax(s.masked_fill(~mask, -math.inf), -1), vv)


def _qkv(B, Tq, Tk, Hq, Hkv, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Tq, Hq, D, generator=g, dtype=torch.float64),
            torch.randn(B, Tk, Hkv, D, generator=g, dtype=torch.float64),
            torch.randn(B, Tk, Hkv, D, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("Tq, Tk, Hq, Hkv", [(33, 33, 4, 2), (7, 40, 4, 1), (1, 25, 2, 2), (16, 16, 6, 3)])
def test_dense_matches_naive(Tq, Tk, Hq, Hkv):
    q, k, v = _qkv(2, Tq, Tk, Hq, Hkv, 8)
    torch.testing.assert_close(dense_causal_attention(q, k, v), naive(q, k, v, 8 ** -0.5))
    torch.testing.assert_close(dense_causal_attention(q, k, v, scale=0.1), naive(q, k, v, 0.1))


def test_dense_varlen_equals_separate_calls():
    q, k, v = _qkv(1, 50, 50, 4, 2, 8, seed=1)
    cu = torch.tensor([0, 10, 10, 31, 50])
    out = dense_causal_attention(q, k, v, cu_seqlens=cu)
    for s, e in ((0, 10), (10, 31), (31, 50)):
        torch.testing.assert_close(out[:, s:e], dense_causal_attention(q[:, s:e], k[:, s:e], v[:, s:e]))


def test_dense_bad_inputs():
    q, k, v = _qkv(1, 10, 10, 4, 2, 8)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        dense_causal_attention(q[:, :, :3], k, v)
    with pytest.raises(ValueError, match="key length 5"):
        dense_causal_attention(q, k[:, :5], v[:, :5])
    with pytest.raises(ValueError, match="cu_seqlens"):
        dense_causal_attention(q, k, v, cu_seqlens=torch.tensor([0, 4]))
