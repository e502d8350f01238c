"""Benchmark of InfLLM-V2 sparse attention at the released shape (Hq 32, Hkv 2, d 128, bf16, block 64,
topk 64, window 2048) against torch SDPA dense causal and fla's parallel_nsa, in one process on the GPU.

`python -m sala.bench.kernels_sparse --out FILE [--lengths 32768,65536,...] [--no-fla]
    [--variants default,tiled4,tiled8,splitk]`
Measures per length: the whole sparse attention forward (compression + selection + attention, inference
mode, query-chunked) and forward+backward (training mode), each stage separately, SDPA dense causal forward
(and fwd+bwd) where reasonable, fla parallel_nsa (selected-block attention only, the same block indices), and
the peak GPU memory beyond q, k, v and the output.

Variants (`--variants`, comma separated; `default` = the fields above, always measured): `tiled` / `tiledN`
(SALA_SPARSE_ATTN=tiled with N query tokens per program, N in 1..16) adds `<variant>_*` fields for the same
measurements (whole fwd / fwd+bwd, attention fwd / fwd+bwd, speed-ups vs the same SDPA timings, peak memory,
mean union blocks per tile, max abs difference of the attention output vs the default kernel); `splitk`
(SALA_SPARSE_DECODE=splitk) adds batch-1 decode timings at every length (`decode_ms`, `decode_splitk_ms`, and the
attention part alone: `decode_attention_ms`, `decode_attention_splitk_ms`); `splitsel`
(SALA_SPARSE_DECODE_SELECT=split) adds `splitsel_*` batch-1 decode fields at every length (whole step and
selection alone, default vs split-N selection, and with split-K attention); `fusedvarlen`
(SALA_SPARSE_VARLEN=fused) adds a top-level `fusedvarlen` list: packed training rows (several document-length
mixes) with the per-document path vs the fused one, forward and forward+backward; `topkcompact` and
`branchmask` (TUNING["topk_compact"], TUNING["select_branch_mask"]) add `<variant>_select_ms`,
`<variant>_whole_fwd_ms`, its speed-up vs SDPA and `<variant>_rows_differing_from_default` (last 16K queries);
`noband` (TUNING["band_split"] off: every selected block in the per-token walk) adds the same fields plus
`noband_attention_fwd_ms` and `noband_attention_max_abs_diff_vs_default`; `nobanddq` (TUNING["band_split_dq"]
off: every slot's dq in the per-token walk) adds `nobanddq_whole_fwd_bwd_ms`, `nobanddq_attention_fwd_bwd_ms`
and the fwd+bwd speed-up vs SDPA (T <= 256K); `chunk1g` (TUNING["select_chunk_bytes"] 1 GiB instead of 256 MiB:
at 1M, 8192 instead of 2048 queries per selection launch) adds the selection / whole-forward fields. `attention_*` fields time
`block_sparse_attention(..., forced_blocks=True)`, the path `infllmv2_attention` takes.

Inputs (`--input-smoothing W`, default 1): q, k and v are standard normal; W > 1 averages each over a window of W
tokens (times sqrt(W): unit variance, adjacent tokens correlated (W-1)/W). With random inputs neighbouring queries
select almost disjoint blocks (at 128K an 8-query tile shares 1.12x, on the CPU reference); the bundled model's last
sparse layer on real text shares 2.9x at 18K-32K (bench/studies/selection_overlap_cpu), and W = 16 gives 2.6x at
128K. Query-tiled kernels depend on that overlap; SDPA and the per-query walk's work do not.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import os
import time

import torch

from sala.bench.common import bench_ms, run_metadata, write_json
from sala.ops.dense import dense_causal_attention
from sala.ops.infllmv2 import (SparseParams, block_sparse_attention, compress_keys, infllmv2_attention,
                               select_blocks)

HQ, HKV, D = 32, 2, 128
DEFAULT_LENGTHS = (32768, 65536, 131072, 262144, 524288, 1048576, 2097152)


def smooth_tokens(x: torch.Tensor, window: int, channels_per_pass: int = 512) -> torch.Tensor:
    """x [B, T, H, D] averaged over the last `window` tokens (the first tokens repeat the first value), times
    sqrt(window): unit variance for unit-variance x, adjacent tokens correlated (window - 1) / window. Same dtype;
    computed in fp32, `channels_per_pass` of the H * D channels at a time (bounded extra memory)."""
    if window < 1:
        raise ValueError(f"smooth_tokens: window must be >= 1, got {window}")
    if window == 1:
        return x
    B, T, H, Dh = x.shape
    flat = x.reshape(B, T, H * Dh)
    out = torch.empty_like(flat)
    for c0 in range(0, H * Dh, channels_per_pass):
        y = flat[..., c0:c0 + channels_per_pass].float().transpose(1, 2)                     # [B, C, T]
        y = torch.nn.functional.pad(y, (window - 1, 0), mode="replicate")
        y = torch.nn.functional.avg_pool1d(y, window, stride=1) * window ** 0.5
        out[..., c0:c0 + channels_per_pass] = y.transpose(1, 2).to(x.dtype)
    return out.reshape(B, T, H, Dh)


# variants that only flip env switches (tiledN also sets a tuning value); splitsel_splitk: both decode switches
_SWITCH_VARIANTS = ("default", "splitk", "splitsel", "splitsel_splitk", "fusedvarlen")


@contextlib.contextmanager
def _variant(name: str):
    """Kernel variant `name` (default | tiled | tiledN | splitk) for the duration of the block."""
    from sala.ops.infllmv2 import triton_attention, triton_decode, triton_selection, triton_topk, triton_utils

    envs = ("SALA_SPARSE_ATTN", "SALA_SPARSE_DECODE", "SALA_SPARSE_DECODE_SELECT", "SALA_SPARSE_VARLEN")
    saved_env = {e: os.environ.get(e) for e in envs}
    saved_tm = triton_utils.TUNING["tiled_tokens"]
    try:
        if name not in _SWITCH_VARIANTS and not name.startswith("tiled"):
            raise ValueError(f"unknown variant {name!r} (default, tiled, tiledN, {', '.join(_SWITCH_VARIANTS[1:])})")
        os.environ["SALA_SPARSE_ATTN"] = "tiled" if name.startswith("tiled") else "default"
        # decode: `default` here names the single-program kernels (the library default is now both splits)
        os.environ["SALA_SPARSE_DECODE"] = "splitk" if name in ("splitk", "splitsel_splitk") else "single"
        os.environ["SALA_SPARSE_DECODE_SELECT"] = "split" if name.startswith("splitsel") else "single"
        os.environ["SALA_SPARSE_VARLEN"] = "fused" if name == "fusedvarlen" else "default"
        if name.startswith("tiled") and name != "tiled":
            triton_utils.TUNING["tiled_tokens"] = int(name[5:])
        yield
    finally:
        triton_utils.TUNING["tiled_tokens"] = saved_tm
        for e, v in saved_env.items():
            if v is None:
                os.environ.pop(e, None)
            else:
                os.environ[e] = v


# variants that flip a TUNING value of sala.ops.infllmv2.triton_utils (measured beside the default in the same process)
TUNING_VARIANT_MAX_LEN = 1048576   # longer rows: the default only (one whole forward at 2M takes ~10 s)
_TUNING_VARIANTS = {"topkcompact": ("topk_compact", True), "branchmask": ("select_branch_mask", True),
                    "noband": ("band_split", False), "nobanddq": ("band_split_dq", False),
                    "chunk1g": ("select_chunk_bytes", 1 << 30)}   # 4x larger selection chunks (fewer waves' tails)


# what a variant measures beyond selection and whole forward (attention / fwd_bwd: T <= 256K)
_VARIANT_EXTRAS = {"noband": ("attention",), "nobanddq": ("fwd_bwd",), "chunk1g": ("peak",)}


def _measure_tuning_variant(name: str, T: int, p: SparseParams, q, k, v, res: dict, w: int, r: int) -> None:
    """`<name>_*` fields: selection and whole forward with one TUNING value flipped, and the share of sparse
    queries whose selected blocks differ from the default's (ties at the cut-off aside, ~0); plus the variant's
    extras: the attention alone and its output against the default's, forward+backward, or peak memory."""
    from sala.ops.infllmv2 import triton_attention, triton_decode, triton_selection, triton_topk, triton_utils

    key, value = _TUNING_VARIANTS[name]
    extras = _VARIANT_EXTRAS.get(name, ())
    dp = p.dense_positions
    qs = q[:, dp:]
    with torch.no_grad():
        k1, k2 = compress_keys(k, p.kernel_size, p.kernel_stride), compress_keys(k, p.k2_kernel, p.k2_stride)
        n = min(qs.shape[1], 16384)                       # index comparison on the last 16K queries
        want = select_blocks(qs[:, -n:], k1, k2, p, q_offset=T - n)
        idx = None
        if "attention" in extras and T <= 262144:         # the default's attention output, to compare against
            idx = select_blocks(qs, k1, k2, p, q_offset=dp)
            o_default = block_sparse_attention(qs, k, v, idx, p, q_offset=dp, forced_blocks=True).float()
        with triton_utils.tuning(**{key: value}):
            res[f"{name}_select_ms"] = bench_ms(lambda: select_blocks(qs, k1, k2, p, q_offset=dp), w, r)
            res[f"{name}_whole_fwd_ms"] = bench_ms(lambda: infllmv2_attention(q, k, v, p), w, r)
            got = select_blocks(qs[:, -n:], k1, k2, p, q_offset=T - n)
            res[f"{name}_rows_differing_from_default"] = (got != want).any(-1).float().mean().item()
            if "sdpa_fwd_ms" in res:
                res[f"{name}_speedup_fwd_vs_sdpa"] = res["sdpa_fwd_ms"] / res[f"{name}_whole_fwd_ms"]
            if "peak" in extras and q.is_cuda:
                out = torch.empty_like(q)
                res[f"{name}_whole_fwd_peak_extra_gib"] = _peak_extra_gib(
                    lambda: out.copy_(infllmv2_attention(q, k, v, p)), torch.cuda.memory_allocated())
                del out
            if "fwd_bwd" in extras and T <= 262144:
                with torch.enable_grad():
                    for k_, ms in _fwd_bwd_ms(q, k, v, p, w, r).items():
                        res[f"{name}_{k_}"] = ms
                if "sdpa_fwd_bwd_ms" in res:
                    res[f"{name}_speedup_fwd_bwd_vs_sdpa"] = res["sdpa_fwd_bwd_ms"] / res[f"{name}_whole_fwd_bwd_ms"]
            if idx is not None:
                res[f"{name}_attention_fwd_ms"] = bench_ms(
                    lambda: block_sparse_attention(qs, k, v, idx, p, q_offset=dp, forced_blocks=True), w, r)
                o_v = block_sparse_attention(qs, k, v, idx, p, q_offset=dp, forced_blocks=True).float()
                res[f"{name}_attention_max_abs_diff_vs_default"] = float((o_v - o_default).abs().max())
                del idx, o_v, o_default
        del k1, k2, want


