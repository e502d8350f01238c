"""Triton lightning kernels vs the PyTorch reference.

On a CPU-only machine the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 for the
session); on a CUDA machine the same tests run the compiled kernels on the GPU. The `triton_module` fixture sets
SALA_KERNELS=triton and pre-fills every kernel output buffer with NaN, so any element a kernel forgets to write
shows up. Launch settings are frozen `LightningConfig`s passed to each call.
"""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from sala.ops import triton_launch
from sala.ops.lightning import lightning_attention, lightning_decode_step
from sala.ops.lightning_plan import LightningConfig
from sala.ops.lightning_reference import lightning_attention_chunked, lightning_decode_step_reference
from sala.ops.slopes import lightning_log_decay

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


TRITON_MODULE, TRITON_PROBE = "sala.ops.lightning_triton", "_segment_output_kernel"


@pytest.fixture(scope="module")
def lt(triton_module):
    """sala.ops.lightning_triton, kernels on (the interpreter on CPU), NaN-poisoned buffers (tests/conftest.py)."""
    return triton_module


@pytest.fixture
def config(lt):
    """The tests' base launch config: 64-token chunks (more chunk boundaries at small T); tests shrink
    chunks/segments further (dataclasses.replace) to cover multi-segment scans."""
    return LightningConfig(chunk=64, block_v=64, num_warps=4)


def inputs(b, t, h, dk, dv, dtype, seed=0, n_states=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, h, dk, generator=g)
    k = torch.randn(b, t, h, dk, generator=g)
    v = torch.randn(b, t, h, dv, generator=g)
    s0 = torch.randn(n_states or b, h, dk, dv, generator=g)
    return [x.to(DEVICE, dtype) for x in (q, k, v)] + [s0.to(DEVICE)]


def rel_err(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def reference(q, k, v, ld, **kw):
    """fp32 reference on the same (rounded) inputs."""
    args = [x.detach().float().requires_grad_(x.requires_grad) for x in (q, k, v)]
    return args, lightning_attention_chunked(*args, ld, **kw)


TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype, t, dk, dv, seg, factored", [
    (torch.float32, 1, 16, 16, 0, True), (torch.bfloat16, 63, 32, 32, 0, True),
    (torch.float32, 65, 64, 64, 1, False), (torch.bfloat16, 65, 64, 64, 1, True),
    (torch.float32, 150, 32, 64, 1, True), (torch.bfloat16, 130, 64, 32, 2, False)])
def test_forward_matches_reference(config, dtype, t, dk, dv, seg, factored):
    config = replace(config, chunks_per_segment=seg, intra_factored=factored)
    h = 2
    q, k, v, s0 = inputs(2, t, h, dk, dv, dtype, seed=t)
    ld = lightning_log_decay(h, DEVICE)
    o, f = lightning_attention(q, k, v, ld, initial_state=s0, output_final_state=True, config=config)
    _, (o_ref, f_ref) = reference(q, k, v, ld, initial_state=s0, output_final_state=True)
    assert o.dtype == dtype and o.shape == (2, t, h, dv) and f.dtype == torch.float32
    assert torch.isfinite(o).all() and torch.isfinite(f).all()
    assert rel_err(o, o_ref) < TOL[dtype]
    assert rel_err(f, f_ref) < TOL[dtype]


def test_forward_reads_strided_views_of_a_fused_projection(config):
    """q, k, v as column slices of one [B, T, 3*H*D] projection (how the engine calls it, batch 1): same result
    as contiguous copies, no copy needed."""
    h, d, t = 2, 32, 70
    g = torch.Generator().manual_seed(5)
    proj = torch.randn(1, t, 3 * h * d, generator=g).to(DEVICE, torch.bfloat16)
    q, k, v = (proj[..., i * h * d:(i + 1) * h * d].reshape(1, t, h, d) for i in range(3))
    assert not v.is_contiguous()
    ld = lightning_log_decay(h, DEVICE)
    s0 = torch.randn(1, h, d, d, generator=g).to(DEVICE)
    o, f = lightning_attention(q, k, v, ld, initial_state=s0, output_final_state=True, config=config)
    o2, f2 = lightning_attention(q.contiguous(), k.contiguous(), v.contiguous(), ld, initial_state=s0,
                                 output_final_state=True, config=config)
    assert torch.equal(o, o2) and torch.equal(f, f2)
    _, (o_ref, _) = reference(q, k, v, ld, initial_state=s0, output_final_state=True)
    assert rel_err(o, o_ref) < TOL[torch.bfloat16]


