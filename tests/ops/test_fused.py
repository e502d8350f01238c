"""Fused inference ops (RMSNorm + residual / gate, QK-norm + RoPE, SiLU x up): references vs the model's
modules, Triton kernels vs the references (in Triton's interpreter on CPU, compiled on a GPU).
Kernel outputs are NaN-poisoned, so unwritten elements show up."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sala.modeling.modeling_sala import SalaRMSNorm, apply_rope, rope_cos_sin
from sala.ops import fused
from sala.ops.fused_reference import (
    add_rms_norm_reference,
    qk_norm_rope_reference,
    rms_norm_gate_reference,
    rms_norm_reference,
    silu_mul_reference,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


TRITON_MODULE, TRITON_PROBE = "sala.ops.fused_triton", "_silu_mul_kernel"


@pytest.fixture(scope="module")
def ft(triton_module):
    """sala.ops.fused_triton, kernels on (the interpreter on CPU), NaN-poisoned outputs (tests/conftest.py)."""
    return triton_module


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.isfinite(got).all(), "kernel left NaN/inf (unwritten elements?)"
    g, w = got.double(), want.double()
    rel = ((g - w).norm() / w.norm().clamp_min(1e-30)).item()
    # Triton's interpreter rounds fp32 -> bf16 by truncation, not to nearest; a chain of three truncations
    # drifts by up to ~1.5%. Compiled kernels (and fp16 in the interpreter) round to nearest, as torch does.
    truncating = dtype == torch.bfloat16 and DEVICE == "cpu"
    assert rel <= {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2 if truncating else 1e-2}[dtype], \
        f"relative error {rel:.3e}"
    if dtype != torch.float32 and not truncating:   # same roundings: nearly every element is bit-equal
        assert (got != want).float().mean().item() < 0.02


# ----------------------------------------------------------------------------- references = the modules
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_references_equal_the_model_modules(dtype):
    torch.manual_seed(0)
    B, T, H, D = 2, 5, 3, 16
    norm = SalaRMSNorm(D, 1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(B, T, H, D, dtype=dtype) * 3
    cos, sin = rope_cos_sin(torch.arange(7, 7 + T)[None].expand(B, T), D, 10000.0)
    with torch.no_grad():
        assert torch.equal(rms_norm_reference(x, norm.weight, 1e-6), norm(x))
        assert torch.equal(qk_norm_rope_reference(x, norm.weight, 1e-6, cos, sin), apply_rope(norm(x), cos, sin))
        h, a = torch.randn(B, T, D, dtype=dtype), torch.randn(B, T, D, dtype=dtype)
        res, y = add_rms_norm_reference(h, a, 0.35, norm.weight, 1e-6)
        assert torch.equal(res, h + a * 0.35) and torch.equal(y, norm(h + a * 0.35))
        z = torch.randn(B, T, D, dtype=dtype)
        assert torch.equal(rms_norm_gate_reference(h, norm.weight, 1e-6, z), norm(h) * torch.sigmoid(z))
        gu = torch.randn(B, T, 2 * D, dtype=dtype)
        assert torch.equal(silu_mul_reference(gu), F.silu(gu[..., :D]) * gu[..., D:])


# ----------------------------------------------------------------------------- kernels = the references
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [64, 100])
def test_rms_norm_kernels(ft, dtype, n):
    torch.manual_seed(1)
    x = (torch.randn(3, 7, n, device=DEVICE) * 4).to(dtype)
    a = torch.randn(3, 7, n, device=DEVICE).to(dtype)
    z = torch.randn(3, 7, n, device=DEVICE).to(dtype)
    w = (torch.rand(n, device=DEVICE) + 0.5).to(dtype)
    _close(fused.rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6), dtype)
    _close(fused.rms_norm(x, None, 1e-5), rms_norm_reference(x, None, 1e-5), dtype)
    res, y = fused.add_rms_norm(x, a, 0.37, w, 1e-6)
    res_ref, y_ref = add_rms_norm_reference(x, a, 0.37, w, 1e-6)
    _close(res, res_ref, dtype)
    _close(y, y_ref, dtype)
    h = x.clone()
    res2, y2 = fused.add_rms_norm(h, a, 0.37, w, 1e-6, inplace=True)
    assert res2 is h
    _close(h, res_ref, dtype)
    _close(y2, y_ref, dtype)
    _close(fused.rms_norm_gate(x, w, 1e-6, z), rms_norm_gate_reference(x, w, 1e-6, z), dtype)
    _close(fused.rms_norm_gate(x, None, 1e-6, z, normalize=False),
           rms_norm_gate_reference(x, None, 1e-6, z, normalize=False), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_kernels_on_strided_column_views(ft, dtype):
    """The engine passes the gate as a column slice of the fused projection output."""
    torch.manual_seed(2)
    proj = torch.randn(2, 9, 3 * 32, device=DEVICE).to(dtype)
    o, z = proj[..., :32], proj[..., 64:]
    w = (torch.rand(32, device=DEVICE) + 0.5).to(dtype)
    assert not z.is_contiguous()
    _close(fused.rms_norm_gate(o, w, 1e-6, z), rms_norm_gate_reference(o, w, 1e-6, z), dtype)
    _close(fused.silu_mul(proj[..., :64]), silu_mul_reference(proj[..., :64]), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads,d,rope,norm,batch_cos", [(3, 16, True, True, False), (4, 32, True, False, True),
                                                         (5, 16, False, True, False)])
def test_qk_norm_rope_kernel(ft, dtype, heads, d, rope, norm, batch_cos):
    torch.manual_seed(3)
    B, T = 2, 6
    qkv = (torch.randn(B, T, 3 * heads * d, device=DEVICE) * 2).to(dtype)
    x = qkv[..., heads * d:2 * heads * d].reshape(B, T, heads, d)          # a strided view, like the engine's k
    w = (torch.rand(d, device=DEVICE) + 0.5).to(dtype) if norm else None
    cos = sin = None
    if rope:
        pos = torch.arange(1000, 1000 + T, device=DEVICE)[None]
        pos = pos.expand(B, T) + torch.arange(B, device=DEVICE)[:, None] * 37 if batch_cos else pos
        cos, sin = rope_cos_sin(pos, d, 10000.0)
    got = fused.qk_norm_rope(x, w, 1e-6, cos, sin)
    assert got.is_contiguous()
    _close(got, qk_norm_rope_reference(x, w, 1e-6, cos, sin), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_kernel_wide_rows_in_several_programs(ft, dtype):
    torch.manual_seed(4)
    gu = (torch.randn(5, 2 * 3000, device=DEVICE) * 3).to(dtype)    # 3000 > one program's 2048 columns
    _close(fused.silu_mul(gu), silu_mul_reference(gu), dtype)


def test_mixed_dtypes_take_the_reference_and_keep_torch_promotion(ft):
    x = torch.randn(4, 32, device=DEVICE).to(torch.bfloat16)
    w = torch.rand(32, device=DEVICE) + 0.5                           # fp32 weight: torch promotes to fp32
    got = fused.rms_norm(x, w, 1e-6)
    assert got.dtype == torch.float32 and torch.equal(got, rms_norm_reference(x, w, 1e-6))


def test_bad_shapes_are_refused_with_both_shapes():
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match=r"weight has last dim 4 .*expected 8"):
        fused.rms_norm(x, torch.ones(4), 1e-6)
    with pytest.raises(ValueError, match=r"a has shape \(2, 3, 7\), h has shape \(2, 3, 8\)"):
        fused.add_rms_norm(x, torch.randn(2, 3, 7), 1.0, None, 1e-6)
    with pytest.raises(ValueError, match=r"cos must be \[2 or 1, 3, 8\]"):
        fused.qk_norm_rope(x.reshape(2, 3, 1, 8), None, 1e-6, torch.randn(2, 4, 8), torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match="even"):
        fused.silu_mul(torch.randn(3, 5))


def test_engine_with_the_fused_kernels_equals_the_plain_forward(ft, monkeypatch):
    """Chunked prefill and CUDA-graph-shaped decode steps with every fused op on its Triton kernel (the
    interpreter on CPU; attention kernels untouched) give the model's own logits (fp32)."""
    from sala.engine import SalaEngine
    from sala.engine.forward import DecodeStep
    from sala.modeling import SalaConfig, SalaForCausalLM

    monkeypatch.setenv("SALA_KERNELS", "auto")                        # attention: references on CPU
    calls = []
    monkeypatch.setattr(fused, "use_triton", lambda *t: calls.append(1) or True)
    torch.manual_seed(0)
    model = SalaForCausalLM(SalaConfig.from_preset("sala-tiny")).eval().to(DEVICE)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
    ids = torch.randint(3, 512, (30,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        want = model(torch.tensor([ids + [7, 9]], device=DEVICE)).logits[0]
    engine = SalaEngine(model, chunk_size=13)                         # chunks of 13, 13 and 4
    got = engine.prefill([ids], len(ids) + 4)[0]
    assert calls, "the fused kernels were not used"
    rel = lambda a, b: float((a.double() - b.double()).norm() / b.double().norm())   # noqa: E731
    assert rel(got, want[len(ids) - 1]) < 1e-5
    step = DecodeStep(engine.runner, engine.cache)
    for t, tok in enumerate((7, 9)):
        step.ids.fill_(tok)
        assert rel(step()[0], want[len(ids) + t]) < 1e-5, f"decode step {t}"