def check_variants(variants) -> list[str]:
    """The validated `--variants` names (blank entries dropped); an unknown name raises ValueError."""
    out = []
    for v in variants:
        v = v.strip()
        if not v:
            continue
        ok = v in ("default", "tiled", "splitk", "splitsel", "fusedvarlen", *_TUNING_VARIANTS) or (
            v.startswith("tiled") and v[5:].isdigit() and 1 <= int(v[5:]) <= 16 and not int(v[5:]) & (int(v[5:]) - 1))
        if not ok:
            raise ValueError(f"--variants: {v!r} is not one of default, tiled, tiledN (N a power of two <= 16), "
                             f"splitk, splitsel, fusedvarlen, {', '.join(_TUNING_VARIANTS)}")
        out.append(v)
    return out


def _measure_tiled(name: str, T: int, p: SparseParams, q, k, v, res: dict, backward: bool, w: int, r: int) -> None:
    """`<name>_*` fields: the tiled kernels at length T (same inputs and SDPA baselines as the default)."""
    from sala.ops.infllmv2 import triton_attention, triton_decode, triton_selection, triton_topk, triton_utils

    dp = p.dense_positions
    with _variant(name), torch.no_grad():
        out = torch.empty_like(q)
        base = torch.cuda.memory_allocated()
        res[f"{name}_whole_fwd_ms"] = bench_ms(lambda: infllmv2_attention(q, k, v, p), w, r)
        res[f"{name}_whole_fwd_peak_extra_gib"] = _peak_extra_gib(
            lambda: out.copy_(infllmv2_attention(q, k, v, p)), base)
        if "sdpa_fwd_ms" in res:
            res[f"{name}_speedup_fwd_vs_sdpa"] = res["sdpa_fwd_ms"] / res[f"{name}_whole_fwd_ms"]
        k1, k2 = compress_keys(k, p.kernel_size, p.kernel_stride), compress_keys(k, p.k2_kernel, p.k2_stride)
        qs = q[:, dp:]
        if T <= 262144:
            idx = select_blocks(qs, k1, k2, p, q_offset=dp)
            res[f"{name}_attention_fwd_ms"] = bench_ms(
                lambda: block_sparse_attention(qs, k, v, idx, p, q_offset=dp), w, r)
            gbase = torch.zeros(idx.shape[2], dtype=torch.int64, device=q.device)
            _, _, count = triton_attention.tile_block_union(idx, gbase, triton_attention._tiled_tokens())
            res[f"{name}_union_blocks_per_tile"] = float(count.float().mean())
            res[f"{name}_tokens_per_tile"] = triton_attention._tiled_tokens()
            o_t = block_sparse_attention(qs, k, v, idx, p, q_offset=dp)
            with _variant("default"):
                o_d = block_sparse_attention(qs, k, v, idx, p, q_offset=dp)
            res[f"{name}_max_abs_diff_vs_default"] = float((o_t.float() - o_d.float()).abs().max())
            del idx, o_t, o_d, gbase
        del k1, k2, out
    if backward:
        with _variant(name):
            for key, ms in _fwd_bwd_ms(q, k, v, p, w, r).items():
                res[f"{name}_{key}"] = ms
            if "sdpa_fwd_bwd_ms" in res:
                res[f"{name}_speedup_fwd_bwd_vs_sdpa"] = res["sdpa_fwd_bwd_ms"] / res[f"{name}_whole_fwd_bwd_ms"]