def test_forward_without_states_and_custom_scale(config):
    q, k, v, _ = inputs(1, 40, 2, 32, 32, torch.float32, seed=1)
    ld = lightning_log_decay(2, DEVICE)
    o, f = lightning_attention(q, k, v, ld, scale=0.25, config=config)
    assert f is None
    assert rel_err(o, reference(q, k, v, ld, scale=0.25)[1][0]) < 1e-4


@pytest.mark.parametrize("chunk, seg", [(64, 0), (16, 1), (16, 3)])
def test_varlen_with_initial_states(config, chunk, seg):
    config = replace(config, chunk=chunk, chunks_per_segment=seg)
    lens = [17, 0, 64, 50, 1]
    h = 2
    q, k, v, s0 = inputs(1, sum(lens), h, 32, 32, torch.float32, seed=2, n_states=len(lens))
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    ld = lightning_log_decay(h, DEVICE)
    o, f = lightning_attention(q, k, v, ld, initial_state=s0, output_final_state=True, cu_seqlens=cu, config=config)
    _, (o_ref, f_ref) = reference(q, k, v, ld, initial_state=s0, output_final_state=True, cu_seqlens=cu)
    assert rel_err(o, o_ref) < 1e-4
    assert rel_err(f, f_ref) < 1e-4
    assert torch.equal(f[1], s0[1])  # the empty sequence hands its initial state through


def backward_case(t, dk, dv, dtype, varlen, seed, grad_seed, h=2):
    """q, k, v, S0 (requiring grad), cu_seqlens (three sequences of 30, 1 and t - 31 tokens, or None: two rows),
    log decays, and random output and final-state gradients."""
    if varlen:
        cu = torch.tensor([0, 30, 31, t], dtype=torch.int32, device=DEVICE)
        q, k, v, s0 = inputs(1, t, h, dk, dv, dtype, seed=seed, n_states=3)
    else:
        cu = None
        q, k, v, s0 = inputs(2, t, h, dk, dv, dtype, seed=seed)
    g = torch.Generator().manual_seed(grad_seed)
    do = torch.randn(q.shape[:-1] + (dv,), generator=g).to(DEVICE, dtype)
    dfin = torch.randn(s0.shape, generator=g).to(DEVICE)
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), s0.requires_grad_()
    return q, k, v, s0, cu, lightning_log_decay(h, DEVICE), do, dfin


def grads_of(q, k, v, s0, cu, ld, do, dfin, config=None):
    """dq, dk, dv, dS0 of <o, do> + <final, dfin> through the kernels with `config`, or, with config None, the
    reference (on fp32 copies of q, k, v)."""
    if config is not None:
        o, f = lightning_attention(q, k, v, ld, initial_state=s0, output_final_state=True, cu_seqlens=cu,
                                   config=config)
        return torch.autograd.grad((o.float() * do.float()).sum() + (f * dfin).sum(), (q, k, v, s0))
    (qr, kr, vr), (o, f) = reference(q, k, v, ld, initial_state=s0, output_final_state=True, cu_seqlens=cu)
    return torch.autograd.grad((o * do.float()).sum() + (f * dfin).sum(), (qr, kr, vr, s0))


@pytest.mark.parametrize("dtype, t, dk, dv, seg, varlen, factored", [
    (torch.float32, 70, 32, 32, 0, False, True), (torch.bfloat16, 70, 32, 32, 0, False, False),
    (torch.float32, 100, 16, 32, 1, False, False), (torch.bfloat16, 100, 32, 16, 1, True, True)])
