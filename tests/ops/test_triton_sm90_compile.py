"""The sparse, lightning and fused Triton kernels compile for Hopper (sm_90) at the released shape and the default
launch settings, on the CPU.

The interpreter checks semantics but not what only the GPU compiler sees: layouts, software pipelining and shared
memory. `triton.compile` with an explicit sm_90 target runs the whole NVIDIA pipeline (TTGIR, LLVM, ptxas) without
a GPU, so a kernel that would fail to compile, or would need more shared memory than an H100/H200 block may use
(227 KiB), fails here instead of on the borrowed GPU. This uses the installed Triton, which may be newer than the
GPU machine's (its shared-memory use differs between versions: the H200's Triton 3.6 needed 274 KiB for 3 stages x 4
blocks per iteration of the forward walk, 3.9 needs 78 KiB), so passing here is necessary, not sufficient.
Timing is not checked (benchmarks only). On a CPU-only machine the test session interprets Triton kernels
(tests/conftest.py), and an interpreted kernel cannot be compiled: there one test runs this file again in a process
with TRITON_INTERPRET=0.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
from sala.bench.sm90 import SMEM_LIMIT, compile_sm90, lightning_output_kernel_sm90  # noqa: E402
from sala.ops.infllmv2 import SparseKernelConfig, SparseParams, triton_attention, triton_selection, triton_topk  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
compiled = pytest.mark.skipif(INTERPRETED, reason="kernels are interpreted in this session: "
                                                  "test_sm90_compiles_in_a_process_without_the_interpreter runs this")
P = SparseParams()
CFG = SparseKernelConfig()
R = P.block_size // P.kernel_stride
SELECT_CONSTS = dict(G=16, GP=16, BQ=CFG.select_rows // 16, D=128, K1K=P.kernel_size, K1S=P.kernel_stride,
                     K2K=P.k2_kernel, K2S=P.k2_stride, BS=P.block_size, R=R,
                     HALO=(P.kernel_size - 1) // P.kernel_stride, INIT=P.init_blocks, LOCAL=P.local_blocks, BN2=64,
                     NB=CFG.select_k1_tile // R)


@compiled
def test_selection_kernel_compiles_for_sm90():
    k = compile_sm90(triton_selection._block_scores_kernel, {"q_ptr": "*bf16", "k1_ptr": "*bf16", "k2_ptr": "*bf16",
                                                             "pos_ptr": "*i32", "out_ptr": "*fp32"},
                     SELECT_CONSTS, num_warps=CFG.select_warps, num_stages=CFG.select_stages)
    assert 0 < k.metadata.shared <= SMEM_LIMIT
    assert "warp_group_dot" in k.asm["ttgir"]             # the stage-1 products run on Hopper tensor cores


@compiled
@pytest.mark.parametrize("NC", [2048, 4096, 32768])
def test_topk_kernel_compiles_for_sm90(NC):
    K = P.total_blocks
    warps = 4 if NC <= 2048 else 16
    k = compile_sm90(triton_topk._topk_blocks_kernel, {"x_ptr": "*fp32", "out_ptr": "*i32", "lim_ptr": "*i32"},
                     dict(K=K, KP=max(16, 1 << (K - 1).bit_length()), NC=NC, HAS_LIM=True, TILE=0),
                     num_warps=warps)
    assert k.metadata.shared <= SMEM_LIMIT


@compiled
@pytest.mark.parametrize("band", [False, True])
def test_attention_kernels_compile_for_sm90_with_the_default_config(band):
    """The per-token forward and dq walks at the default warps / stages / blocks per iteration (the H200 sweep's
    choice); band: the band kernels (forward and dq) and the walks over the non-forced slots only (the forward's
    with fwd_query_tile 1; the default union walk: test_union_walk_compiles_for_sm90)."""
    kpi = CFG.fwd_blocks_per_iter
    K = P.total_blocks
    fwd = dict(G=16, GP=16, D=128, BS=P.block_size, K=K, KPI=kpi, K0=0, K1=K)
    if band:
        fwd.update(K0=P.init_blocks, K1=K - P.local_blocks - 1, BAND=True, INIT=P.init_blocks,
                   LOCAL=P.local_blocks)
    walks = ((triton_attention._sparse_fwd_kernel, triton_attention._sparse_band_fwd_kernel, "band",
              {"o_ptr": "*bf16", "table_ptr": "*i32"}),
             (triton_attention._sparse_bwd_dq_kernel, triton_attention._sparse_band_bwd_dq_kernel, "band_dq",
              {"do_ptr": "*bf16", "delta_ptr": "*fp32", "dq_ptr": "*bf16"}))
    for walk, band_kernel, prefix, own_ptrs in walks:
        ptrs = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "lse_ptr": "*fp32", "idx_ptr": "*i32",
                "pos_ptr": "*i32", "kbase_ptr": "*i64", **own_ptrs}
        k = compile_sm90(walk, ptrs, fwd, num_warps=CFG.fwd_warps, num_stages=CFG.fwd_stages)
        assert 0 < k.metadata.shared <= SMEM_LIMIT
        if band:
            k = compile_sm90(band_kernel, {n: t for n, t in ptrs.items() if n != "idx_ptr"},
                             dict(G=16, D=128, BS=P.block_size, BM=getattr(CFG, f"{prefix}_rows"), INIT=P.init_blocks,
                                  LOCAL=P.local_blocks), num_warps=getattr(CFG, f"{prefix}_warps"),
                             num_stages=getattr(CFG, f"{prefix}_stages"))
            assert 0 < k.metadata.shared <= SMEM_LIMIT
            assert "warp_group_dot" in k.asm["ttgir"]       # the band tiles run on Hopper tensor cores


@compiled
def test_paged_kernels_compile_for_sm90():
    """The paged forms (PAGED=True: K/V rows through an int32 block table) of the forward walk (band split), the
    band kernel, the split-K decode kernel and the key compression at the released shape and the default launch
    settings."""
    from sala.ops.infllmv2 import triton_compression, triton_decode

    K = P.total_blocks
    ptrs = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "o_ptr": "*bf16", "lse_ptr": "*fp32",
            "idx_ptr": "*i32", "pos_ptr": "*i32", "kbase_ptr": "*i64", "table_ptr": "*i32"}
    k = compile_sm90(triton_attention._sparse_fwd_kernel, ptrs,
                     dict(G=16, GP=16, D=128, BS=P.block_size, K=K, KPI=CFG.fwd_blocks_per_iter, K0=P.init_blocks,
                          K1=K - P.local_blocks - 1, BAND=True, INIT=P.init_blocks, LOCAL=P.local_blocks, PAGED=True),
                     num_warps=CFG.fwd_warps, num_stages=CFG.fwd_stages)
    assert 0 < k.metadata.shared <= SMEM_LIMIT
    k = compile_sm90(triton_attention._sparse_band_fwd_kernel, {n: t for n, t in ptrs.items() if n != "idx_ptr"},
                     dict(G=16, D=128, BS=P.block_size, BM=CFG.band_rows, INIT=P.init_blocks, LOCAL=P.local_blocks,
                          PAGED=True), num_warps=CFG.band_warps, num_stages=CFG.band_stages)
    assert 0 < k.metadata.shared <= SMEM_LIMIT
    assert "warp_group_dot" in k.asm["ttgir"]
    for paged in (False, True):
        k = compile_sm90(triton_decode._sparse_decode_splitk_kernel,
                         {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "po_ptr": "*fp32", "plse_ptr": "*fp32",
                          "idx_ptr": "*i32", "pos_ptr": "*i32", "kbase_ptr": "*i64", "table_ptr": "*i32"},
                         dict(K=K, BPS=3, G=16, GP=16, D=128, BS=P.block_size, PAGED=paged), num_warps=4)
        assert k.metadata.shared <= SMEM_LIMIT
        k = compile_sm90(triton_compression._compress_windows_kernel,
                         {"k_ptr": "*bf16", "out_ptr": "*bf16", "len_ptr": "*i32", "table_ptr": "*i32"},
                         dict(KERNEL=P.kernel_size, STRIDE=P.kernel_stride, D=128, BJ=16, PAGED=paged,
                              BS=P.block_size), num_warps=4)
        assert k.metadata.shared <= SMEM_LIMIT


@compiled
@pytest.mark.parametrize("paged", [False, True])
def test_union_walk_compiles_for_sm90(paged):
    """The union walk (the default `fwd_query_tile` = 4: 4 queries x 16 heads a program, the band split's forward)
    at the released shape, fwd_tile_warps and fwd_tile_stages, contiguous or paged K/V, with the strides of
    [N, 32, 128] / [Nk, 2, 128] inputs (divisible by 16, as Triton specializes them): its counted loop is
    software-pipelined (asynchronous K/V copies) and its products run on Hopper tensor cores."""
    K, M = P.total_blocks, CFG.fwd_query_tile
    k0, k1 = P.init_blocks, K - P.local_blocks - 1
    ptrs = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "o_ptr": "*bf16", "lse_ptr": "*fp32",
            "idx_ptr": "*i32", "pos_ptr": "*i32", "kbase_ptr": "*i64", "table_ptr": "*i32"}
    assert M == 4
    k = compile_sm90(triton_attention._sparse_union_fwd_kernel, ptrs,
                     dict(G=16, GP=triton_attention._union_rows(16, M), M=M, D=128, BS=P.block_size, K0=k0, K1=k1,
                          KP=1 << (k1 - k0 - 1).bit_length(), INIT=P.init_blocks, LOCAL=P.local_blocks,
                          PAGED=paged),
                     num_warps=CFG.fwd_tile_warps, num_stages=CFG.fwd_tile_stages,
                     aligned_ints=("sqn", "sqh", "skn", "skh", "son", "soh"))
    assert 0 < k.metadata.shared <= SMEM_LIMIT
    assert "warp_group_dot" in k.asm["ttgir"] and "async_copy" in k.asm["ttgir"]


@compiled
@pytest.mark.parametrize("add,gate", [(True, False), (False, True)])
def test_fused_norm_kernels_compile_for_sm90(add, gate):
    """The engine's fused elementwise kernels at the released widths (hidden 4096, 32 heads x 128, I 16384)."""
    from sala.ops import fused_triton as ft

    k = compile_sm90(ft._rms_norm_rows_kernel, {p: "*bf16" for p in ("x_ptr", "a_ptr", "g_ptr", "w_ptr", "res_ptr",
                                                                       "out_ptr")},
                     dict(HAS_ADD=add, NORMALIZE=True, HAS_WEIGHT=True, HAS_GATE=gate, BLOCK_N=4096),
                     num_warps=ft._warps(4096))
    assert k.metadata.shared <= SMEM_LIMIT
    k = compile_sm90(ft._qk_norm_rope_kernel, {"x_ptr": "*bf16", "w_ptr": "*bf16", "cos_ptr": "*fp32",
                                               "sin_ptr": "*fp32", "out_ptr": "*bf16"},
                     dict(HAS_WEIGHT=True, HAS_ROPE=True, HALF=64, BLOCK_H=32), num_warps=ft._warps(32 * 128))
    assert k.metadata.shared <= SMEM_LIMIT
    k = compile_sm90(ft._silu_mul_kernel, {"x_ptr": "*bf16", "out_ptr": "*bf16"}, dict(BLOCK_N=2048),
                     num_warps=ft._warps(2048))
    assert k.metadata.shared <= SMEM_LIMIT


@compiled
@pytest.mark.parametrize("factored, reverse", [(False, False), (True, False), (True, True)])
def test_lightning_output_kernel_compiles_for_sm90(factored, reverse):
    """The lightning output kernel at the default launch settings, bf16, with the strides of [T, 32, 128] inputs
    (divisible by 16). Triton 3.6 failed here (PassManager) on an scf.if around the chunk loop's dots."""
    from sala.ops import lightning_triton as lt

    cfg = lt.LightningConfig()
    k = lightning_output_kernel_sm90(cfg.chunk, cfg.block_v, cfg.num_warps, cfg.num_stages, factored=factored,
                                     reverse=reverse)
    assert 0 < k.metadata.shared <= SMEM_LIMIT
    assert "warp_group_dot" in k.asm["ttgir"]


@compiled
def test_lightning_decode_step_kernel_compiles_for_sm90():
    """The decode step kernel (T tokens per row in a loop, the state tile in registers) at the default launch
    settings, bf16 [B, T, 32, 128] inputs."""
    from sala.ops import lightning_triton as lt

    cfg = lt.LightningConfig()
    ptrs = {**{f"{n}_ptr": "*bf16" for n in "qkvo"}, "state_ptr": "*fp32", "log_decay_ptr": "*fp32"}
    k = compile_sm90(lt._decode_step_kernel, ptrs, dict(H=32, DK=128, DV=128, BV=cfg.decode_block_v),
                     num_warps=cfg.decode_num_warps)
    assert k.metadata.shared <= SMEM_LIMIT


@pytest.mark.skipif(not INTERPRETED, reason="this session compiles kernels: the tests above run in it")
def test_sm90_compiles_in_a_process_without_the_interpreter():
    """Every test above, in a pytest process whose Triton kernels are built for compilation."""
    root = Path(__file__).resolve().parents[2]          # tests/ops/<this file>
    env = dict(os.environ, TRITON_INTERPRET="0",
               PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__], env=env,
                          capture_output=True, text=True, timeout=1800, cwd=root)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert done.returncode == 0 and "failed" not in summary and "error" not in summary, done.stdout[-3000:]
    assert "passed" in summary and "1 skipped" in summary, summary      # only this test is skipped there