def _measure_decode(T: int, p: SparseParams, q, k, v, res: dict, w: int, r: int) -> None:
    """Batch-1 decode of the token at position T - 1: default vs split-K (whole step and attention part)."""
    from sala.ops.infllmv2 import reference as ref
    from sala.ops.infllmv2 import triton_attention, triton_decode, triton_selection, triton_topk, triton_utils
    from sala.ops.infllmv2 import infllmv2_decode

    with torch.no_grad():
        k1, k2 = compress_keys(k, p.kernel_size, p.kernel_stride), compress_keys(k, p.k2_kernel, p.k2_stride)
        lens = torch.tensor([T], dtype=torch.int32, device=q.device)
        q1 = q[:, -1].contiguous()
        res["decode_ms"] = bench_ms(lambda: infllmv2_decode(q1, k, v, k1, k2, lens, p), 3, 10)
        with _variant("splitk"):
            res["decode_splitk_ms"] = bench_ms(lambda: infllmv2_decode(q1, k, v, k1, k2, lens, p), 3, 10)
            want = infllmv2_decode(q1, k, v, k1, k2, lens, p)
        with _variant("default"):
            got = infllmv2_decode(q1, k, v, k1, k2, lens, p)
        res["decode_splitk_max_abs_diff_vs_default"] = float((want.float() - got.float()).abs().max())
        pos = torch.tensor([T - 1], dtype=torch.int32, device=q.device)
        pooled = triton_selection.pooled_block_scores_triton(q1[:, None], k1, k2, pos[:, None], p, D ** -0.5,
                                                -(-T // p.block_size))
        idx = ref.topk_block_indices(pooled, p.total_blocks)
        kf, vf = k.reshape(T, HKV, D), v.reshape(T, HKV, D)
        kbase = torch.zeros(1, dtype=torch.int64, device=q.device)
        res["decode_attention_ms"] = bench_ms(
            lambda: triton_attention.sparse_attention_fwd(q1, kf, vf, idx, pos, kbase, p.block_size, D ** -0.5), 3, 10)
        res["decode_attention_splitk_ms"] = bench_ms(
            lambda: triton_decode.sparse_decode_splitk(q1, kf, vf, idx, pos, kbase, p.block_size, D ** -0.5), 3, 10)
        res["decode_splitk_programs"] = HKV * triton_decode.decode_splits(1, HKV, p.total_blocks)[0]
        del k1, k2, pooled, idx


def _measure_decode_select(T: int, p: SparseParams, q, k, v, res: dict) -> None:
    """`splitsel_*`: batch-1 decode of the token at position T - 1 with the split-N selection vs the default one
    (whole step, selection alone incl. top-k, and with split-K attention), all in this process."""
    from sala.ops.infllmv2 import reference as ref
    from sala.ops.infllmv2 import triton_attention, triton_decode, triton_selection, triton_topk, triton_utils
    from sala.ops.infllmv2 import infllmv2_decode

    with torch.no_grad():
        k1, k2 = compress_keys(k, p.kernel_size, p.kernel_stride), compress_keys(k, p.k2_kernel, p.k2_stride)
        lens = torch.tensor([T], dtype=torch.int32, device=q.device)
        q1 = q[:, -1].contiguous()
        pos = lens - 1
        nb = -(-T // p.block_size)
        s = D ** -0.5
        outs = {}
        for name, key in (("default", "splitsel_default_decode_ms"), ("splitsel", "splitsel_decode_ms"),
                          ("splitsel_splitk", "splitsel_decode_splitk_ms")):
            with _variant(name):
                res[key] = bench_ms(lambda: infllmv2_decode(q1, k, v, k1, k2, lens, p), 3, 10)
                outs[name] = infllmv2_decode(q1, k, v, k1, k2, lens, p).float()
        res["splitsel_max_abs_diff_vs_default"] = float((outs["splitsel"] - outs["default"]).abs().max())
        res["splitsel_default_select_ms"] = bench_ms(lambda: ref.topk_block_indices(
            triton_selection.pooled_block_scores_triton(q1[:, None], k1, k2, pos[:, None], p, s, nb), p.total_blocks), 3, 10)
        res["splitsel_select_ms"] = bench_ms(lambda: ref.topk_block_indices(
            triton_decode.pooled_block_scores_decode_split(q1, k1, k2, pos, p, s, nb), p.total_blocks), 3, 10)
        i_d = ref.topk_block_indices(triton_selection.pooled_block_scores_triton(q1[:, None], k1, k2, pos[:, None], p, s, nb),
                                     p.total_blocks)
        i_s = ref.topk_block_indices(triton_decode.pooled_block_scores_decode_split(q1, k1, k2, pos, p, s, nb), p.total_blocks)
        res["splitsel_indices_equal_default"] = bool(torch.equal(i_d, i_s))
        r = p.block_size // p.kernel_stride
        res["splitsel_programs"] = HKV * triton_decode.decode_select_splits(1, HKV, nb, triton_utils.select_nb(r))[0]
        del k1, k2


# packed training rows for `fusedvarlen`: (row length, document length range); lengths drawn with a fixed seed
VARLEN_ROWS = ((8192, 128, 2048), (16384, 256, 4096), (65536, 1024, 16384), (65536, 8192, 32768))


def measure_fused_varlen(rows=VARLEN_ROWS, *, params: SparseParams | None = None, device: str = "cuda",
                         dtype: torch.dtype = torch.bfloat16, heads: tuple[int, int, int] = (HQ, HKV, D)) -> list[dict]:
    """Per-document (`SALA_SPARSE_VARLEN=default`) vs fused packed attention (released head shape and params, bf16,
    unless given: the CPU smoke test of this bench uses tiny ones)."""
    from sala.ops.infllmv2 import varlen as iv

    p = SparseParams() if params is None else params
    hq, hkv, hd = heads
    out = []
    for T, lo, hi in rows:
        g = torch.Generator().manual_seed(T + lo)
        bounds = [0]
        while bounds[-1] < T:
            bounds.append(min(T, bounds[-1] + int(torch.randint(lo, hi + 1, (1,), generator=g))))
        cu = torch.tensor(bounds, dtype=torch.int32, device=device)
        gd = torch.Generator(device=device).manual_seed(T)
        q = torch.randn(1, T, hq, hd, device=device, dtype=dtype, generator=gd)
        k = torch.randn(1, T, hkv, hd, device=device, dtype=dtype, generator=gd)
        v = torch.randn(1, T, hkv, hd, device=device, dtype=dtype, generator=gd)
        do = torch.randn_like(q)
        lens = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
        res = {"T": T, "n_docs": len(lens), "max_doc": max(lens),
               "sparse_queries": sum(max(0, n - p.dense_positions) for n in lens),
               "dense_prefixes_via": iv.dense_route(q, torch.tensor(lens), p)}
        try:
            outs = {}
            for name in ("default", "fusedvarlen"):
                with _variant(name):
                    with torch.no_grad():
                        res[f"{name}_fwd_ms"] = bench_ms(lambda: infllmv2_attention(q, k, v, p, cu_seqlens=cu), 2, 5)
                        outs[name] = infllmv2_attention(q, k, v, p, cu_seqlens=cu).float()
                    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))

                    def fb():
                        o = infllmv2_attention(qg, kg, vg, p, cu_seqlens=cu)
                        torch.autograd.grad(o, (qg, kg, vg), do)

                    res[f"{name}_fwd_bwd_ms"] = bench_ms(fb, 2, 5)
                    del qg, kg, vg
            res["speedup_fwd"] = res["default_fwd_ms"] / res["fusedvarlen_fwd_ms"]
            res["speedup_fwd_bwd"] = res["default_fwd_bwd_ms"] / res["fusedvarlen_fwd_bwd_ms"]
            res["max_abs_diff_fwd"] = float((outs["default"] - outs["fusedvarlen"]).abs().max())
        except Exception as ex:  # recorded, not fatal: the other measurements still land in the JSON
            res["error"] = repr(ex)[:300]
        out.append(res)
        print("fusedvarlen", {a: (round(b, 3) if isinstance(b, float) else b) for a, b in res.items()}, flush=True)
        del q, k, v, do
        gc.collect()
        if device != "cpu":
            torch.cuda.empty_cache()
    return out


def _reps(T: int) -> tuple[int, int]:
    return (1, 3) if T >= 262144 else (2, 5)


def _fwd_bwd_ms(q, k, v, p: SparseParams, w: int, r: int, with_sdpa: bool = False) -> dict:
    """Forward+backward medians (ms) of the whole sparse attention, of the block-sparse attention of the sparse
    queries alone, and optionally of dense SDPA, on the same inputs and output gradient."""
    dp = p.dense_positions
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    do = torch.randn_like(q)

    def timed(fn, grad_out) -> float:
        return bench_ms(lambda: torch.autograd.grad(fn(), (qg, kg, vg), grad_out), w, r)

    out = {"whole_fwd_bwd_ms": timed(lambda: infllmv2_attention(qg, kg, vg, p), do)}
    k1, k2 = compress_keys(k, p.kernel_size, p.kernel_stride), compress_keys(k, p.k2_kernel, p.k2_stride)
    qs = qg[:, dp:]
    idx = select_blocks(qs.detach(), k1, k2, p, q_offset=dp)
    out["attention_fwd_bwd_ms"] = timed(lambda: block_sparse_attention(qs, kg, vg, idx, p, q_offset=dp,
                                                                       forced_blocks=True), do[:, dp:])
    if with_sdpa:
        out["sdpa_fwd_bwd_ms"] = timed(lambda: dense_causal_attention(qg, kg, vg), do)
    return out


def _peak_extra_gib(fn, base_bytes: int) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base_bytes) / 2**30