def test_backward_matches_reference(config, dtype, t, dk, dv, seg, varlen, factored):
    config = replace(config, chunks_per_segment=seg, intra_factored=factored)
    case = backward_case(t, dk, dv, dtype, varlen, seed=3, grad_seed=9)
    grads, grads_ref = grads_of(*case, config=config), grads_of(*case)
    for name, a, b in zip(("dq", "dk", "dv", "dS0"), grads, grads_ref):
        assert a.shape == b.shape, name
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) < TOL[dtype], name


def test_backward_without_initial_state_or_final_grad(config):
    q, k, v, _ = inputs(1, 80, 2, 32, 32, torch.float32, seed=4)
    ld = lightning_log_decay(2, DEVICE)
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    o, _ = lightning_attention(q, k, v, ld, config=config)
    grads = torch.autograd.grad(o.square().sum(), (q, k, v))
    (qr, kr, vr), (o_r, _) = reference(q, k, v, ld)
    grads_ref = torch.autograd.grad(o_r.square().sum(), (qr, kr, vr))
    for a, b in zip(grads, grads_ref):
        assert rel_err(a, b) < 1e-4


@pytest.mark.parametrize("dtype, dk, dv, b", [(torch.float32, 16, 16, 2), (torch.bfloat16, 16, 16, 2),
                                              (torch.float32, 32, 64, 1)])
