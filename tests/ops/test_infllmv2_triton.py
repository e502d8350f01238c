"""Triton InfLLM-V2 kernels vs the PyTorch reference.

CPU: each check of tests/ops/infllmv2_triton_checks.py is a test, run under Triton's interpreter in this process
(tests/conftest.py sets TRITON_INTERPRET=1 for a CPU-only session before triton is imported). In a session that
compiles its kernels (a GPU machine) the checks run in one subprocess with TRITON_INTERPRET=1 instead.
GPU (@pytest.mark.gpu): compiled kernels at the released shape against the reference.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "ops"))
import infllmv2_triton_checks as checks  # noqa: E402  (module import does not import triton)


def _session_interprets() -> bool:
    """Whether this session's Triton kernels run in the interpreter (decided when their module was imported)."""
    from sala.ops.infllmv2 import triton_topk

    return type(triton_topk._topk_blocks_kernel).__name__ == "InterpretedFunction"


@pytest.fixture(scope="module")
def interpreter_results() -> dict:
    """Every check in one process with TRITON_INTERPRET=1 (for a session whose kernels are compiled)."""
    env = dict(os.environ, TRITON_INTERPRET="1", SALA_KERNELS="triton",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "ops" / "infllmv2_triton_checks.py")], env=env,
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", sorted(checks.CHECKS))
def test_triton_interpreter(request, monkeypatch, name):
    if not _session_interprets():
        results = request.getfixturevalue("interpreter_results")
        assert results.get(name) == "ok", results.get(name, "check did not run")
        return
    monkeypatch.setenv("SALA_KERNELS", "triton")   # the checks switch it; restored afterwards
    with torch.random.fork_rng():
        torch.manual_seed(0)
        checks.CHECKS[name]()


@pytest.mark.parametrize("B, Hkv, K", [(1, 2, 96), (4, 2, 96), (64, 2, 96), (1, 1, 3)])
def test_decode_splits_cover_the_selection(B, Hkv, K):
    from sala.ops.infllmv2 import SparseKernelConfig
    from sala.ops.infllmv2.triton_decode import decode_splits

    min_programs = SparseKernelConfig().decode_min_programs
    splits, per = decode_splits(B, Hkv, K, min_programs)
    assert splits * per >= K and (splits - 1) * per < K            # every block in exactly one split, none empty
    assert B * Hkv * splits >= min(min_programs, B * Hkv * K)
    if (B, Hkv, K) == (1, 2, 96):
        assert B * Hkv * splits >= 32                                # batch-1 decode fills >= 32 programs


@pytest.mark.parametrize("B, Hkv, n, unit", [(1, 2, 16384, 16), (1, 2, 16383, 64), (8, 2, 16384, 16), (1, 2, 20, 4),
                                             (64, 2, 100, 16), (1, 1, 1, 16)])