def _measure(T: int, p: SparseParams, with_fla: bool, backward: bool, dense_fwd_max: int,
             dense_bwd_max: int, variants=("default",), input_smoothing: int = 1,
             attention_max_len: int = 262144) -> dict:
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(T)
    q, k, v = (smooth_tokens(torch.randn(1, T, h, D, device=dev, dtype=torch.bfloat16, generator=g), input_smoothing)
               for h in (HQ, HKV, HKV))
    gc.collect()
    torch.cuda.empty_cache()
    w, r = _reps(T)
    res: dict = {"T": T}
    dp = p.dense_positions

    with torch.no_grad():
        out = torch.empty_like(q)
        base = torch.cuda.memory_allocated()
        res["whole_fwd_ms"] = bench_ms(lambda: infllmv2_attention(q, k, v, p), w, r)
        res["whole_fwd_peak_extra_gib"] = _peak_extra_gib(lambda: out.copy_(infllmv2_attention(q, k, v, p)), base)
        # the op returns its own output tensor, which that peak includes: the budget excludes it
        res["whole_fwd_output_gib"] = q.numel() * q.element_size() / 2**30
        res["whole_fwd_peak_extra_beyond_output_gib"] = res["whole_fwd_peak_extra_gib"] - res["whole_fwd_output_gib"]
        res["compress_ms"] = bench_ms(lambda: (compress_keys(k, p.kernel_size, p.kernel_stride),
                                               compress_keys(k, p.k2_kernel, p.k2_stride)), w, r)
        k1, k2 = compress_keys(k, p.kernel_size, p.kernel_stride), compress_keys(k, p.k2_kernel, p.k2_stride)
        qs = q[:, dp:]
        res["select_ms"] = bench_ms(lambda: select_blocks(qs, k1, k2, p, q_offset=dp), w, r)
        res["dense_part_ms"] = bench_ms(lambda: dense_causal_attention(q[:, :dp], k[:, :dp], v[:, :dp]), w, r)
        if T == min(DEFAULT_LENGTHS):   # dense fallback: SDPA vs the block-sparse kernel with every block kept
            idx_d = select_blocks(q[:, :dp], k1, k2, p, q_offset=0)
            res["dense_part_via_sparse_kernel_ms"] = bench_ms(
                lambda: block_sparse_attention(q[:, :dp], k, v, idx_d, p, q_offset=0), w, r)
        if T <= max(262144, attention_max_len):   # block indices of all sparse queries at once: 0.8 KiB/token
            idx = select_blocks(qs, k1, k2, p, q_offset=dp)
            res["attention_fwd_ms"] = bench_ms(
                lambda: block_sparse_attention(qs, k, v, idx, p, q_offset=dp, forced_blocks=True), w, r)
            del idx
        if T <= dense_fwd_max:
            res["sdpa_fwd_ms"] = bench_ms(lambda: dense_causal_attention(q, k, v), w, r)
            res["speedup_fwd_vs_sdpa"] = res["sdpa_fwd_ms"] / res["whole_fwd_ms"]
        if with_fla and T <= 262144:
            try:
                from fla.ops.nsa import parallel_nsa

                full_idx = select_blocks(q, k1, k2, p, q_offset=0).permute(0, 2, 1, 3).to(torch.int64).contiguous()
                res["fla_nsa_fwd_ms"] = bench_ms(lambda: parallel_nsa(q, k, v, block_indices=full_idx,
                                                                      block_counts=p.total_blocks,
                                                                      block_size=p.block_size, window_size=0), w, r)
                idx_all = full_idx.permute(0, 2, 1, 3).to(torch.int32).contiguous()
                res["attention_full_T_fwd_ms"] = bench_ms(
                    lambda: block_sparse_attention(q, k, v, idx_all, p, q_offset=0), w, r)
                del full_idx, idx_all
            except Exception as ex:  # fla missing or failing: recorded, not fatal
                res["fla_nsa_error"] = repr(ex)[:300]
        del k1, k2, out
    if backward:
        res.update(_fwd_bwd_ms(q, k, v, p, w, r, with_sdpa=T <= dense_bwd_max))
        if "sdpa_fwd_bwd_ms" in res:
            res["speedup_fwd_bwd_vs_sdpa"] = res["sdpa_fwd_bwd_ms"] / res["whole_fwd_bwd_ms"]
    for name in variants:
        if name.startswith("tiled"):
            try:
                _measure_tiled(name, T, p, q, k, v, res, backward, w, r)
            except torch.cuda.OutOfMemoryError as ex:
                res[f"{name}_error"] = "OOM: " + str(ex)[:200]
                gc.collect()
                torch.cuda.empty_cache()
        elif name == "splitk":
            _measure_decode(T, p, q, k, v, res, w, r)
        elif name == "splitsel":
            _measure_decode_select(T, p, q, k, v, res)
        elif name in _TUNING_VARIANTS and T <= TUNING_VARIANT_MAX_LEN:
            _measure_tuning_variant(name, T, p, q, k, v, res, w, r)
    del q, k, v
    gc.collect()
    torch.cuda.empty_cache()
    return res


