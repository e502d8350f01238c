"""Shared pieces of the InfLLM-V2 Triton kernels: launch settings, small helpers and the online-softmax step."""
from __future__ import annotations

import contextlib

import triton
import triton.language as tl
from sala.ops.dispatch import interpreter_enabled

LOG2E = 1.4426950408889634

# Widest rows (blocks) `topk_blocks_triton` takes by default (TUNING["topk_max_cols"]); wider rows go to
# torch.topk, which measured faster there (H200, bench/results/profile_selection*_h200.json: 6.5 vs 14.4 ms for
# all rows at 2048 columns, 583 vs 480 ms at 16384 with all 31 counting passes, before the early exit).
TOPK_MAX_COLS = 4096

# GPU launch settings (the interpreter uses small fixed tiles). Benchmarks may override them in process
# (`tuning(...)`).
TUNING = {
    "select_rows": 128,        # query rows (tokens x padded group heads) per selection program
    "select_k1_tile": 64,      # K1 columns per iteration (a multiple of block_size / kernel_stride)
    "select_warps": 8,
    "select_stages": 3,        # H200 sweep at 128K (bench/results/sparse_kernels_h200.json): 28.8 ms, default 29.0
    "select_chunk_bytes": 256 << 20,   # pooled-score buffer per query chunk (fp32). 1 GiB measured 5.6% faster
                                       # at 1M but took the peak to 2.03 GiB beyond the output (limit 2 GiB)
    "topk_early_exit": True,   # stop the top-k bisection once exactly K values reach the cut-off (H200, selection
                               # 21.7 vs 23.5 ms at 128K, 91.3 vs 95.9 at 256K: profile_selection_h200.json)
    "topk_max_cols": TOPK_MAX_COLS,  # widest rows for the top-k kernel; wider ones use torch.topk
    "topk_compact": False,   # top-k by group-max bound + candidate sort (few passes): measured slower on the H200
                             # (selection 33.7 vs 29.0 ms at 128K, 2248 vs 1912 ms at 1M: sparse_kernels_h200.json)
    "select_split_k2": True,   # K2 pass: unmasked loop over tiles all rows see, then a masked, unpipelined tail
    "select_mask_after_sum": True,  # K1 pass: visibility mask on the per-token head sums (16x fewer selects)
    "select_pool_gather": True,  # K1 pass: block max by register splits, halo shift by tl.gather (409 instead of
                                 # 592 SASS instructions per thread and tile; selection 21.7 vs 26.8 ms at 128K,
                                 # 1548 vs 1870 at 1M on the H200: profile_selection_h200.json)
    "select_branch_mask": False,  # visibility masks only on tiles some row does not see in full (a branch per tile
                                  # in one loop); needs Triton >= 3.9, so unmeasured on the H200 (Triton 3.6)
    "band_split": True,        # forced blocks (init + local band) as dense query tiles, the rest per token:
                               # attention 77.9 vs 96.5 ms at 128K on the H200 (sparse_kernels_h200.json, noband_*)
    "band_rows": 128,          # queries per band program (x one query head); the same sweep: 128 rows, 8 warps,
    "band_warps": 8,           # 3 stages 77.6 ms, 64 / 4 / 2 78.1 ms (within noise)
    "band_stages": 3,
    "band_split_dq": True,     # the same split for dq: forced blocks' dq by dense query tiles, the rest per token
    "band_dq_rows": 64,        # (H200, same run: whole fwd+bwd 311.9 vs 335.0 ms at 128K, 6-8% less 32K..256K)
    "band_dq_warps": 4,
    "band_dq_stages": 2,
    "fwd_warps": 4,
    "fwd_stages": 2,           # H200 sweep at 128K (bench/results/sparse_kernels_h200.json): 96 ms with 2 stages
    "fwd_blocks_per_iter": 2,  # and 2 blocks per iteration, 119 ms with Triton's default and 1 (forward and dq)
    "tiled_tokens": 8,         # query tokens per program of the tiled kernels (rows = tokens x 16 heads), <= 16
    "tiled_warps": 8,
    "tiled_stages": None,
    "decode_min_programs": 64,  # split-K decode: splits chosen so B * Hkv * splits >= this (when K allows)
    "decode_select_programs": 256,  # split-N decode selection: programs per launch >= this (when N allows)
}


