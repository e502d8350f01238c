"""Lightning attention references: chunked vs recurrent vs a naive float64 O(T^2) definition, states,
varlen, tails, decode step, gradients, numerics, input validation and kernel dispatch (CPU, fast)."""
from __future__ import annotations

import pytest
import torch

from sala.ops.lightning import lightning_attention, lightning_decode_step, lightning_state_after
from sala.ops.lightning_reference import (
    lightning_attention_chunked,
    lightning_attention_recurrent,
    lightning_decode_step_reference,
)
from sala.ops.slopes import lightning_log_decay


def naive_lightning(q, k, v, log_decay, scale=None, initial_state=None):
    """o_t = scale * (sum_{s<=t} gamma^(t-s) (q_t.k_s) v_s + gamma^(t+1) q_t S0), in float64, O(T^2)."""
    q, k, v = q.double(), k.double(), v.double()
    b, t, h, dk = q.shape
    scale = dk ** -0.5 if scale is None else scale
    pos = torch.arange(t, dtype=torch.float64)
    gap = pos[:, None] - pos[None, :]
    ld = log_decay.double()[:, None, None]
    decay = torch.where(gap >= 0, torch.exp(ld * gap.clamp(min=0)), torch.zeros(()))  # [H, T, T]
    scores = torch.einsum("bthd,bshd->bhts", q, k) * decay
    o = torch.einsum("bhts,bshe->bthe", scores, v)
    final = torch.einsum("hs,bshd,bshe->bhde", torch.exp(ld[:, :, 0] * (t - 1 - pos)), k, v)
    if initial_state is not None:
        s0 = initial_state.double()
        o = o + torch.einsum("bthd,bhde,ht->bthe", q, s0, torch.exp(ld[:, :, 0] * (pos + 1)))
        final = final + torch.exp(ld[:, 0, 0] * t)[None, :, None, None] * s0
    return scale * o, final


def rand_inputs(b, t, h, dk, dv, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, h, dk, generator=g).to(dtype)
    k = torch.randn(b, t, h, dk, generator=g).to(dtype)
    v = torch.randn(b, t, h, dv, generator=g).to(dtype)
    s0 = torch.randn(b, h, dk, dv, generator=g)
    return q, k, v, s0


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


@pytest.mark.parametrize("t", [1, 63, 64, 65, 130])
@pytest.mark.parametrize("chunk", [16, 64, 128])
def test_chunked_and_recurrent_match_naive(t, chunk):
    h = 4
    q, k, v, s0 = rand_inputs(2, t, h, 16, 8, seed=t)
    ld = lightning_log_decay(h)
    o_ref, f_ref = naive_lightning(q, k, v, ld, initial_state=s0)
    o_c, f_c = lightning_attention_chunked(q, k, v, ld, initial_state=s0, output_final_state=True, chunk_size=chunk)
    o_r, f_r = lightning_attention_recurrent(q, k, v, ld, initial_state=s0, output_final_state=True)
    for o, f in ((o_c, f_c), (o_r, f_r)):
        assert o.dtype == q.dtype and o.shape == (2, t, h, 8)
        assert f.dtype == torch.float32 and f.shape == (2, h, 16, 8)
        assert rel_err(o, o_ref) < 1e-5
        assert rel_err(f, f_ref) < 1e-5


def test_scale_and_no_final_state():
    q, k, v, _ = rand_inputs(1, 20, 2, 8, 8)
    ld = lightning_log_decay(2)
    o, f = lightning_attention(q, k, v, ld, scale=0.3)
    assert f is None
    assert rel_err(o, naive_lightning(q, k, v, ld, scale=0.3)[0]) < 1e-5


def test_state_carry_equals_one_call():
    q, k, v, s0 = rand_inputs(2, 100, 3, 16, 16, seed=1)
    ld = lightning_log_decay(3)
    o_full, f_full = lightning_attention(q, k, v, ld, initial_state=s0, output_final_state=True)
    o1, f1 = lightning_attention(q[:, :37], k[:, :37], v[:, :37], ld, initial_state=s0, output_final_state=True)
    o2, f2 = lightning_attention(q[:, 37:], k[:, 37:], v[:, 37:], ld, initial_state=f1, output_final_state=True)
    assert rel_err(torch.cat([o1, o2], 1), o_full) < 1e-5
    assert rel_err(f2, f_full) < 1e-5