def test_decode_step_matches_reference_and_chunked(config, dtype, dk, dv, b):
    # (the interpreter runs the decode reduction slowly: keep these shapes small)
    h, steps = 2, 3
    q, k, v, s0 = inputs(b, steps, h, dk, dv, dtype, seed=5)
    ld = lightning_log_decay(h, DEVICE)
    state, state_ref = s0.clone(), s0.clone()
    out = torch.full((b, h, dv), float("nan"), dtype=dtype, device=DEVICE)
    outs = []
    for i in range(steps):
        ret = lightning_decode_step(q[:, i], k[:, i], v[:, i], ld, state, out=out, config=config)
        assert ret is out and torch.isfinite(out).all()
        o_ref = lightning_decode_step_reference(q[:, i], k[:, i], v[:, i], ld, state_ref)
        assert rel_err(out, o_ref) < TOL[dtype]
        outs.append(out.clone())
        out.fill_(float("nan"))
    assert rel_err(state, state_ref) < 1e-5
    _, (o_c, f_c) = reference(q, k, v, ld, initial_state=s0, output_final_state=True)
    assert rel_err(torch.stack(outs, 1), o_c) < TOL[dtype]
    assert rel_err(state, f_c) < 1e-5
    o_alloc = lightning_decode_step(q[:, 0], k[:, 0], v[:, 0], ld, state, config=config)
    assert o_alloc.dtype == dtype and o_alloc.shape == (b, h, dv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multi_token_decode_matches_one_token_calls(config, dtype):
    """T tokens in one launch (the state held in registers between them) = T one-token launches (same fp32
    arithmetic in the same order), for strided views of a fused projection and the reference's outputs."""
    b, t, h, d = 2, 3, 2, 16
    g = torch.Generator().manual_seed(13)
    qkv = torch.randn(b, t, h, 3 * d, generator=g).to(DEVICE, dtype)
    q, k, v = (qkv[..., i * d:(i + 1) * d] for i in range(3))
    ld = lightning_log_decay(h, DEVICE)
    s0 = torch.randn(b, h, d, d, generator=g).to(DEVICE)
    st_one, st_all, st_ref = s0.clone(), s0.clone(), s0.clone()
    one = torch.stack([lightning_decode_step(q[:, i], k[:, i], v[:, i], ld, st_one, config=config)
                       for i in range(t)], dim=1)
    out = torch.full((b, t, h, d), float("nan"), dtype=dtype, device=DEVICE)
    assert lightning_decode_step(q, k, v, ld, st_all, out=out, config=config) is out
    assert torch.equal(out, one) and torch.equal(st_all, st_one)
    ref = torch.stack([lightning_decode_step_reference(q[:, i].float(), k[:, i].float(), v[:, i].float(), ld, st_ref)
                       for i in range(t)], dim=1)
    assert rel_err(out, ref) < TOL[dtype] and rel_err(st_all, st_ref) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the decode launch cache serves CUDA launches only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_cached_launch_equals_the_jit_launch(lt, config, dtype):
    """Direct launches of the cached decode kernel give bit-identical outputs and states to Triton's own launch,
    for contiguous inputs and for strided views of a fused projection (a different cache key)."""
    b, h, d = 3, 4, 64
    ld = lightning_log_decay(h, DEVICE)
    g = torch.Generator().manual_seed(21)
    qkv = torch.randn(4, b, h, 3 * d, generator=g).to(DEVICE, dtype)
    s0 = torch.randn(b, h, d, d, generator=g).to(DEVICE)
    for views in (False, True):
        outs, states = [], []
        for cached in (False, True):
            state = s0.clone()
            steps = []
            for t in range(4):
                q, k, v = (qkv[t, ..., i * d:(i + 1) * d] if views else qkv[t, ..., i * d:(i + 1) * d].contiguous()
                           for i in range(3))
                steps.append(lightning_decode_step(q, k, v, ld, state,
                                                   config=replace(config, fast_launch=cached)).clone())
            outs.append(torch.stack(steps)), states.append(state)
        assert torch.equal(outs[0], outs[1]) and torch.equal(states[0], states[1])
        ref_state = s0.clone()
        for t in range(4):
            q, k, v = (qkv[t, ..., i * d:(i + 1) * d].float() for i in range(3))
            o_ref = lightning_decode_step_reference(q, k, v, ld, ref_state)
            assert rel_err(outs[1][t], o_ref) < TOL[dtype]
    assert any(key[0] is lt._decode_step_kernel for key in triton_launch._CACHE)   # the cache was used


def test_strongest_decay_long_chunk_finite(config):
    # head 0 of 32 has gamma ~ 0.43: gamma^-128 would overflow fp32; chunk 128 must stay finite
    config = replace(config, chunk=128)
    h = 2
    q, k, v, s0 = inputs(1, 140, h, 16, 16, torch.float32, seed=6)
    ld = lightning_log_decay(32, DEVICE)[[0, 31]]  # the fastest and the slowest decay of 32 heads
    assert ld[0].item() < -0.8
    o, f = lightning_attention(q, k, v, ld, initial_state=s0, output_final_state=True, config=config)
    _, (o_r, f_r) = reference(q, k, v, ld, initial_state=s0, output_final_state=True)
    assert torch.isfinite(o).all() and rel_err(o, o_r) < 1e-4 and rel_err(f, f_r) < 1e-4


@pytest.mark.parametrize("dtype, chunk", [(torch.float32, 16), (torch.float32, 64), (torch.bfloat16, 16)])
def test_factored_intra_decay_forward_and_backward(lt, config, dtype, chunk):
    """intra_factored: gamma^(i-c) * gamma^(c-j) per chunk when every head's |log2 gamma| * C/2 is within
    FACTORED_MAX_EXP (log gamma = -3 at chunk 16), the [C, C] table otherwise (at chunk 64): exact either way.
    T = 2 * chunk + 22 tokens: several one-chunk segments and a partial last chunk."""
    config = replace(config, chunk=chunk, block_v=32, chunks_per_segment=1, intra_factored=True)
    ld = torch.tensor([-3.0, -0.85, -0.01], device=DEVICE)
    fast = lt._max_abs_log2_decay(ld, config)
    assert fast == pytest.approx(3.0 / math.log(2), rel=1e-6)
    assert lt._use_factored(fast, chunk) == (chunk == 16)
    q, k, v, s0 = inputs(2, 2 * chunk + 22, 3, 32, 32, dtype, seed=11)
    for x in (q, k, v, s0):
        x.requires_grad_()
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(12)).to(DEVICE)
    o, f = lightning_attention(q, k, v, ld, initial_state=s0, output_final_state=True, config=config)
    grads = torch.autograd.grad((o.float() * do).sum() + f.sum(), (q, k, v, s0))
    (qr, kr, vr), (o_r, f_r) = reference(q, k, v, ld, initial_state=s0, output_final_state=True)
    grads_ref = torch.autograd.grad((o_r * do).sum() + f_r.sum(), (qr, kr, vr, s0))
    assert torch.isfinite(o).all() and rel_err(o, o_r) < TOL[dtype] and rel_err(f, f_r) < TOL[dtype]
    for name, a, b in zip(("dq", "dk", "dv", "dS0"), grads, grads_ref):
        assert torch.isfinite(a).all() and rel_err(a, b) < TOL[dtype], name


