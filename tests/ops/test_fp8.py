"""sala.ops.fp8: e4m3 quantize / dequantize arithmetic, the linear paths, and the refusal where FP8 cannot run."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sala.ops import fp8 as fp8_ops
from sala.ops.fp8 import (
    FP8_DTYPE,
    FP8_MAX,
    MIN_SCALE,
    Fp8UnsupportedError,
    check_fp8_supported,
    dequantize,
    dequantize_weight,
    fp8_linear,
    fp8_linear_reference,
    fp8_linear_scaled_mm,
    quantize_per_token,
    quantize_weight_per_channel,
)


def _bound(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Largest rounding error of e4m3 per element: half an ulp (2^-4 relative) for normals, 2^-10 * scale in the
    subnormal range (spacing 2^-9)."""
    return torch.maximum(w.abs() * 2.0 ** -4, scale * 2.0 ** -10) * (1 + 1e-6)


def test_weight_scales_are_per_row_amax_over_448_and_round_trip_within_half_an_ulp():
    torch.manual_seed(0)
    w = torch.randn(64, 96) * torch.logspace(-3, 2, 64)[:, None]     # rows over five decades
    q, s = quantize_weight_per_channel(w)
    assert q.dtype == FP8_DTYPE and q.shape == w.shape and s.dtype == torch.float32 and s.shape == (64,)
    torch.testing.assert_close(s, w.abs().amax(1) / FP8_MAX, rtol=0, atol=0)
    assert torch.equal(q.float().abs().amax(1), torch.full((64,), FP8_MAX))   # each row's max lands on 448
    dq = dequantize_weight(q, s)
    err = (dq - w).abs()
    assert bool((err <= _bound(w, s[:, None])).all()), float((err / _bound(w, s[:, None])).max())
    rel = float((dq - w).norm() / w.norm())
    assert 0.005 < rel < 0.04       # e4m3: 3 mantissa bits; not lossless, not worse than half an ulp on average


def test_zero_rows_stay_zero_with_a_finite_scale():
    w = torch.randn(8, 32)
    w[3] = 0
    q, s = quantize_weight_per_channel(w)
    assert float(s[3]) == pytest.approx(MIN_SCALE) and bool(torch.isfinite(s).all())
    assert torch.equal(q[3].float(), torch.zeros(32))
    y = fp8_linear_reference(torch.randn(5, 32), q, s)
    assert torch.equal(y[:, 3], torch.zeros(5))
    xq, xs = quantize_per_token(torch.zeros(2, 32))
    assert torch.equal(xq.float(), torch.zeros(2, 32)) and bool(torch.isfinite(xs).all())


def test_saturation_at_448_never_gives_nan():
    x = torch.tensor([[1e6, 1e-3, -1e6, 3.0], [448.0, -448.0, 449.0, 0.0]])
    q, _ = quantize_per_token(x)
    assert bool(torch.isfinite(q.float()).all())
    assert q.float()[0, 0] == FP8_MAX and q.float()[0, 2] == -FP8_MAX
    assert q.float()[1].abs().max() == FP8_MAX


def test_per_token_scales_have_one_entry_per_token_for_any_leading_shape():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 48, dtype=torch.bfloat16) * 7
    q, s = quantize_per_token(x)
    assert q.shape == x.shape and s.shape == (2, 3, 1) and s.dtype == torch.float32
    torch.testing.assert_close(s, x.float().abs().amax(-1, keepdim=True) / FP8_MAX, rtol=0, atol=0)
    dq = dequantize(q, s)
    assert bool(((dq - x.float()).abs() <= _bound(x.float(), s)).all())


def test_reference_linear_is_dequantize_then_matmul_exactly_and_close_to_the_exact_product():
    torch.manual_seed(2)
    x, w, b = torch.randn(4, 7, 64), torch.randn(40, 64) * 0.05, torch.randn(40)
    q, s = quantize_weight_per_channel(w)
    xq, xs = quantize_per_token(x)
    want = F.linear(dequantize(xq, xs, x.dtype), dequantize_weight(q, s, x.dtype), b)
    got = fp8_linear(x, q, s, b, backend="reference")
    assert torch.equal(got, want)
    exact = F.linear(x, w, b)
    assert float((got - exact).norm() / exact.norm()) < 0.05


