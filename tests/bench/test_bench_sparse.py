"""The sparse benchmark on the CPU: forward+backward timing runs the three computations it names (timer stubbed),
config variants pass their own config, and its correlated inputs."""
import pytest
import torch

import sala.bench.kernels_sparse as ks
from sala.ops.infllmv2 import SparseParams


def test_fwd_bwd_timing_runs_whole_attention_and_sdpa(monkeypatch):
    calls = []

    def once(fn, warmup=0, rep=0):
        grads = fn()
        calls.append([g.abs().sum().item() for g in grads])
        return 1.0

    monkeypatch.setattr(ks, "bench_ms", once)
    p = SparseParams(block_size=16, kernel_size=8, kernel_stride=4, topk=2, init_blocks=1, window_size=32)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 100, h, 16, generator=g) for h in (4, 2, 2))
    out = ks._fwd_bwd_ms(q, k, v, p, 1, 1, with_sdpa=True)
    assert set(out) == {"whole_fwd_bwd_ms", "attention_fwd_bwd_ms", "sdpa_fwd_bwd_ms"}
    assert len(calls) == 3 and all(s > 0 for c in calls for s in c)      # every gradient really computed
    assert set(ks._fwd_bwd_ms(q, k, v, p, 1, 1)) == {"whole_fwd_bwd_ms", "attention_fwd_bwd_ms"}


def test_config_variant_passes_its_config_and_changes_nothing_global(monkeypatch):
    """`chunk1g` measures selection and the whole forward with its own SparseKernelConfig passed as kernel_config=
    (the run's config elsewhere), records index agreement with the run config's selection, and unknown variant
    names are refused."""
    from sala.ops.infllmv2 import SparseKernelConfig

    seen = []
    real_select, real_attention = ks.select_blocks, ks.infllmv2_attention
    monkeypatch.setattr(ks, "select_blocks",
                        lambda *a, **kw: (seen.append(kw["kernel_config"]), real_select(*a, **kw))[1])
    monkeypatch.setattr(ks, "infllmv2_attention",
                        lambda *a, **kw: (seen.append(kw["kernel_config"]), real_attention(*a, **kw))[1])
    monkeypatch.setattr(ks, "bench_ms", lambda fn, warmup=0, rep=0: (fn(), 2.0)[1])
    p = SparseParams(block_size=16, kernel_size=8, kernel_stride=4, topk=2, init_blocks=1, window_size=32)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 120, h, 16, generator=g) for h in (4, 2, 2))
    base = SparseKernelConfig(fwd_warps=8)
    res = {"sdpa_fwd_ms": 4.0}
    ks._measure_config_variant("chunk1g", 120, p, q, k, v, res, 1, 1, base)
    variant = SparseKernelConfig(fwd_warps=8, select_chunk_bytes=1 << 30)
    assert seen[0] == base and set(seen[1:]) == {variant}, seen
    assert res["chunk1g_select_ms"] == 2.0 and res["chunk1g_speedup_fwd_vs_sdpa"] == 2.0
    assert res["chunk1g_rows_differing_from_default"] == 0.0
    assert ks.check_variants(["default", "chunk1g", "decode"]) == ["default", "chunk1g", "decode"]
    with pytest.raises(ValueError, match="unknown variants \\['tiled'\\]"):
        ks.check_variants(["tiled"])


def test_smooth_tokens_keeps_variance_and_correlates_neighbours():
    """The benchmark's correlated inputs: window 1 is the identity; window W keeps unit variance and makes adjacent
    tokens correlated (W - 1) / W, in every channel, whatever the number of channels per pass."""
    import torch

    from sala.bench.kernels_sparse import smooth_tokens

    x = torch.randn(1, 20000, 3, 8, generator=torch.Generator().manual_seed(0))
    assert smooth_tokens(x, 1) is x
    y = smooth_tokens(x, 16, channels_per_pass=5)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.equal(y, smooth_tokens(x, 16))                     # independent of the pass size
    z = y[0, 100:].reshape(-1, 24)
    assert abs(z.var(0).mean().item() - 1.0) < 0.1
    corr = ((z[1:] * z[:-1]).mean(0) / z.var(0)).mean().item()
    assert abs(corr - 15 / 16) < 0.03
    # token t averages tokens t-15..t: causal, so a change at token 5000 leaves earlier tokens as they were
    x2 = x.clone()
    x2[0, 5000] += 1.0
    y2 = smooth_tokens(x2, 16)
    assert torch.equal(y2[0, :5000], y[0, :5000]) and not torch.equal(y2[0, 5000:5016], y[0, 5000:5016])
    with pytest.raises(ValueError, match="window must be >= 1"):
        smooth_tokens(x, 0)