# (rows, K1 tile, warps, stages, branch mask: visibility masks only on tiles some row does not see in full)
SELECT_CONFIGS = [(128, 64, 8, None, False), (128, 64, 8, 2, False), (128, 64, 8, 3, False), (64, 64, 4, None, False),
                  (64, 64, 4, 3, False), (128, 128, 8, 2, False), (64, 128, 4, 2, False), (32, 64, 4, 3, False)]
FWD_CONFIGS = [(4, None, 1), (4, 3, 1), (2, 3, 1), (4, 2, 2), (4, 3, 2), (8, 3, 2), (4, 2, 4), (8, 2, 2), (8, 2, 4),
               (4, 1, 2)]   # (warps, stages, blocks per iteration); 3 stages x 4 blocks exceeds shared memory
BAND_CONFIGS = [(64, 4, 2), (64, 4, 3), (128, 8, 2), (128, 8, 3), (64, 8, 3), (128, 4, 2)]   # (rows, warps, stages)


def _sweep_attention(configs, apply, attend, ref, log: list, warmup: int, rep: int):
    """Time attend() under each config (apply(cfg) sets TUNING) and log it with its max abs difference from ref
    (the first config's output when ref is None). Returns (the fastest config within 1e-2 of ref or None, ref)."""
    best = (float("inf"), None)
    for cfg in configs:
        apply(cfg)
        try:
            ms = bench_ms(attend, warmup, rep)
            o = attend()
        except Exception as ex:
            log.append({"config": list(cfg), "error": repr(ex)[:200]})
            continue
        ref = o if ref is None else ref
        diff = (o.float() - ref.float()).abs().max().item()
        log.append({"config": list(cfg), "ms": ms, "max_abs_diff_vs_first": diff})
        del o
        if diff < 1e-2:
            best = min(best, (ms, tuple(cfg)), key=lambda x: x[0])
    return best[1], ref