def test_decay_range_is_read_once_and_again_after_an_in_place_change(lt, config):
    config = replace(config, intra_factored=True)
    ld = torch.tensor([-0.5, -0.1], device=DEVICE)
    assert lt._max_abs_log2_decay(ld, config) == pytest.approx(0.5 / math.log(2), rel=1e-6)
    assert lt._max_abs_log2_decay(ld, config) == pytest.approx(0.5 / math.log(2), rel=1e-6)   # remembered
    ld.mul_(8.0)                                                                                  # version changes
    assert lt._max_abs_log2_decay(ld, config) == pytest.approx(4.0 / math.log(2), rel=1e-6)
    assert not lt._use_factored(lt._max_abs_log2_decay(ld, config), 64) and lt._use_factored(0.5, 64)
    config = replace(config, intra_factored=False)
    assert lt._max_abs_log2_decay(ld, config) is None and not lt._use_factored(None, 16)


def test_log2_decay_is_computed_once_per_tensor_and_again_after_an_in_place_change(lt, config):
    """The forward's log2 decay comes from a per-tensor cache (no launch before the first kernel), which an in-place
    change invalidates; tensors without a version counter (made under inference_mode) are computed every time."""
    ld = torch.tensor([-0.5, -0.1], device=DEVICE)
    first = lt._log2_decay(ld)
    assert torch.allclose(first, ld / math.log(2)) and first.dtype == torch.float32
    assert lt._log2_decay(ld) is first                        # remembered
    ld.mul_(2.0)
    again = lt._log2_decay(ld)
    assert again is not first and torch.allclose(again, ld / math.log(2))
    with torch.inference_mode():
        ld_inf = torch.tensor([-0.25], device=DEVICE)
        a, b = lt._log2_decay(ld_inf), lt._log2_decay(ld_inf)
        assert a is not b and torch.allclose(a, ld_inf / math.log(2))
        config = replace(config, intra_factored=True)
        assert lt._max_abs_log2_decay(ld_inf, config) == pytest.approx(0.25 / math.log(2), rel=1e-6)
    # the forward pass itself, with a decay tensor changed in place between two calls, follows the new decay
    q, k, v, _ = inputs(1, 80, 2, 16, 16, torch.float32, seed=4)
    ld2 = lightning_log_decay(2, DEVICE).clone()
    lightning_attention(q, k, v, ld2, config=config)
    ld2.mul_(0.5)
    o, _ = lightning_attention(q, k, v, ld2, config=config)
    _, (o_ref, _) = reference(q, k, v, ld2)
    assert rel_err(o, o_ref) < TOL[torch.float32]