@contextlib.contextmanager
def tuning(**values):
    """These TUNING values inside the block, the previous ones after it (unknown keys raise ValueError)."""
    unknown = sorted(set(values) - set(TUNING))
    if unknown:
        raise ValueError(f"unknown TUNING keys {unknown} (keys: {', '.join(sorted(TUNING))})")
    saved = {key: TUNING[key] for key in values}
    TUNING.update(values)
    try:
        yield
    finally:
        TUNING.update(saved)


def launch_stages(key: str) -> dict:
    v = TUNING[key]
    return {} if v is None or interpreter_enabled() else {"num_stages": v}


# Triton 3.6 (the H200 machine's) fails in its software pipeliner on the branch-masked selection kernel
# (bench/results/gpu_tests_sparse_h200.log, 2026-12-02); 3.9 compiles it (tests/test_triton_sm90_compile.py).
BRANCH_MASK_MIN_TRITON = (3, 9)


def triton_version() -> tuple[int, int]:
    major, minor = (int(x) for x in triton.__version__.split(".")[:2])
    return major, minor


def branch_mask() -> bool:
    """TUNING["select_branch_mask"], refused with a clear error where the installed Triton cannot compile it."""
    if not TUNING["select_branch_mask"]:
        return False
    if not interpreter_enabled() and triton_version() < BRANCH_MASK_MIN_TRITON:
        raise RuntimeError(f"TUNING['select_branch_mask'] needs Triton >= {'.'.join(map(str, BRANCH_MASK_MIN_TRITON))} "
                           f"(Triton {triton.__version__}'s pipeliner fails on that kernel); set it to False")
    return True


def check_selection(r: int, halo: int, D: int, scale: float) -> None:
    """What the stage-1 kernels need: r = block_size / kernel_stride a power of two, halo windows <= r, head_dim a
    power of two >= 16, and a positive softmax scale (they take row maxima of unscaled scores)."""
    if halo > r or r & (r - 1) or D & (D - 1) or D < 16:
        raise ValueError(f"infllmv2 Triton selection needs block_size/kernel_stride a power of two ({r}), "
                         f"(kernel_size-1)//kernel_stride <= that ({halo}), head_dim a power of two >= 16 ({D})")
    if not scale > 0:
        raise ValueError(f"infllmv2 selection: the softmax scale must be > 0, got {scale}")


def select_masks() -> dict:
    """The stage-1 kernel's constexprs from TUNING (select_split_k2, select_mask_after_sum, select_pool_gather);
    the branch variant takes the old path for the first two."""
    branch = bool(TUNING["select_branch_mask"])
    return dict(SPLIT_K2=bool(TUNING["select_split_k2"]) and not branch,
                MASK_AFTER_SUM=bool(TUNING["select_mask_after_sum"]) and not branch,
                POOL_GATHER=bool(TUNING["select_pool_gather"]))


def pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())



def select_nb(r: int) -> int:
    """Blocks per K1 tile of the selection kernels (tile = NB * r K1 columns)."""
    return max(16 // r, 2) if interpreter_enabled() else max(TUNING["select_k1_tile"] // r, 2)


def k2_tile() -> int:
    """K2 columns per tile of the selection kernels, prefill and split decode (16 in the interpreter)."""
    return 16 if interpreter_enabled() else 64


@triton.jit
def online_softmax(s, m, l):
    """One key tile of an online softmax (exp2 domain): scores s [M, N] (-inf = masked), running max m and sum l
    [M] -> (new max, factor alpha that rescales the old accumulator, probabilities p [M, N], new sum)."""
    m_new = tl.maximum(m, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    return m_new, alpha, p, l * alpha + tl.sum(p, axis=1)