def sweep(T: int = 131072, *, device: str = "cuda", params: SparseParams | None = None,
          heads: tuple[int, int, int] = (HQ, HKV, D), select_configs=None, fwd_configs=None, band_configs=None,
          dtype: torch.dtype = torch.bfloat16, warmup: int = 1, rep: int = 3) -> dict:
    """Time the selection and attention kernels under several launch settings at length T; keep the fastest
    whose output matches the first setting's (in sala.ops.infllmv2.triton_utils.TUNING, for the rest of this process).
    heads: (query heads, KV heads, head dim). CPU (interpreter) use is for tests with tiny shapes."""
    from sala.ops.infllmv2 import triton_attention, triton_decode, triton_selection, triton_topk, triton_utils

    p = params or SparseParams()
    dev = device
    hq, hkv, d = heads
    g = torch.Generator(device=dev).manual_seed(1)
    q = torch.randn(1, T, hq, d, device=dev, dtype=dtype, generator=g)
    k = torch.randn(1, T, hkv, d, device=dev, dtype=dtype, generator=g)
    v = torch.randn(1, T, hkv, d, device=dev, dtype=dtype, generator=g)
    dp = p.dense_positions
    k1, k2 = compress_keys(k, p.kernel_size, p.kernel_stride), compress_keys(k, p.k2_kernel, p.k2_stride)
    qs = q[:, dp:]
    out = {"T": T, "select": [], "attention_fwd": [], "band": []}
    best = (float("inf"), None)
    want = None
    for cfg in select_configs or SELECT_CONFIGS:
        rows, tile, warps, stages, branch = cfg
        triton_utils.TUNING.update(select_rows=rows, select_k1_tile=tile, select_warps=warps, select_stages=stages,
                          select_branch_mask=branch)
        try:
            ms = bench_ms(lambda: select_blocks(qs, k1, k2, p, q_offset=dp), warmup, rep)
            got = select_blocks(qs, k1, k2, p, q_offset=dp)
        except Exception as ex:
            out["select"].append({"config": list(cfg), "error": repr(ex)[:200]})
            continue
        want = got if want is None else want
        rows_differ = (got != want).any(-1).float().mean().item()   # ties at the cut-off aside, near 0
        out["select"].append({"config": list(cfg), "ms": ms, "rows_differing_from_first": rows_differ})
        if rows_differ < 0.01:
            best = min(best, (ms, cfg), key=lambda x: x[0])
    rows, tile, warps, stages, branch = best[1]
    triton_utils.TUNING.update(select_rows=rows, select_k1_tile=tile, select_warps=warps, select_stages=stages,
                      select_branch_mask=branch)
    idx = select_blocks(qs, k1, k2, p, q_offset=dp)

    def attend():
        return block_sparse_attention(qs, k, v, idx, p, q_offset=dp, forced_blocks=True)

    def set_fwd(cfg):
        triton_utils.TUNING.update(fwd_warps=cfg[0], fwd_stages=cfg[1], fwd_blocks_per_iter=cfg[2])

    def set_band(cfg):
        triton_utils.TUNING.update(band_rows=cfg[0], band_warps=cfg[1], band_stages=cfg[2])

    best, ref_out = _sweep_attention(fwd_configs or FWD_CONFIGS, set_fwd, attend, None, out["attention_fwd"],
                                     warmup, rep)
    set_fwd(best)
    if triton_utils.TUNING["band_split"]:
        best, _ = _sweep_attention(band_configs or BAND_CONFIGS, set_band, attend, ref_out, out["band"], warmup, rep)
        if best is not None:
            set_band(best)
    out["chosen"] = dict(triton_utils.TUNING)
    print("sweep", out, flush=True)
    del q, k, v, k1, k2, idx
    if dev == "cuda":
        torch.cuda.empty_cache()
    return out