def test_forward_without_grad_builds_no_autograd_node_and_matches(config):
    """Inputs without grad, or grad disabled, take the forward without an autograd node; the outputs and final state
    equal those of the differentiable path bit for bit."""
    q, k, v, s0 = inputs(2, 150, 2, 16, 16, torch.float32, seed=8)
    ld = lightning_log_decay(2, DEVICE)
    o_plain, f_plain = lightning_attention(q, k, v, ld, initial_state=s0, output_final_state=True, config=config)
    assert o_plain.grad_fn is None and f_plain.grad_fn is None
    qg = q.detach().clone().requires_grad_()
    o_grad, f_grad = lightning_attention(qg, k, v, ld, initial_state=s0, output_final_state=True, config=config)
    assert o_grad.grad_fn is not None
    assert torch.equal(o_plain, o_grad.detach()) and torch.equal(f_plain, f_grad.detach())
    with torch.no_grad():
        o_ng, _ = lightning_attention(qg, k, v, ld, initial_state=s0, output_final_state=True, config=config)
    assert o_ng.grad_fn is None and torch.equal(o_ng, o_plain)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the launch cache serves CUDA launches only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_forward_backward_cached_launch_equals_the_jit_launch(lt, config, dtype):
    """The chunked forward and backward launched through the launch cache give bit-identical outputs, final states
    and gradients to Triton's own launches (second calls hit the cache), for two lengths (other grids, same keys)."""
    ld = lightning_log_decay(4, DEVICE)
    for t in (200, 333):
        q, k, v, s0 = inputs(2, t, 4, 64, 64, dtype, seed=t)
        results = []
        for cached in (False, True, True):
            xs = [x.detach().clone().requires_grad_() for x in (q, k, v, s0)]
            o, f = lightning_attention(*xs[:3], ld, initial_state=xs[3], output_final_state=True,
                                       config=replace(config, fast_launch=cached))
            (o.float().square().mean() + f.square().mean()).backward()
            results.append([o.detach(), f.detach()] + [x.grad for x in xs])
        for got in results[1:]:
            assert all(torch.equal(a, b) for a, b in zip(results[0], got))
    assert any(key[0] is lt._segment_output_kernel for key in triton_launch._CACHE)


def test_default_config_forward_and_backward(lt):
    """The shipped defaults (config None: 128-token chunks, 128-wide V tiles) on a tail-heavy varlen batch."""
    assert lt.DEFAULT_CONFIG == LightningConfig() and LightningConfig().chunk == 128
    cu = torch.tensor([0, 129, 131, 150], dtype=torch.int64, device=DEVICE)
    q, k, v, s0 = inputs(1, 150, 2, 32, 64, torch.bfloat16, seed=8, n_states=3)
    ld = lightning_log_decay(2, DEVICE)
    q.requires_grad_(), v.requires_grad_(), s0.requires_grad_()
    o, f = lightning_attention(q, k, v, ld, initial_state=s0, output_final_state=True, cu_seqlens=cu)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    grads = torch.autograd.grad((o.float() * do).sum() + f.sum(), (q, v, s0))
    (qr, _, vr), (o_r, f_r) = reference(q, k, v, ld, initial_state=s0, output_final_state=True, cu_seqlens=cu)
    grads_ref = torch.autograd.grad((o_r * do).sum() + f_r.sum(), (qr, vr, s0))
    assert rel_err(o, o_r) < 1e-2 and rel_err(f, f_r) < 1e-2
    for a, b in zip(grads, grads_ref):
        assert rel_err(a, b) < 1e-2


def test_unsupported_head_dim_is_refused(config):
    q, k, v, _ = inputs(1, 4, 2, 24, 24, torch.float32)
    ld = lightning_log_decay(2, DEVICE)
    with pytest.raises(ValueError, match=r"head dim Dk=24 is not supported"):
        lightning_attention(q, k, v, ld, config=config)
    with pytest.raises(ValueError, match=r"float64 inputs are not supported"):
        lightning_attention(q.double(), k.double(), v.double(), ld)


def test_config_is_frozen_and_checked():
    """A LightningConfig cannot be changed after it is made (callers pass their own), and bad values are refused
    with the field's name."""
    cfg = LightningConfig()
    with pytest.raises(AttributeError):
        cfg.chunk = 64
    with pytest.raises(ValueError, match="LightningConfig.chunk must be a power of two"):
        LightningConfig(chunk=48)
    with pytest.raises(ValueError, match="LightningConfig.chunks_per_segment"):
        LightningConfig(chunks_per_segment=-1)