def test_varlen_equals_separate_calls():
    lens = [5, 0, 64, 70, 1]
    h = 2
    q, k, v, _ = rand_inputs(1, sum(lens), h, 16, 32, seed=2)
    s0 = torch.randn(len(lens), h, 16, 32)
    ld = lightning_log_decay(h)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    o, f = lightning_attention(q, k, v, ld, initial_state=s0, output_final_state=True, cu_seqlens=cu)
    for n in range(len(lens)):
        a, b = int(cu[n]), int(cu[n + 1])
        o_n, f_n = naive_lightning(q[:, a:b], k[:, a:b], v[:, a:b], ld, initial_state=s0[n:n + 1])
        if b > a:
            assert rel_err(o[:, a:b], o_n) < 1e-5
        assert rel_err(f[n:n + 1], f_n) < 1e-5
    o_r, f_r = lightning_attention_recurrent(q, k, v, ld, initial_state=s0, output_final_state=True, cu_seqlens=cu)
    assert rel_err(o_r, o) < 1e-5 and rel_err(f_r, f) < 1e-5


def test_decode_steps_equal_chunked():
    b, t, h, d = 3, 70, 4, 16
    q, k, v, s0 = rand_inputs(b, t, h, d, d, seed=3)
    ld = lightning_log_decay(h)
    o_c, f_c = lightning_attention(q, k, v, ld, initial_state=s0, output_final_state=True)
    state = s0.clone()
    outs = [lightning_decode_step(q[:, i], k[:, i], v[:, i], ld, state) for i in range(t)]
    assert rel_err(torch.stack(outs, 1), o_c) < 1e-5
    assert rel_err(state, f_c) < 1e-5
    out = torch.full((b, h, d), float("nan"))
    ret = lightning_decode_step(q[:, 0], k[:, 0], v[:, 0], ld, state, out=out)
    assert ret is out and torch.isfinite(out).all()


def test_multi_token_decode_equals_one_token_calls():
    """[B, T, H, D] inputs: the same outputs and final state as T one-token calls, bit for bit, also for strided
    views (a fused projection's slices) and into an `out` buffer."""
    b, t, h, d = 2, 5, 3, 8
    g = torch.Generator().manual_seed(11)
    qkv = torch.randn(b, t, h, 3 * d, generator=g)
    q, k, v = (qkv[..., i * d:(i + 1) * d] for i in range(3))
    ld = lightning_log_decay(h)
    s0 = torch.randn(b, h, d, d, generator=g)
    st_one, st_all = s0.clone(), s0.clone()
    one = torch.stack([lightning_decode_step(q[:, i], k[:, i], v[:, i], ld, st_one) for i in range(t)], dim=1)
    out = torch.full((b, t, h, d), float("nan"))
    got = lightning_decode_step(q, k, v, ld, st_all, out=out)
    assert got is out and torch.equal(out, one) and torch.equal(st_all, st_one)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_state_after_a_prefix_equals_that_many_decode_steps(dtype, tol):
    # Each row keeps its own number of the T tokens: 0 (the state before), some, all.
    torch.manual_seed(3)
    B, T, H, D = 4, 6, 3, 8
    k, v = torch.randn(B, T, H, D, dtype=dtype), torch.randn(B, T, H, D, dtype=dtype)
    log_decay = lightning_log_decay(H).to(dtype)
    s0 = torch.randn(B, H, D, D, dtype=dtype)
    keep = torch.tensor([0, 2, 5, 6])
    got = lightning_state_after(s0, k, v, log_decay, keep)
    for b in range(B):
        st = s0[b:b + 1].clone()
        for j in range(int(keep[b])):
            lightning_decode_step_reference(k[b:b + 1, j], k[b:b + 1, j], v[b:b + 1, j], log_decay, st)
        torch.testing.assert_close(got[b], st[0], atol=tol, rtol=tol)
    assert torch.equal(s0, lightning_state_after(s0, k, v, log_decay, torch.zeros(B, dtype=torch.long)))
    with pytest.raises(ValueError, match="keep"):
        lightning_state_after(s0, k, v, log_decay, keep[:2])