def run(lengths=DEFAULT_LENGTHS, out_path: str | None = None, with_fla: bool = True,
        backward_max_len: int = 1048576, dense_fwd_max: int = 262144, dense_bwd_max: int = 131072,
        time_budget_s: float = 420.0, tune: bool = False, variants=("default",), input_smoothing: int = 1) -> dict:
    """Measure every length (stopping when `time_budget_s` is spent); returns and optionally writes the JSON."""
    if not torch.cuda.is_available():
        raise RuntimeError("sala.bench.kernels_sparse needs a CUDA GPU")
    p = SparseParams()
    variants = check_variants(variants)
    payload = {"meta": run_metadata(), "op": "infllmv2_sparse_attention",
               "shape": {"Hq": HQ, "Hkv": HKV, "head_dim": D, "dtype": "bfloat16", "batch": 1,
                         "params": {"block_size": p.block_size, "kernel_size": p.kernel_size,
                                    "kernel_stride": p.kernel_stride, "topk": p.topk, "init_blocks": p.init_blocks,
                                    "window_size": p.window_size, "total_blocks": p.total_blocks,
                                    "dense_positions": p.dense_positions}},
               "input_smoothing": input_smoothing,
               "notes": "times are medians in ms (CUDA events); whole_fwd = inference (no grad, query-chunked); "
                        "peak extra = max allocated beyond q, k, v and the output; fla = parallel_nsa selected "
                        "branch only with our block indices (same selected tokens)",
               "results": []}
    if tune:
        payload["tuning_sweep"] = sweep()
    from sala.ops.infllmv2 import triton_attention, triton_decode, triton_selection, triton_topk, triton_utils

    payload["tuning"] = dict(triton_utils.TUNING)
    if variants != ["default"]:
        payload["variants"] = variants
    t0 = time.time()
    if "fusedvarlen" in variants:
        payload["fusedvarlen"] = measure_fused_varlen()
        if out_path:
            write_json(out_path, payload)
    for T in lengths:
        if time.time() - t0 > time_budget_s:
            payload["results"].append({"T": T, "skipped": "time budget"})
            continue
        try:
            res = _measure(T, p, with_fla, T <= backward_max_len, dense_fwd_max, dense_bwd_max, variants,
                           input_smoothing, attention_max_len=backward_max_len)
        except torch.cuda.OutOfMemoryError as ex:
            res = {"T": T, "error": "OOM: " + str(ex)[:200]}
            gc.collect()
            torch.cuda.empty_cache()
        res["elapsed_s"] = round(time.time() - t0, 1)
        payload["results"].append(res)
        print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in res.items()}, flush=True)
        if out_path:
            write_json(out_path, payload)
    return payload


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON output path")
    ap.add_argument("--lengths", default=",".join(str(x) for x in DEFAULT_LENGTHS))
    ap.add_argument("--no-fla", action="store_true")
    ap.add_argument("--backward-max-len", type=int, default=1048576,
                    help="longest T whose attention forward and forward+backward are timed (the whole forward: all)")
    ap.add_argument("--time-budget-s", type=float, default=420.0)
    ap.add_argument("--tune", action="store_true", help="sweep kernel launch settings at 128K first")
    ap.add_argument("--variants", default="default",
                    help="comma-separated kernel variants to measure side by side: default, tiled, tiledN "
                         "(N tokens per program), splitk (decode attention), splitsel (decode selection), "
                         "fusedvarlen (packed training rows)")
    ap.add_argument("--input-smoothing", type=int, default=1,
                    help="average q, k, v over this many tokens (1: independent random tokens; see the module doc)")
    a = ap.parse_args(argv)
    if a.input_smoothing < 1:
        ap.error(f"--input-smoothing must be >= 1, got {a.input_smoothing}")
    run([int(x) for x in a.lengths.split(",")], a.out, with_fla=not a.no_fla,
        backward_max_len=a.backward_max_len, time_budget_s=a.time_budget_s, tune=a.tune,
        variants=check_variants(a.variants.split(",")), input_smoothing=a.input_smoothing)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