def test_decode_select_splits_cover_the_keys(B, Hkv, n, unit):
    from sala.ops.infllmv2 import SparseKernelConfig
    from sala.ops.infllmv2.triton_decode import decode_select_splits

    min_programs = SparseKernelConfig().decode_select_programs
    splits, per = decode_select_splits(B, Hkv, n, unit, min_programs)
    assert per % unit == 0 and splits * per >= n and (splits - 1) * per < n     # every item in one split, none empty
    assert B * Hkv * splits >= min(min_programs, B * Hkv * -(-n // unit))
    if (B, Hkv, n) == (1, 2, 16384):
        assert B * Hkv * splits >= 64                                            # batch-1 decode at 1M: >= 64 programs


# ------------------------------------------------------------------------------------------------ GPU
def _released_case(T=8192, Tq=1024, seed=0):
    from sala.ops.infllmv2 import SparseParams

    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, Tq, 32, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, T, 2, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, T, 2, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    return SparseParams(), q, k, v


@pytest.mark.gpu
@pytest.mark.parametrize("topk_max_cols", [4096, 64])
def test_gpu_selection_matches_reference(monkeypatch, topk_max_cols):
    """Selection kernels vs the fp64 reference; the top-k by the kernel and by the wide-row torch fallback."""
    from sala.ops.infllmv2 import SparseKernelConfig, compress_keys, select_blocks
    from sala.ops.infllmv2 import reference as ref

    p, q, k, v = _released_case()
    k1, k2 = compress_keys(k, 32, 16), compress_keys(k, 128, 64)
    torch.testing.assert_close(k1.float(), ref.compress_keys_ref(k, 32, 16).float())
    monkeypatch.setenv("SALA_KERNELS", "triton")
    got = select_blocks(q, k1, k2, p, q_offset=8192 - 1024,
                        kernel_config=SparseKernelConfig(topk_max_cols=topk_max_cols))
    pos = (7168 + torch.arange(1024, device="cuda"))[None]
    checks.assert_same_selection(got, ref.select_blocks_ref(q.double(), k1.double(), k2.double(), pos, p,
                                                            128 ** -0.5), q, k1, k2, pos, p, 128 ** -0.5, rel=2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [2048, 16384])
def test_gpu_topk_kernel_matches_torch_topk(n):
    """The top-k kernel at 1M-token row widths (16384 blocks) on pooled-like rows: 34 forced (+inf) blocks, a -inf
    tail, ties in the low scores (lowest columns win)."""
    from sala.ops.infllmv2 import reference as ref
    from sala.ops.infllmv2 import triton_topk

    g = torch.Generator(device="cuda").manual_seed(n)
    x = (torch.rand(512, n, device="cuda", generator=g) * 64).floor() ** 4
    x[:, n // 2 - 34:n // 2] = float("inf")
    x[:, n // 2:] = float("-inf")
    got = triton_topk.topk_blocks_triton(x, 96, max_cols=n)
    assert torch.equal(got, ref.topk_block_indices(x, 96))


@pytest.mark.gpu
@pytest.mark.parametrize("band_rows", [64, 128])
def test_gpu_band_split_matches_reference(monkeypatch, band_rows):
    """Band split at the released shape, bf16: 2 batch rows of 700 queries at an offset that is not a multiple
    of the block (band tiles straddle query blocks and the two rows' key bases), forward output and lse vs the
    one-walk kernel, output vs the fp32 reference."""
    from sala.ops.infllmv2 import (
        SparseKernelConfig,
        block_sparse_attention,
        compress_keys,
        select_blocks,
        triton_attention,
    )

    config = SparseKernelConfig(band_rows=band_rows)
    monkeypatch.setenv("SALA_KERNELS", "triton")
    g = torch.Generator(device="cuda").manual_seed(band_rows)
    T, Tq = 9000, 700
    q = torch.randn(2, Tq, 32, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(2, T, 2, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(2, T, 2, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    from sala.ops.infllmv2 import SparseParams

    p = SparseParams()
    off = T - Tq
    idx = select_blocks(q, compress_keys(k, 32, 16), compress_keys(k, 128, 64), p, q_offset=off)
    got = block_sparse_attention(q, k, v, idx, p, q_offset=off, forced_blocks=True, kernel_config=config)
    walk = block_sparse_attention(q, k, v, idx, p, q_offset=off, kernel_config=config)
    monkeypatch.setenv("SALA_KERNELS", "reference")
    want = block_sparse_attention(q.float(), k.float(), v.float(), idx, p, q_offset=off)
    for out in (got, walk):
        assert torch.isfinite(out).all()
        err = (out.float() - want).norm() / want.norm()
        assert err < 1e-2, float(err)
    assert (got.float() - walk.float()).abs().max() < 2e-2
    pos = (off + torch.arange(Tq, device="cuda")).repeat(2).to(torch.int32)
    kbase = torch.arange(2, device="cuda").repeat_interleave(Tq) * T
    args = (q.reshape(-1, 32, 128), k.reshape(-1, 2, 128), v.reshape(-1, 2, 128), idx, pos, kbase, 64, 128 ** -0.5)
    _, lse_b = triton_attention.sparse_attention_fwd(*args, band=(p.init_blocks, p.local_blocks), config=config)
    _, lse_w = triton_attention.sparse_attention_fwd(*args)
    torch.testing.assert_close(lse_b, lse_w, atol=1e-3, rtol=1e-4)


@pytest.mark.gpu
def test_gpu_band_split_dq_matches_walk(monkeypatch):
    """The band split (forward and dq) at the released shape, bf16, 2 rows at an unaligned offset: dq, dk, dv equal
    the one-walk backward's (forced_blocks not promised; same selected blocks)."""
    from sala.ops.infllmv2 import SparseParams, block_sparse_attention, compress_keys, select_blocks

    monkeypatch.setenv("SALA_KERNELS", "triton")
    g = torch.Generator(device="cuda").manual_seed(5)
    T, Tq = 9000, 700
    q = torch.randn(2, Tq, 32, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(2, T, 2, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(2, T, 2, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    p = SparseParams()
    idx = select_blocks(q, compress_keys(k, 32, 16), compress_keys(k, 128, 64), p, q_offset=T - Tq)
    do = torch.randn_like(q)
    grads = []
    for forced in (False, True):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = block_sparse_attention(*leaves, idx, p, q_offset=T - Tq, forced_blocks=forced)
        grads.append([x.float() for x in torch.autograd.grad(out, leaves, do)])
    for got, want in zip(grads[1], grads[0]):
        assert torch.isfinite(got).all()
        assert ((got - want).norm() / want.norm()) < 1e-2


@pytest.mark.gpu
def test_gpu_attention_fwd_bwd_matches_reference(monkeypatch):
    from sala.ops.infllmv2 import block_sparse_attention, compress_keys, select_blocks

    p, q, k, v = _released_case(Tq=256)
    idx = select_blocks(q, compress_keys(k, 32, 16), compress_keys(k, 128, 64), p, q_offset=8192 - 256)
    do = torch.randn_like(q)
    res = []
    for mode in ("triton", "reference"):
        monkeypatch.setenv("SALA_KERNELS", mode)
        leaves = [t.float().requires_grad_() if mode == "reference" else t.clone().requires_grad_()
                  for t in (q, k, v)]
        out = block_sparse_attention(*leaves, idx, p, q_offset=8192 - 256)
        res.append([out.float(), *[t.float() for t in torch.autograd.grad(out, leaves, do.to(out.dtype))]])
    for got, want in zip(*res):
        err = (got - want).norm() / want.norm()
        assert err < 2e-2, float(err)


@pytest.mark.gpu
def test_gpu_decode_matches_prefill(monkeypatch):
    from sala.ops.infllmv2 import compressed_lengths, infllmv2_attention, infllmv2_decode, update_compressed_keys

    monkeypatch.setenv("SALA_KERNELS", "triton")
    p, q, k, v = _released_case(T=7000, Tq=7000)
    lengths = torch.tensor([7000], dtype=torch.int32, device="cuda")
    n1, n2 = compressed_lengths(8192, p)
    kc = torch.zeros(1, 8192, 2, 128, device="cuda", dtype=k.dtype)
    vc = torch.zeros_like(kc)
    kc[:, :7000], vc[:, :7000] = k, v
    k1c = torch.zeros(1, n1, 2, 128, device="cuda", dtype=k.dtype)
    k2c = torch.zeros(1, n2, 2, 128, device="cuda", dtype=k.dtype)
    update_compressed_keys(kc, k1c, k2c, lengths, p, new_tokens=7000)
    out = infllmv2_decode(q[:, -1], kc, vc, k1c, k2c, lengths, p)
    full = infllmv2_attention(q[:, -64:], k, v, p)
    err = (out.float() - full[:, -1].float()).norm() / full[:, -1].float().norm()
    assert err < 1e-2, float(err)


@pytest.mark.gpu
def test_gpu_decode_with_several_queries_per_row_matches_prefill(monkeypatch):
    """A verify step's sparse decode at the released shape: 9 queries per cache row (2 rows), each at its own
    length, against the prefill path over the same keys."""
    from sala.ops.infllmv2 import compressed_lengths, infllmv2_attention, infllmv2_decode, update_compressed_keys

    monkeypatch.setenv("SALA_KERNELS", "triton")
    T, ends = 9, [7000, 5000]
    p, q, k, v = _released_case(T=7000, Tq=7000)
    n1, n2 = compressed_lengths(8192, p)
    kc = torch.zeros(2, 8192, 2, 128, device="cuda", dtype=k.dtype)
    vc = torch.zeros_like(kc)
    for b, e in enumerate(ends):
        kc[b, :e], vc[b, :e] = k[0, :e], v[0, :e]
    k1c = torch.zeros(2, n1, 2, 128, device="cuda", dtype=k.dtype)
    k2c = torch.zeros(2, n2, 2, 128, device="cuda", dtype=k.dtype)
    update_compressed_keys(kc, k1c, k2c, torch.tensor(ends, dtype=torch.int32, device="cuda"), p, new_tokens=8192)
    qs = torch.cat([q[0, e - T:e] for e in ends])
    seqlens = torch.tensor([e - T + j + 1 for e in ends for j in range(T)], dtype=torch.int32, device="cuda")
    out = infllmv2_decode(qs, kc, vc, k1c, k2c, seqlens, p, queries_per_row=T)
    for b, e in enumerate(ends):
        full = infllmv2_attention(q[:, e - 64:e], k[:, :e], v[:, :e], p)[0, -T:]
        got = out[b * T:(b + 1) * T]
        err = (got.float() - full.float()).norm() / full.float().norm()
        assert err < 1e-2, (b, float(err))


@pytest.mark.gpu
def test_gpu_split_decode_selection_matches_reference(monkeypatch):
    """Split-N decode selection at the released shape (64K cache, 3 sequences, NaN in unused K1/K2 slots)."""
    from sala.ops.infllmv2 import SparseParams, compressed_lengths, triton_decode, update_compressed_keys
    from sala.ops.infllmv2 import reference as ref

    p, S = SparseParams(), 65536
    g = torch.Generator(device="cuda").manual_seed(3)
    k = torch.randn(3, S, 2, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    q = torch.randn(3, 32, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    lengths = torch.tensor([65536, 20000, 5000], dtype=torch.int32, device="cuda")
    n1, n2 = compressed_lengths(S, p)
    k1c = torch.full((3, n1, 2, 128), float("nan"), device="cuda", dtype=k.dtype)
    k2c = torch.full((3, n2, 2, 128), float("nan"), device="cuda", dtype=k.dtype)
    update_compressed_keys(k, k1c, k2c, lengths, p, new_tokens=S)
    pos = lengths - 1
    got = triton_decode.pooled_block_scores_decode_split(q, k1c, k2c, pos, p, 128 ** -0.5, S // 64)
    want = ref.pooled_block_scores_ref(q[:, None].double(), k1c.double(), k2c.double(), pos.long()[:, None], p,
                                       128 ** -0.5, S // 64)
    fin = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), fin)
    torch.testing.assert_close(got[fin].double(), want[fin], atol=1e-5, rtol=2e-3)
    checks.assert_same_selection(ref.topk_block_indices(got, p.total_blocks),
                                 ref.topk_block_indices(want, p.total_blocks), q[:, None], k1c, k2c,
                                 pos.long()[:, None], p, 128 ** -0.5, rel=2e-3)


@pytest.mark.parametrize("max_tokens, batch", [(70000, 1), (300000, 1), (20000, 4), (1000, 1)])
def test_warmup_covers_every_length_class(monkeypatch, max_tokens, batch):
    """warmup_length_classes compiles each top-k row-width class (with and without limits) and each decode-selection
    SP2 class that any context up to max_tokens would meet (the kernels themselves replaced by recorders)."""
    from sala.ops.infllmv2 import SparseKernelConfig, SparseParams, triton_decode, triton_utils
    from sala.ops.infllmv2.params import n_windows

    p = SparseParams()
    topk_seen, sp2_seen = set(), set()
    monkeypatch.setattr(triton_decode, "topk_blocks_triton", lambda x, K, limits=None, max_cols=0: topk_seen.add(
        (max(16, triton_utils.pow2(x.shape[-1])), limits is not None, x.shape[0])))

    def record_split(q, k1, k2, pos, params, scale, n_blocks, config):
        assert q.shape[0] == k1.shape[0] == k2.shape[0] == pos.shape[0] == batch
        splits = triton_decode.decode_select_splits(batch, 2, k2.shape[1], triton_utils.k2_tile())[0]
        sp2_seen.add(max(2, triton_utils.pow2(splits)))

    monkeypatch.setattr(triton_decode, "pooled_block_scores_decode_split", record_split)
    n = triton_decode.warmup_length_classes(max_tokens, p, batch=batch, device="cpu")
    assert n == len(topk_seen) + 2 * len(sp2_seen)       # launches: 2 per top-k class, 2 per split class
    max_blocks = -(-max_tokens // 64) + 1
    want_nc = {max(16, triton_utils.pow2(b))
               for b in range(1, max_blocks + 1) if b <= SparseKernelConfig().topk_max_cols}
    assert {nc for nc, lim, _ in topk_seen if lim} == want_nc
    assert {nc for nc, lim, rows in topk_seen if not lim and rows == batch} == want_nc
    want_sp2 = set()
    for cap in range(128, max_tokens + 1, 128):          # every decode cache capacity up to max_tokens
        n2 = int(n_windows(torch.tensor(cap), p.k2_kernel, p.k2_stride))
        splits = triton_decode.decode_select_splits(batch, 2, max(1, n2), triton_utils.k2_tile())[0]
        want_sp2.add(max(2, triton_utils.pow2(splits)))
    assert want_sp2 <= sp2_seen, (want_sp2, sp2_seen)


def test_engine_warmup_is_a_noop_off_the_triton_path():
    from sala.engine import SalaEngine

    eng = SalaEngine.from_preset("sala-tiny", random_weights=True, device="cpu", dtype="fp32")
    assert eng.warmup(4096) == 0.0
    with pytest.raises(ValueError, match="max_tokens and batch must be >= 1"):
        eng.warmup(0)