def test_scaled_mm_path_matches_the_reference_on_this_torch():
    """The row-wise torch._scaled_mm call (layouts, scale shapes, the N % 16 tail, 3-D input, M = 0); torch's CPU
    build runs _scaled_mm too, so the CUDA path's argument handling is exercised here."""
    torch.manual_seed(3)
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    w = torch.randn(72, 64) * 0.1                      # N = 72: 64 through _scaled_mm, 8 through the tail
    q, s = quantize_weight_per_channel(w)
    try:
        got = fp8_linear_scaled_mm(x, q, s)
    except (RuntimeError, NotImplementedError) as e:   # pragma: no cover - older CPU builds lack the op
        pytest.skip(f"torch._scaled_mm does not run on this CPU build: {e}")
    ref = fp8_linear_reference(x.float(), q, s)
    assert got.shape == (3, 5, 72) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref, rtol=2e-2, atol=2e-2)
    assert fp8_linear_scaled_mm(x[:0], q, s).shape == (0, 5, 72)
    bias = torch.randn(72, dtype=torch.bfloat16)
    torch.testing.assert_close(fp8_linear_scaled_mm(x, q, s, bias).float(), ref + bias.float(), rtol=2e-2, atol=3e-2)


def test_scaled_mm_path_refuses_in_features_not_a_multiple_of_16():
    q, s = quantize_weight_per_channel(torch.randn(32, 40))
    with pytest.raises(ValueError, match="in_features 40 is not a multiple of 16"):
        fp8_linear_scaled_mm(torch.randn(2, 40), q, s)


def test_bad_operands_are_named():
    q, s = quantize_weight_per_channel(torch.randn(32, 48))
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8_linear(torch.randn(2, 48), q.float(), s, backend="reference")
    with pytest.raises(ValueError, match="x has 32 features"):
        fp8_linear(torch.randn(2, 32), q, s, backend="reference")
    with pytest.raises(ValueError, match="weight_scale"):
        fp8_linear(torch.randn(2, 48), q, s[:5], backend="reference")
    with pytest.raises(ValueError, match="2-D"):
        quantize_weight_per_channel(torch.randn(2, 3, 4))