def test_decode_step_bf16_output_dtype_and_fp32_state():
    q, k, v, s0 = rand_inputs(2, 1, 2, 8, 8, dtype=torch.bfloat16)
    ld = lightning_log_decay(2)
    state = s0.clone()
    o = lightning_decode_step_reference(q[:, 0], k[:, 0], v[:, 0], ld, state)
    assert o.dtype == torch.bfloat16 and state.dtype == torch.float32
    o_ref, f_ref = naive_lightning(q.float(), k.float(), v.float(), ld, initial_state=s0)
    assert rel_err(o, o_ref[:, 0]) < 1e-2 and rel_err(state, f_ref) < 1e-6


def test_gradcheck_chunked_reference():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 11, 2, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    s0 = torch.randn(1, 2, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    ld = lightning_log_decay(2).double()

    def fn(q, k, v, s0):
        o, f = lightning_attention_chunked(q, k, v, ld, initial_state=s0, output_final_state=True, chunk_size=4)
        return o, f

    assert torch.autograd.gradcheck(fn, (q, k, v, s0))


def test_strong_decay_long_chunks_stay_finite():
    # gamma^-n would overflow fp32 for n >= ~105 at gamma = 0.43; the log-space form never forms it
    h = 32
    q, k, v, s0 = rand_inputs(1, 300, h, 8, 8, seed=5)
    ld = lightning_log_decay(h)
    assert ld[0].item() < -0.8
    o_c, f_c = lightning_attention_chunked(q, k, v, ld, initial_state=s0, output_final_state=True, chunk_size=256)
    assert torch.isfinite(o_c).all() and torch.isfinite(f_c).all()
    o_n, f_n = naive_lightning(q, k, v, ld, initial_state=s0)
    assert rel_err(o_c, o_n) < 1e-5 and rel_err(f_c, f_n) < 1e-5


def test_bf16_inputs_fp32_accumulation():
    q, k, v, s0 = rand_inputs(1, 90, 2, 16, 16, dtype=torch.bfloat16, seed=6)
    ld = lightning_log_decay(2)
    o, f = lightning_attention(q, k, v, ld, initial_state=s0, output_final_state=True)
    assert o.dtype == torch.bfloat16 and f.dtype == torch.float32
    o_n, f_n = naive_lightning(q.float(), k.float(), v.float(), ld, initial_state=s0)
    assert rel_err(o, o_n) < 1e-2 and rel_err(f, f_n) < 1e-5


# ----------------------------------------------------------------------------------------- validation

def _ok():
    q, k, v, s0 = rand_inputs(2, 5, 2, 8, 8)
    return q, k, v, lightning_log_decay(2), s0


@pytest.mark.parametrize("mutate, match", [
    (lambda a: {**a, "q": a["q"][0]}, r"q must be \[B, T, H, D\]"),
    (lambda a: {**a, "k": a["k"][:, :4]}, r"k shape \(2, 4, 2, 8\) must equal q shape \(2, 5, 2, 8\)"),
    (lambda a: {**a, "v": a["v"][:, :, :1]}, r"v shape"),
    (lambda a: {**a, "k": a["k"].double()}, r"share one dtype"),
    (lambda a: {**a, "q": a["q"].int()}, r"q must be float16"),
    (lambda a: {**a, "log_decay": torch.zeros(3)}, r"log_decay must have shape \(2,\)"),
    (lambda a: {**a, "initial_state": torch.zeros(2, 2, 8, 4)}, r"initial_state must have shape \(2, 2, 8, 8\)"),
    (lambda a: {**a, "initial_state": torch.zeros(2, 2, 8, 8, dtype=torch.bfloat16)}, r"initial_state must be float32"),
    (lambda a: {**a, "cu_seqlens": torch.tensor([0, 5], dtype=torch.int32)}, r"batch size must be 1"),
])
def test_bad_inputs_raise_clear_errors(mutate, match):
    q, k, v, ld, s0 = _ok()
    args = mutate(dict(q=q, k=k, v=v, log_decay=ld, initial_state=None))
    with pytest.raises((ValueError, TypeError), match=match):
        lightning_attention(**args)


@pytest.mark.parametrize("cu, match", [
    ([1, 5], r"start at 0 and end at T=5"),
    ([0, 4], r"start at 0 and end at T=5"),
    ([0, 3, 2, 5], r"non-decreasing"),
])
def test_bad_cu_seqlens(cu, match):
    q, k, v, ld, _ = _ok()
    with pytest.raises(ValueError, match=match):
        lightning_attention(q[:1], k[:1], v[:1], ld, cu_seqlens=torch.tensor(cu))
    with pytest.raises(ValueError, match="int32 or int64"):
        lightning_attention(q[:1], k[:1], v[:1], ld, cu_seqlens=torch.tensor([0.0, 5.0]))
    with pytest.raises(ValueError, match=r"initial_state must have shape \(2, 2, 8, 8\)"):
        lightning_attention(q[:1], k[:1], v[:1], ld, cu_seqlens=torch.tensor([0, 2, 5]),
                            initial_state=torch.zeros(1, 2, 8, 8))


def test_decode_bad_inputs():
    q, k, v, ld, s0 = _ok()
    with pytest.raises(ValueError, match=r"state must have shape \(2, 2, 8, 8\)"):
        lightning_decode_step(q[:, 0], k[:, 0], v[:, 0], ld, s0[:1])
    with pytest.raises(ValueError, match=r"q must be \[B, H, D\] or \[B, T, H, D\]"):
        lightning_decode_step(q[0, 0, 0], k[0, 0, 0], v[0, 0, 0], ld, s0)
    with pytest.raises(ValueError, match=r"at least one token per row, got q \(2, 0, 2, 8\)"):
        lightning_decode_step(q[:, :0], k[:, :0], v[:, :0], ld, s0)
    with pytest.raises(ValueError, match=r"out must be a torch.float32 tensor of shape \(2, 5, 2, 8\)"):
        lightning_decode_step(q, k, v, ld, s0, out=torch.empty(2, 2, 8))
    with pytest.raises(ValueError, match=r"out must be"):
        lightning_decode_step(q[:, 0], k[:, 0], v[:, 0], ld, s0, out=torch.empty(2, 2, 4))
    q1, k1, v1 = q[:, 0], k[:, 0], v[:, 0]
    with pytest.raises(ValueError, match=r"out must be a torch.float32 tensor .* got torch.bfloat16"):
        lightning_decode_step(q1, k1, v1, ld, s0, out=torch.empty(2, 2, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"out must be .* got list"):
        lightning_decode_step(q1, k1, v1, ld, s0, out=[0.0])
    with pytest.raises(ValueError, match=r"log_decay must have shape \(2,\)"):
        lightning_decode_step(q1, k1, v1, ld[:1], s0)
    with pytest.raises(ValueError, match=r"log_decay must have shape \(2,\) .* got float"):
        lightning_decode_step(q1, k1, v1, -0.5, s0)
    with pytest.raises(ValueError, match=r"q, k, v must share one dtype"):
        lightning_decode_step(q1, k1.double(), v1, ld, s0)
    with pytest.raises(ValueError, match=r"state must be float32, got torch.float16"):
        lightning_decode_step(q1, k1, v1, ld, s0.half())
    with pytest.raises(TypeError, match=r"k must be a torch.Tensor, got ndarray"):
        lightning_decode_step(q1, k1.numpy(), v1, ld, s0)


# ----------------------------------------------------------------------------------------- dispatch

def test_dispatch_env(monkeypatch):
    q, k, v, ld, s0 = _ok()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("SALA_KERNELS", "reference")
    o_ref, _ = lightning_attention(q, k, v, ld)
    assert rel_err(o_ref, naive_lightning(q, k, v, ld)[0]) < 1e-5
    monkeypatch.setenv("SALA_KERNELS", "auto")  # CPU tensors -> reference
    o_auto, _ = lightning_attention(q, k, v, ld)
    assert torch.equal(o_auto, o_ref)
    monkeypatch.setenv("SALA_KERNELS", "bogus")
    with pytest.raises(ValueError, match="SALA_KERNELS='bogus'"):
        lightning_attention(q, k, v, ld)
    monkeypatch.setenv("SALA_KERNELS", "triton")  # CPU without the interpreter: a clear error
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        lightning_attention(q, k, v, ld)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        lightning_decode_step(q[:, 0], k[:, 0], v[:, 0], ld, s0)
