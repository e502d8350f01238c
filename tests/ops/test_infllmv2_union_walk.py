"""The union walk (`SparseKernelConfig.fwd_query_tile` = 4, the default; `_sparse_union_fwd_kernel`): the free
selected blocks of 4 consecutive queries walked once for all of them, merged into the band's softmax state. It must
give the per-token walk's output and lse (fwd_query_tile 1; fp32: within 1e-5) and the reference's output.

Cases are built at the kernel level (`sparse_attention_fwd` with band = (init, local)) from constructed block
indices that keep the forced blocks' contract (init blocks and the local band in every row, ascending, -1
padded) with the free blocks chosen to make the merge interesting: several sequences in one flat batch (key
bases changing inside a tile), N not a multiple of 4, queries near the start (no free block at all), neighbours
with identical selections (every merge step a tie), disjoint selections (no sharing), rows with fewer valid slots,
G = 2, 3 and 4 (padded rows), paged K/V with a shuffled page table, and outputs NaN-poisoned before the launch.
On a CPU-only machine the kernels run in Triton's interpreter (tests/conftest.py); bf16 is a GPU test (the
interpreter has no bf16 arithmetic).
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from sala.ops.infllmv2 import SparseKernelConfig, SparseParams, infllmv2_attention  # noqa: E402
from sala.ops.infllmv2 import reference as ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BS, INIT, LOCAL, K = 16, 1, 2, 10           # 10 slots a row: up to 4 forced (init + band qb-2..qb), 6 free
BAND = (INIT, LOCAL)
SCALE = 0.25
PER_TOKEN = SparseKernelConfig(fwd_blocks_per_iter=1, fwd_query_tile=1)
UNION = SparseKernelConfig(fwd_blocks_per_iter=1, fwd_query_tile=4)


@pytest.fixture
def tri(monkeypatch):
    monkeypatch.setenv("SALA_KERNELS", "triton")
    from sala.ops.infllmv2 import triton_attention

    return triton_attention


def _free_blocks(mode: str, qb: int, n: int, j: int, perm: list[int], g: torch.Generator) -> list[int]:
    """Up to n free blocks (INIT .. qb - LOCAL - 1) of query j (its index in the flat batch) by `mode`:
    shared: the first ones of a sequence-wide random order (neighbours select the same blocks: merge ties);
    disjoint: blocks = j (mod 4) only (neighbours share none); random: a random subset of a random size
    (fewer valid slots, -1 padded); mixed: one of the three per query."""
    cand = list(range(INIT, qb - LOCAL))
    if mode == "mixed":
        mode = ("shared", "disjoint", "random")[int(torch.randint(3, (), generator=g))]
    if mode == "shared":
        return [b for b in perm if b in cand][:n]
    if mode == "disjoint":
        return [b for b in cand if b % 4 == j % 4][:n]
    take = int(torch.randint(0, min(n, len(cand)) + 1, (), generator=g))
    return sorted(cand[i] for i in torch.randperm(len(cand), generator=g)[:take].tolist())


def _case(seqs, G: int, mode: str, seed: int = 0, Hkv: int = 2, D: int = 16):
    """Sequences (length T, queries n: positions T - n .. T - 1) packed into one flat batch: q [N, Hkv*G, D],
    k, v [sum T, Hkv, D], block_idx int32 [1, Hkv, N, K], pos int32 [N], kbase int64 [N] (contiguous keys), and
    per sequence its key offset. Rows: the forced blocks plus free ones by `mode` (each kv head its own)."""
    g = torch.Generator().manual_seed(seed)
    N, Tk = sum(n for _, n in seqs), sum(T for T, _ in seqs)
    q = torch.randn(N, Hkv * G, D, generator=g)
    k = torch.randn(Tk, Hkv, D, generator=g)
    v = torch.randn(Tk, Hkv, D, generator=g)
    idx = torch.full((1, Hkv, N, K), -1, dtype=torch.int32)
    pos, kbase, starts = [], [], []
    i, off = 0, 0
    for T, n in seqs:
        starts.append(off)
        perms = [torch.randperm(-(-T // BS), generator=g).tolist() for _ in range(Hkv)]
        for p in range(T - n, T):
            qb = p // BS
            forced = sorted(set(range(min(INIT, qb + 1))) | set(range(max(qb - LOCAL, 0), qb + 1)))
            for h in range(Hkv):
                row = sorted(forced + _free_blocks(mode, qb, K - len(forced), i, perms[h], g))
                idx[0, h, i, :len(row)] = torch.tensor(row, dtype=torch.int32)
            pos.append(p)
            kbase.append(off)
            i += 1
        off += T
    return (q, k, v, idx, torch.tensor(pos, dtype=torch.int32), torch.tensor(kbase, dtype=torch.int64), starts)


def _to(device, *ts):
    return [t.to(device) for t in ts]


def _reference(q, k, v, idx, pos, kbase, block_table=None):
    flat_idx = idx.permute(0, 2, 1, 3).reshape(q.shape[0], idx.shape[1], K)
    return ref.sparse_attention_flat_ref(q, k, v, flat_idx, pos.long(), kbase, BS, SCALE, block_table=block_table)


class _Poisoned:
    """torch.empty / empty_like give NaN-filled floating tensors inside the block: every output element must be
    written by a kernel."""

    def __init__(self, monkeypatch):
        real_empty, real_like = torch.empty, torch.empty_like

        def empty(*a, **kw):
            out = real_empty(*a, **kw)
            return out.fill_(float("nan")) if out.is_floating_point() else out

        def empty_like(t, *a, **kw):
            out = real_like(t, *a, **kw)
            return out.fill_(float("nan")) if out.is_floating_point() else out

        self.mp, self.empty, self.empty_like = monkeypatch, empty, empty_like

    def __enter__(self):
        self.mp.setattr(torch, "empty", self.empty)
        self.mp.setattr(torch, "empty_like", self.empty_like)

    def __exit__(self, *exc):
        self.mp.undo()


class _Launches:
    """Count the launches (kernel[grid]) of the Triton kernel `name` of `module`."""

    def __init__(self, monkeypatch, module, name):
        real, self.calls = getattr(module, name), 0
        outer = self

        class Counting:
            def __getitem__(self, grid):
                outer.calls += 1
                return real[grid]

        monkeypatch.setattr(module, name, Counting())


def _forward(tri, args, config, block_table=None):
    q, k, v, idx, pos, kbase = args
    return tri.sparse_attention_fwd(q, k, v, idx, pos, kbase, BS, SCALE, BAND, config, block_table=block_table)


def _check_against_per_token(tri, monkeypatch, args, block_table=None, want=None):
    """The union walk equals the per-token walk (o and lse within 1e-5) and `want` (the reference), with
    NaN-poisoned outputs; each walk's kernel really ran (and not the other's)."""
    outs = []
    for config, launched in ((PER_TOKEN, (0, 1)), (UNION, (1, 0))):
        with monkeypatch.context() as mp:          # one context per walk: _Poisoned's exit undoes all of mp
            union = _Launches(mp, tri, "_sparse_union_fwd_kernel")
            walk = _Launches(mp, tri, "_sparse_fwd_kernel")
            with _Poisoned(mp):
                outs.append(_forward(tri, args, config, block_table))
            assert (union.calls, walk.calls) == launched, (config.fwd_query_tile, union.calls, walk.calls)
    (o_t, lse_t), (o_u, lse_u) = outs
    assert torch.isfinite(o_t).all() and torch.isfinite(lse_t).all()
    assert torch.isfinite(o_u).all() and torch.isfinite(lse_u).all()
    torch.testing.assert_close(o_u, o_t, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse_u, lse_t, atol=1e-5, rtol=1e-5)
    if want is not None:
        torch.testing.assert_close(o_u, want, atol=2e-5, rtol=1e-4)
    return o_t


# sequences (length, queries): key bases change inside tiles of 4 queries (flat queries 4..7, 8..11, 16..19);
# N = 23 is no multiple of 4; the 2-query and 1-query sequences sit near the start (positions
# < (INIT + LOCAL + 1) * BS: no free block)
VARLEN = [(150, 7), (40, 2), (210, 9), (20, 1), (300, 4)]


@pytest.mark.parametrize("mode, G", [("random", 2), ("disjoint", 2), ("shared", 3), ("mixed", 4)])
def test_union_walk_equals_per_token_walk_varlen(tri, monkeypatch, mode, G):
    q, k, v, idx, pos, kbase, _ = _case(VARLEN, G, mode, seed=G)
    args = _to(DEVICE, q, k, v, idx, pos, kbase)
    want = _reference(*args)
    _check_against_per_token(tri, monkeypatch, args, want=want)


def test_union_walk_selections_built_as_intended():
    """The constructed selections do what the cases claim: identical neighbours (shared), no block shared by
    neighbours (disjoint), queries without any free block, rows with fewer valid slots than K."""
    _, _, _, idx, pos, _, _ = _case(VARLEN, 2, "shared")
    free = [set(r) - {-1} - set(range(INIT)) - set(range(p // BS - LOCAL, p // BS + 1))
            for r, p in zip(idx[0, 0].tolist(), pos.tolist())]
    assert free[3] == free[4] != set() and not free[7] and not free[8]      # ties; the near-start sequence
    _, _, _, idx, pos, _, _ = _case(VARLEN, 2, "disjoint")
    free = [set(r) - {-1} - set(range(INIT)) - set(range(p // BS - LOCAL, p // BS + 1))
            for r, p in zip(idx[0, 0].tolist(), pos.tolist())]
    assert all(not (free[i] & free[i + 1]) for i in range(len(free) - 1)) and free[12]
    _, _, _, idx, _, _, _ = _case(VARLEN, 2, "random")
    assert (idx == -1).any(-1).float().mean() > 0.3


def test_union_walk_batch_layout_and_long_rows(tri, monkeypatch):
    """block_idx [B, Hkv, Tq, K] with B = 3 rows of 13 queries (the flat query i is row i // Tq: batch strides),
    longer contexts (up to 38 free candidates, 6 taken a row), one kv head, G = 4; N = 39."""
    seqs = [(610, 13), (400, 13), (520, 13)]
    q, k, v, idx, pos, kbase, _ = _case(seqs, 4, "mixed", seed=7, Hkv=1)
    idx = idx[0, :, :, :].reshape(1, 3, 13, K).permute(1, 0, 2, 3).contiguous()     # [B=3, Hkv=1, Tq=13, K]
    args = _to(DEVICE, q, k, v, idx, pos, kbase)
    want = ref.sparse_attention_flat_ref(*_to(DEVICE, q, k, v), args[3].permute(0, 2, 1, 3).reshape(39, 1, K),
                                         args[4].long(), args[5], BS, SCALE)
    _check_against_per_token(tri, monkeypatch, args, want=want)


def _paged(k, v, seqs, starts, g):
    """The flat contiguous keys of each sequence as pages of BS keys in a shuffled pool (page 0 and spare pages
    NaN): pages [P * BS, Hkv, D] flat, table int32 [R, NB]."""
    R = len(seqs)
    NB = max(-(-T // BS) for T, _ in seqs) + 1
    n_pages = sum(-(-T // BS) for T, _ in seqs)
    P = 1 + n_pages + 3
    ids = (1 + torch.randperm(P - 1, generator=g))[:n_pages].tolist()
    table = torch.zeros(R, NB, dtype=torch.int32)
    kp = torch.full((P, BS, *k.shape[1:]), float("nan"))
    vp = torch.full_like(kp, float("nan"))
    for r, ((T, _), s) in enumerate(zip(seqs, starts)):
        for j in range(-(-T // BS)):
            page = ids.pop()
            table[r, j] = page
            n = min(BS, T - j * BS)
            kp[page, :n], vp[page, :n] = k[s + j * BS:s + j * BS + n], v[s + j * BS:s + j * BS + n]
    return kp.view(P * BS, *k.shape[1:]), vp.view(P * BS, *k.shape[1:]), table, NB


@pytest.mark.parametrize("G", [3])
def test_union_walk_paged_with_a_shuffled_table(tri, monkeypatch, G):
    """PAGED: K/V in a shuffled page pool (NaN in page 0 and the spare pages), kbase = row offsets r * NB in the
    flat table: equal to the per-token walk on the same pages and to the contiguous union walk."""
    q, k, v, idx, pos, kbase, starts = _case(VARLEN, G, "mixed", seed=11)
    kp, vp, table, NB = _paged(k, v, VARLEN, starts, torch.Generator().manual_seed(3))
    row = torch.repeat_interleave(torch.arange(len(VARLEN)), torch.tensor([n for _, n in VARLEN]))
    args_p = _to(DEVICE, q, kp, vp, idx, pos, row * NB)
    args_f = _to(DEVICE, q, k, v, idx, pos, kbase)
    flat = _check_against_per_token(tri, monkeypatch, args_p, block_table=table.to(DEVICE), want=_reference(*args_f))
    o_f, _ = _forward(tri, args_f, UNION)
    torch.testing.assert_close(o_f, flat, atol=1e-5, rtol=1e-5)


def test_union_walk_without_free_blocks_keeps_the_band(tri, monkeypatch):
    """Every query near the start (no free block in any row): the union kernel runs, takes no step, and writes
    the band's output and lse back unchanged."""
    seqs = [(40, 3), (47, 5), (30, 2)]
    args = _to(DEVICE, *_case(seqs, 2, "random", seed=5)[:6])
    o_t = _check_against_per_token(tri, monkeypatch, args, want=_reference(*args))
    assert torch.isfinite(o_t).all()


def test_union_walk_through_the_layer_and_autograd(tri, monkeypatch):
    """infllmv2_attention with the default config (selection kernels, band split, union walk of 4 queries; packed
    documents) equals the per-token walk's output (fwd_query_tile 1), and gradients through it (union forward,
    per-token dq backward) equal the per-token walk's."""
    p = SparseParams(block_size=16, kernel_size=8, kernel_stride=4, topk=5, init_blocks=1, window_size=32)
    dp = p.dense_positions
    lens = [dp + 11, 30, dp + 6]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device=DEVICE)
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, sum(lens), h, 16, generator=g).to(DEVICE) for h in (4, 2, 2))
    do = torch.randn(q.shape, generator=g).to(DEVICE)
    res = []
    with monkeypatch.context() as mp:
        union = _Launches(mp, tri, "_sparse_union_fwd_kernel")
        for config in (SparseKernelConfig(fwd_query_tile=1), None):
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            out = infllmv2_attention(*leaves, p, cu_seqlens=cu, kernel_config=config)
            res.append((out.detach(), *torch.autograd.grad(out, leaves, do)))
        assert union.calls == 1, union.calls
    for got, want in zip(res[1], res[0]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_fwd_query_tile_is_validated():
    """1 (the per-token walk) and 4 (the union walk, the default since the H100 measurement) only: 8 and larger
    measured slower, 2 not measured."""
    for bad in (2, 3, 6, 8, 16, 64, 128):
        want = rf"SparseKernelConfig\.fwd_query_tile must be one of \(1, 4\) .*got {bad}$"
        with pytest.raises(ValueError, match=want):
            SparseKernelConfig(fwd_query_tile=bad)
    for bad in (0, True, 4.0, "4"):
        with pytest.raises(ValueError, match="fwd_query_tile"):
            SparseKernelConfig(fwd_query_tile=bad)
    assert SparseKernelConfig().fwd_query_tile == 4          # the union walk is the default
    assert SparseKernelConfig(fwd_query_tile=1).fwd_query_tile == 1


def test_bench_union_walk_variants_pass_their_config(monkeypatch):
    """The sparse bench's `per_token` variant times the attention of all sparse queries and the whole forward with
    its own config (fwd_query_tile 1; the run config's selection for the indices, its attention for the
    difference), and skips the selection fields (it changes no selection setting). References on the CPU."""
    import sala.bench.kernels_sparse as ks

    monkeypatch.setenv("SALA_KERNELS", "reference")
    seen = []
    for name in ("select_blocks", "block_sparse_attention", "infllmv2_attention"):
        real = getattr(ks, name)
        monkeypatch.setattr(ks, name, lambda *a, _n=name, _f=real, **kw: (seen.append((_n, kw["kernel_config"])),
                                                                          _f(*a, **kw))[1])
    monkeypatch.setattr(ks, "bench_ms", lambda fn, warmup=0, rep=0: (fn(), 2.0)[1])
    p = SparseParams(block_size=16, kernel_size=8, kernel_stride=4, topk=2, init_blocks=1, window_size=32)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 120, h, 16, generator=g) for h in (4, 2, 2))
    base = SparseKernelConfig(fwd_warps=8)
    for name in ("per_token",):
        seen.clear()
        res = {"sdpa_fwd_ms": 4.0}
        ks._measure_config_variant(name, 120, p, q, k, v, res, 1, 1, base)
        variant = SparseKernelConfig(fwd_warps=8, fwd_query_tile=1)
        assert seen[0] == ("select_blocks", base), seen
        assert {c for n, c in seen if n == "block_sparse_attention"} == {variant, base}
        assert {c for n, c in seen if n == "infllmv2_attention"} == {variant}
        assert res[f"{name}_attention_fwd_ms"] == 2.0 and res[f"{name}_whole_fwd_ms"] == 2.0
        assert res[f"{name}_attention_max_abs_diff_vs_default"] == 0.0
        assert res[f"{name}_speedup_fwd_vs_sdpa"] == 2.0 and f"{name}_select_ms" not in res
    assert ks.check_variants(["default", "per_token"]) == ["default", "per_token"]
    assert set(ks.CONFIG_VARIANTS) == {"chunk1g", "per_token"}      # the union walk of 4 is the default now


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
def test_gpu_union_walk_matches_per_token_bf16(monkeypatch):
    """The released shape, bf16, 2 batch rows of 701 queries at an unaligned offset (one tile of 4 holds both
    rows' queries): the default union walk's output and lse against the per-token walk's (fwd_query_tile 1), and
    the output against the fp32 reference."""
    from sala.ops.infllmv2 import block_sparse_attention, compress_keys, select_blocks, triton_attention

    monkeypatch.setenv("SALA_KERNELS", "triton")
    g = torch.Generator(device="cuda").manual_seed(4)
    T, Tq = 9000, 701
    q, k, v = (torch.randn(2, n, h, 128, device="cuda", dtype=torch.bfloat16, generator=g)
               for n, h in ((Tq, 32), (T, 2), (T, 2)))
    p = SparseParams()
    off = T - Tq
    idx = select_blocks(q, compress_keys(k, 32, 16), compress_keys(k, 128, 64), p, q_offset=off)
    config, per_token = SparseKernelConfig(), SparseKernelConfig(fwd_query_tile=1)
    assert config.fwd_query_tile == 4
    got = block_sparse_attention(q, k, v, idx, p, q_offset=off, forced_blocks=True, kernel_config=config)
    walk = block_sparse_attention(q, k, v, idx, p, q_offset=off, forced_blocks=True, kernel_config=per_token)
    monkeypatch.setenv("SALA_KERNELS", "reference")
    want = block_sparse_attention(q.float(), k.float(), v.float(), idx, p, q_offset=off)
    assert torch.isfinite(got).all()
    assert ((got.float() - want).norm() / want.norm()) < 1e-2
    assert (got.float() - walk.float()).abs().max() < 2e-2
    monkeypatch.setenv("SALA_KERNELS", "triton")
    pos = (off + torch.arange(Tq, device="cuda")).repeat(2).to(torch.int32)
    kbase = torch.arange(2, device="cuda").repeat_interleave(Tq) * T
    args = (q.reshape(-1, 32, 128), k.reshape(-1, 2, 128), v.reshape(-1, 2, 128), idx, pos, kbase, 64, 128 ** -0.5)
    band = (p.init_blocks, p.local_blocks)
    _, lse_u = triton_attention.sparse_attention_fwd(*args, band=band, config=config)
    _, lse_w = triton_attention.sparse_attention_fwd(*args, band=band, config=per_token)
    torch.testing.assert_close(lse_u, lse_w, atol=1e-3, rtol=1e-4)