# ----------------------------------------------------------------------------- refusal
def test_cpu_is_refused_in_one_line_that_says_what_to_do():
    with pytest.raises(Fp8UnsupportedError) as e:
        check_fp8_supported("cpu")
    msg = str(e.value)
    assert "\n" not in msg and "cpu" in msg and "Ada or Hopper" in msg and "quantization" in msg
    q, s = quantize_weight_per_channel(torch.randn(32, 48))
    with pytest.raises(Fp8UnsupportedError, match="cpu"):
        fp8_linear(torch.randn(2, 48), q, s)                 # backend "auto" never falls back silently


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA device 0 whose capability and name the test sets."""
    state = {"cap": (8, 0), "name": "NVIDIA A100-SXM4-80GB"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: state["cap"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: state["name"])
    monkeypatch.setattr(torch.version, "hip", None)
    fp8_ops._cuda_index_supported.cache_clear()
    yield state
    fp8_ops._cuda_index_supported.cache_clear()


def test_gpus_before_ada_are_refused_with_their_name_and_capability(fake_gpu):
    with pytest.raises(Fp8UnsupportedError) as e:
        check_fp8_supported("cuda")
    msg = str(e.value)
    assert "A100" in msg and "8.0" in msg and "8.9" in msg and "\n" not in msg
    fake_gpu.update(cap=(7, 5), name="Tesla T4")
    with pytest.raises(Fp8UnsupportedError, match="Tesla T4"):
        check_fp8_supported(torch.device("cuda", 0))


@pytest.mark.parametrize("cap", [(8, 9), (9, 0), (10, 0)])
def test_ada_hopper_and_later_are_accepted(fake_gpu, cap):
    fake_gpu.update(cap=cap, name="NVIDIA H100")
    check_fp8_supported("cuda:0")
    assert fp8_ops._device_supported(torch.device("cuda", 0))


def test_rocm_is_refused(fake_gpu, monkeypatch):
    fake_gpu.update(cap=(9, 4), name="AMD Instinct MI300X")
    monkeypatch.setattr(torch.version, "hip", "6.2")
    with pytest.raises(Fp8UnsupportedError, match="ROCm"):
        check_fp8_supported("cuda")


@pytest.mark.gpu
def test_scaled_mm_on_the_gpu_matches_the_reference():
    if fp8_ops.fp8_support_problem("cuda") is not None:
        pytest.skip(fp8_ops.fp8_support_problem("cuda"))
    torch.manual_seed(4)
    x = torch.randn(300, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(73448, 4096, device="cuda", dtype=torch.bfloat16) * 0.02   # the LM head: N % 16 = 8
    q, s = quantize_weight_per_channel(w)
    got = fp8_linear(x, q, s)
    ref = fp8_linear_reference(x.float(), q, s)
    assert got.dtype == torch.bfloat16
    assert float((got.float() - ref).norm() / ref.norm()) < 1e-2
    graph = torch.cuda.CUDAGraph()                 # no host syncs: capturable (the engine's decode graph)
    xs = x[:1].clone()
    with torch.cuda.graph(graph):
        out = fp8_linear(xs, q, s)
    graph.replay()
    torch.testing.assert_close(out, fp8_linear(xs, q, s))


# ----------------------------------------------------------------------------- the Triton quantization kernel
TRITON_MODULE, TRITON_PROBE = "sala.ops.fp8_triton", "_quantize_rows_kernel"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [16, 100, 2048, 2500])     # one block, a ragged block, two blocks with a ragged tail
def test_triton_per_token_quantization_gives_the_reference_bits(triton_module, dtype, k):
    torch.manual_seed(k)
    x = (torch.randn(5, k) * torch.logspace(-4, 3, 5)[:, None]).to(dtype)
    x[2] = 0                                                        # an all-zero token
    x[3, 7] = 1e4                                                   # one outlier sets the row's scale
    q, s = triton_module.quantize_rows_triton(x, FP8_MAX, MIN_SCALE, FP8_DTYPE)
    q_ref, s_ref = fp8_ops._quantize_rows(x)
    assert q.dtype == FP8_DTYPE and s.dtype == torch.float32 and s.shape == (5, 1)
    assert torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


def test_triton_quantization_reads_strided_rows_and_keeps_leading_dims(triton_module):
    torch.manual_seed(5)
    wide = torch.randn(2, 3, 96)
    x = wide[..., 16:80]                                            # rows 96 apart, 64 wide: a column view
    q, s = triton_module.quantize_rows_triton(x, FP8_MAX, MIN_SCALE, FP8_DTYPE)
    q_ref, s_ref = fp8_ops._quantize_rows(x)
    assert q.shape == (2, 3, 64) and s.shape == (2, 3, 1)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)
    q0, s0 = triton_module.quantize_rows_triton(x[:0], FP8_MAX, MIN_SCALE, FP8_DTYPE)
    assert q0.shape == (0, 3, 64) and s0.shape == (0, 3, 1)


def test_triton_quantization_rounds_every_e4m3_value_and_midpoint_like_the_cast(triton_module):
    """Scale 1 (the row's max is 448): every finite e4m3 value, every midpoint between neighbours (ties to even,
    carries into the next binade), values just off the midpoints, signed zeros."""
    grid = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPE).float()
    grid = grid[torch.isfinite(grid)].unique()                       # -448 .. 448
    mid = (grid[1:] + grid[:-1]) / 2
    eps = mid.abs() * 1e-6 + 1e-12
    x = torch.cat([grid, mid, mid + eps, mid - eps, torch.tensor([0.0, -0.0, 448.0])])
    q, s = triton_module.quantize_rows_triton(x[None], FP8_MAX, MIN_SCALE, FP8_DTYPE)
    q_ref, s_ref = fp8_ops._quantize_rows(x[None])
    assert float(s) == 1.0 and torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.gpu
def test_gpu_triton_quantization_gives_the_reference_bits():
    torch.manual_seed(6)
    x = torch.randn(4096, 16384, device="cuda", dtype=torch.bfloat16) * 3   # a 9B MLP down-projection input
    q, s = quantize_per_token(x)                                             # the Triton kernel on CUDA
    q_ref, s_ref = fp8_ops._quantize_rows(x)
    assert torch.equal(s, s_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


def test_a_scaled_mm_failure_becomes_one_line_that_names_torch(monkeypatch):
    q, s = quantize_weight_per_channel(torch.randn(32, 48))

    def fail(*a, **k):
        raise RuntimeError("Only bf16 high precision output types are supported for row-wise scaling.\nmore")

    monkeypatch.setattr(torch, "_scaled_mm", fail)
    with pytest.raises(Fp8UnsupportedError) as e:
        fp8_linear_scaled_mm(torch.randn(2, 48), q, s)
    assert torch.__version__ in str(e.value) and "row-wise" in str(e.value) and "\n" not in str(e.value)
