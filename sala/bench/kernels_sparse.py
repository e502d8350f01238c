"""Benchmark of InfLLM-V2 sparse attention at the released shape (Hq 32, Hkv 2, d 128, bf16, block 64,
topk 64, window 2048) against torch SDPA dense causal and fla's parallel_nsa, in one process on the GPU.

`python -m sala.bench.kernels_sparse --out FILE [--lengths 32768,65536,...] [--no-fla] [--tune]
    [--variants default,chunk1g,per_token,decode] [--input-smoothing W]`
Measures per length: the whole sparse attention forward (compression + selection + attention, inference
mode, query-chunked) and forward+backward (training mode), each stage separately, SDPA dense causal forward
(and fwd+bwd) where reasonable, fla parallel_nsa (selected-block attention only, the same block indices), and
the peak GPU memory beyond q, k, v and the output.

Every op runs with one `SparseKernelConfig` passed as `kernel_config=` (the defaults, or with `--tune` the
fastest launch settings of a sweep at 128K, recorded under `kernel_config`); nothing global is changed.
Variants (`--variants`, comma separated; `default` = the fields above, always measured): `chunk1g` (the same
config with `select_chunk_bytes` 1 GiB instead of 256 MiB: fewer, larger selection launches) adds
`chunk1g_select_ms`, `chunk1g_whole_fwd_ms`, its speed-up vs SDPA, `chunk1g_rows_differing_from_default` (last
16K queries; 0 under the tie rule) and `chunk1g_whole_fwd_peak_extra_gib`; `per_token` (`fwd_query_tile` 1:
each query's free selected blocks walked per token, instead of the default union walk over 4 neighbouring
queries) adds `<name>_attention_fwd_ms` (beside `attention_fwd_ms`, at the lengths where that is timed),
`<name>_attention_max_abs_diff_vs_default`, `<name>_whole_fwd_ms`, its speed-up vs SDPA and peak memory (a
variant that changes no selection setting skips the selection fields); `decode` adds batch-1 decode of the last
token (`decode_ms`, `decode_select_ms`, `decode_attention_ms`). `attention_*` fields time
`block_sparse_attention(..., forced_blocks=True)`, the path `infllmv2_attention` takes.

Inputs (`--input-smoothing W`, default 1): q, k and v are standard normal; W > 1 averages each over a window of W
tokens (times sqrt(W): unit variance, adjacent tokens correlated (W-1)/W), closer to the selection overlap of
neighbouring queries on real text (bench/studies/selection_overlap_cpu).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import time

import torch

from sala.bench.common import bench_ms, run_metadata, write_json
from sala.ops.dense import dense_causal_attention
from sala.ops.infllmv2 import (
    SparseKernelConfig,
    SparseParams,
    block_sparse_attention,
    compress_keys,
    infllmv2_attention,
    infllmv2_decode,
    select_blocks,
)
from sala.ops.infllmv2.decode import decode_select_blocks

logger = logging.getLogger(__name__)

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


# variants measured beside the default in the same process: a launch setting changed from the run's config
VARIANT_MAX_LEN = 1048576   # longer rows: the default only
CONFIG_VARIANTS = {"chunk1g": {"select_chunk_bytes": 1 << 30},   # 4x larger selection chunks (fewer waves' tails)
                   # the per-token walk instead of the default union walk over 4 neighbouring queries
                   "per_token": {"fwd_query_tile": 1}}
VARIANTS = ("default", "decode", *CONFIG_VARIANTS)


def check_variants(variants) -> list[str]:
    """The variant names, validated (a one-line error names the unknown ones and the choices)."""
    names = [v.strip() for v in variants if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown} (choose from {', '.join(VARIANTS)})")
    return names or ["default"]


def _measure_config_variant(name: str, T: int, p: SparseParams, q, k, v, res: dict, w: int, r: int,
                            config: SparseKernelConfig, attention_max_len: int = 262144) -> None:
    """`<name>_*` fields: whole forward and peak memory with the variant's launch settings; if it changes a
    selection setting, the selection time and the share of sparse queries whose selected blocks differ from the
    run config's (last 16K queries); if it changes an attention setting (fwd_* / band_*), the attention of all
    sparse queries (T <= max(262144, attention_max_len), as `attention_fwd_ms`) and its largest difference from
    the run config's output."""
    changes = CONFIG_VARIANTS[name]
    cfg = dataclasses.replace(config, **changes)
    dp = p.dense_positions
    qs = q[:, dp:]
    with torch.no_grad():
        k1, k2 = compress_keys(k, p.kernel_size, p.kernel_stride), compress_keys(k, p.k2_kernel, p.k2_stride)
        if any(f.startswith("select_") for f in changes):
            n = min(qs.shape[1], 16384)
            want = select_blocks(qs[:, -n:], k1, k2, p, q_offset=T - n, kernel_config=config)
            res[f"{name}_select_ms"] = bench_ms(lambda: select_blocks(qs, k1, k2, p, q_offset=dp, kernel_config=cfg),
                                                w, r)
            got = select_blocks(qs[:, -n:], k1, k2, p, q_offset=T - n, kernel_config=cfg)
            res[f"{name}_rows_differing_from_default"] = (got != want).any(-1).float().mean().item()
            want = got = None  # free the memory
        if any(f.startswith(("fwd_", "band_")) for f in changes) and T <= max(262144, attention_max_len):
            idx = select_blocks(qs, k1, k2, p, q_offset=dp, kernel_config=config)

            def attend(c: SparseKernelConfig) -> torch.Tensor:
                return block_sparse_attention(qs, k, v, idx, p, q_offset=dp, forced_blocks=True, kernel_config=c)

            res[f"{name}_attention_fwd_ms"] = bench_ms(lambda: attend(cfg), w, r)
            res[f"{name}_attention_max_abs_diff_vs_default"] = (attend(cfg).float() - attend(config).float()).abs(
            ).max().item()
            idx = None  # free the memory
        res[f"{name}_whole_fwd_ms"] = bench_ms(lambda: infllmv2_attention(q, k, v, p, kernel_config=cfg), w, r)
        if "sdpa_fwd_ms" in res:
            res[f"{name}_speedup_fwd_vs_sdpa"] = res["sdpa_fwd_ms"] / res[f"{name}_whole_fwd_ms"]
        if q.is_cuda:
            out = torch.empty_like(q)
            res[f"{name}_whole_fwd_peak_extra_gib"] = _peak_extra_gib(
                lambda: out.copy_(infllmv2_attention(q, k, v, p, kernel_config=cfg)), torch.cuda.memory_allocated())
            out = None  # free the memory
        k1 = k2 = None  # free the memory
def _measure_decode(T: int, p: SparseParams, q, k, v, res: dict, config: SparseKernelConfig) -> None:
    """Batch-1 decode of the token at position T - 1 (cache capacity T): whole step, selection alone and the
    attention part (step minus selection)."""
    with torch.no_grad():
        k1, k2 = compress_keys(k, p.kernel_size, p.kernel_stride), compress_keys(k, p.k2_kernel, p.k2_stride)
        lens = torch.tensor([T], dtype=torch.int32, device=q.device)
        q1 = q[:, -1].contiguous()
        res["decode_ms"] = bench_ms(lambda: infllmv2_decode(q1, k, v, k1, k2, lens, p, kernel_config=config), 3, 10)
        res["decode_select_ms"] = bench_ms(lambda: decode_select_blocks(
            q1, k1, k2, lens, p, -(-T // p.block_size), kernel_config=config), 3, 10)
        res["decode_attention_ms"] = res["decode_ms"] - res["decode_select_ms"]
        k1 = k2 = None  # free the memory
def _reps(T: int) -> tuple[int, int]:
    return (1, 3) if T >= 262144 else (2, 5)


def _fwd_bwd_ms(q, k, v, p: SparseParams, w: int, r: int, with_sdpa: bool = False,
               config: SparseKernelConfig | None = None) -> dict:
    """Forward+backward medians (ms) of the whole sparse attention, of the block-sparse attention of the sparse
    queries alone, and optionally of dense SDPA, on the same inputs and output gradient."""
    dp = p.dense_positions
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    do = torch.randn_like(q)

    def timed(fn, grad_out) -> float:
        return bench_ms(lambda: torch.autograd.grad(fn(), (qg, kg, vg), grad_out), w, r)

    out = {"whole_fwd_bwd_ms": timed(lambda: infllmv2_attention(qg, kg, vg, p, kernel_config=config), do)}
    k1, k2 = compress_keys(k, p.kernel_size, p.kernel_stride), compress_keys(k, p.k2_kernel, p.k2_stride)
    qs = qg[:, dp:]
    idx = select_blocks(qs.detach(), k1, k2, p, q_offset=dp, kernel_config=config)
    out["attention_fwd_bwd_ms"] = timed(lambda: block_sparse_attention(qs, kg, vg, idx, p, q_offset=dp,
                                                                       forced_blocks=True, kernel_config=config),
                                        do[:, dp:])
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
             attention_max_len: int = 262144, config: SparseKernelConfig | None = None) -> dict:
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
        res["whole_fwd_ms"] = bench_ms(lambda: infllmv2_attention(q, k, v, p, kernel_config=config), w, r)
        res["whole_fwd_peak_extra_gib"] = _peak_extra_gib(
            lambda: out.copy_(infllmv2_attention(q, k, v, p, kernel_config=config)), base)
        # the op returns its own output tensor, which that peak includes: the budget excludes it
        res["whole_fwd_output_gib"] = q.numel() * q.element_size() / 2**30
        res["whole_fwd_peak_extra_beyond_output_gib"] = res["whole_fwd_peak_extra_gib"] - res["whole_fwd_output_gib"]
        res["compress_ms"] = bench_ms(lambda: (compress_keys(k, p.kernel_size, p.kernel_stride),
                                               compress_keys(k, p.k2_kernel, p.k2_stride)), w, r)
        k1, k2 = compress_keys(k, p.kernel_size, p.kernel_stride), compress_keys(k, p.k2_kernel, p.k2_stride)
        qs = q[:, dp:]
        res["select_ms"] = bench_ms(lambda: select_blocks(qs, k1, k2, p, q_offset=dp, kernel_config=config), w, r)
        res["dense_part_ms"] = bench_ms(lambda: dense_causal_attention(q[:, :dp], k[:, :dp], v[:, :dp]), w, r)
        if T == min(DEFAULT_LENGTHS):   # dense fallback: SDPA vs the block-sparse kernel with every block kept
            idx_d = select_blocks(q[:, :dp], k1, k2, p, q_offset=0, kernel_config=config)
            res["dense_part_via_sparse_kernel_ms"] = bench_ms(
                lambda: block_sparse_attention(q[:, :dp], k, v, idx_d, p, q_offset=0, kernel_config=config), w, r)
        if T <= max(262144, attention_max_len):   # block indices of all sparse queries at once: 0.8 KiB/token
            idx = select_blocks(qs, k1, k2, p, q_offset=dp, kernel_config=config)
            res["attention_fwd_ms"] = bench_ms(
                lambda: block_sparse_attention(qs, k, v, idx, p, q_offset=dp, forced_blocks=True,
                                        kernel_config=config), w, r)
            idx = None  # free the memory
        if T <= dense_fwd_max:
            res["sdpa_fwd_ms"] = bench_ms(lambda: dense_causal_attention(q, k, v), w, r)
            res["speedup_fwd_vs_sdpa"] = res["sdpa_fwd_ms"] / res["whole_fwd_ms"]
        if with_fla and T <= 262144:
            try:
                from fla.ops.nsa import parallel_nsa

                full_idx = select_blocks(q, k1, k2, p, q_offset=0, kernel_config=config)
                full_idx = full_idx.permute(0, 2, 1, 3).to(torch.int64).contiguous()
                res["fla_nsa_fwd_ms"] = bench_ms(lambda: parallel_nsa(q, k, v, block_indices=full_idx,
                                                                      block_counts=p.total_blocks,
                                                                      block_size=p.block_size, window_size=0), w, r)
                idx_all = full_idx.permute(0, 2, 1, 3).to(torch.int32).contiguous()
                res["attention_full_T_fwd_ms"] = bench_ms(
                    lambda: block_sparse_attention(q, k, v, idx_all, p, q_offset=0, kernel_config=config), w, r)
                full_idx = idx_all = None  # free the memory
            except Exception as ex:  # fla missing or failing: recorded, not fatal
                res["fla_nsa_error"] = repr(ex)[:300]
        k1 = k2 = out = None  # free the memory
    if backward:
        res.update(_fwd_bwd_ms(q, k, v, p, w, r, with_sdpa=T <= dense_bwd_max, config=config))
        if "sdpa_fwd_bwd_ms" in res:
            res["speedup_fwd_bwd_vs_sdpa"] = res["sdpa_fwd_bwd_ms"] / res["whole_fwd_bwd_ms"]
    for name in variants:
        if name == "decode":
            _measure_decode(T, p, q, k, v, res, config or SparseKernelConfig())
        elif name in CONFIG_VARIANTS and T <= VARIANT_MAX_LEN:
            _measure_config_variant(name, T, p, q, k, v, res, w, r, config or SparseKernelConfig(), attention_max_len)
    q = k = v = None  # free the memory
    gc.collect()
    torch.cuda.empty_cache()
    return res


# (rows, K1 tile, warps, stages)
SELECT_CONFIGS = [(128, 64, 8, None), (128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, None), (64, 64, 4, 3),
                  (128, 128, 8, 2), (64, 128, 4, 2), (32, 64, 4, 3)]
FWD_CONFIGS = [(4, None, 1), (4, 3, 1), (2, 3, 1), (4, 2, 2), (4, 3, 2), (8, 3, 2), (4, 2, 4), (8, 2, 2), (8, 2, 4),
               (4, 1, 2)]   # (warps, stages, blocks per iteration); 3 stages x 4 blocks exceeds shared memory
BAND_CONFIGS = [(64, 4, 2), (64, 4, 3), (128, 8, 2), (128, 8, 3), (64, 8, 3), (128, 4, 2)]   # (rows, warps, stages)


def _select_config(base: SparseKernelConfig, c) -> SparseKernelConfig:
    return dataclasses.replace(base, select_rows=c[0], select_k1_tile=c[1], select_warps=c[2], select_stages=c[3])


def _fwd_config(base: SparseKernelConfig, c) -> SparseKernelConfig:
    """The per-token walk's settings, timed on that walk (fwd_query_tile 1; `sweep` restores the run's walk)."""
    return dataclasses.replace(base, fwd_warps=c[0], fwd_stages=c[1], fwd_blocks_per_iter=c[2], fwd_query_tile=1)


def _band_config(base: SparseKernelConfig, c) -> SparseKernelConfig:
    return dataclasses.replace(base, band_rows=c[0], band_warps=c[1], band_stages=c[2])


def _sweep_attention(base: SparseKernelConfig, settings, make, attend, ref, log: list, warmup: int, rep: int):
    """Time attend(config) under make(base, s) for each setting s and log it with its max abs difference from ref
    (the first setting's output when ref is None). Returns (the fastest config within 1e-2 of ref, else base;
    ref)."""
    best = (float("inf"), base)
    for setting in settings:
        cfg = make(base, setting)
        try:
            ms = bench_ms(lambda: attend(cfg), warmup, rep)
            o = attend(cfg)
        except Exception as ex:
            log.append({"config": list(setting), "error": repr(ex)[:200]})
            continue
        ref = o if ref is None else ref
        diff = (o.float() - ref.float()).abs().max().item()
        log.append({"config": list(setting), "ms": ms, "max_abs_diff_vs_first": diff})
        o = None  # free the memory
        if diff < 1e-2 and ms < best[0]:
            best = (ms, cfg)
    return best[1], ref


def sweep(T: int = 131072, *, device: str = "cuda", params: SparseParams | None = None,
          heads: tuple[int, int, int] = (HQ, HKV, D), select_configs=None, fwd_configs=None, band_configs=None,
          dtype: torch.dtype = torch.bfloat16, warmup: int = 1, rep: int = 3) -> tuple[SparseKernelConfig, dict]:
    """Time the selection and attention kernels under several launch settings at length T; returns the fastest
    config whose output matches the first setting's (selection: the same block indices) and the log.
    heads: (query heads, KV heads, head dim). CPU (interpreter) use is for tests with tiny shapes."""
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
    best = (float("inf"), SparseKernelConfig())
    want = None
    for setting in select_configs or SELECT_CONFIGS:
        cfg = _select_config(SparseKernelConfig(), setting)
        try:
            ms = bench_ms(lambda: select_blocks(qs, k1, k2, p, q_offset=dp, kernel_config=cfg), warmup, rep)
            got = select_blocks(qs, k1, k2, p, q_offset=dp, kernel_config=cfg)
        except Exception as ex:
            out["select"].append({"config": list(setting), "error": repr(ex)[:200]})
            continue
        want = got if want is None else want
        rows_differ = (got != want).any(-1).float().mean().item()   # rounding of near-equal scores aside, 0
        out["select"].append({"config": list(setting), "ms": ms, "rows_differing_from_first": rows_differ})
        if rows_differ < 0.01 and ms < best[0]:
            best = (ms, cfg)
    chosen = best[1]
    idx = select_blocks(qs, k1, k2, p, q_offset=dp, kernel_config=chosen)

    def attend(cfg: SparseKernelConfig) -> torch.Tensor:
        return block_sparse_attention(qs, k, v, idx, p, q_offset=dp, forced_blocks=True, kernel_config=cfg)

    walk = chosen.fwd_query_tile    # the per-token settings also serve the dq walk and the one-walk forward
    chosen, ref_out = _sweep_attention(chosen, fwd_configs or FWD_CONFIGS, _fwd_config, attend, None,
                                       out["attention_fwd"], warmup, rep)
    chosen = dataclasses.replace(chosen, fwd_query_tile=walk)
    chosen, _ = _sweep_attention(chosen, band_configs or BAND_CONFIGS, _band_config, attend, ref_out, out["band"],
                                 warmup, rep)
    out["chosen"] = dataclasses.asdict(chosen)
    logger.info("sweep: %s", out)
    q = k = v = k1 = k2 = idx = None  # free the memory
    if dev == "cuda":
        torch.cuda.empty_cache()
    return chosen, out


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
    config = SparseKernelConfig()
    if tune:
        config, payload["tuning_sweep"] = sweep()
    payload["kernel_config"] = dataclasses.asdict(config)
    if variants != ["default"]:
        payload["variants"] = variants
    t0 = time.time()
    for T in lengths:
        if time.time() - t0 > time_budget_s:
            payload["results"].append({"T": T, "skipped": "time budget"})
            continue
        try:
            res = _measure(T, p, with_fla, T <= backward_max_len, dense_fwd_max, dense_bwd_max, variants,
                           input_smoothing, attention_max_len=backward_max_len, config=config)
        except torch.cuda.OutOfMemoryError as ex:
            res = {"T": T, "error": "OOM: " + str(ex)[:200]}
            gc.collect()
            torch.cuda.empty_cache()
        res["elapsed_s"] = round(time.time() - t0, 1)
        payload["results"].append(res)
        logger.info("%s", {k: (round(v, 2) if isinstance(v, float) else v) for k, v in res.items()})
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
                    help=f"comma-separated variants measured side by side: {', '.join(VARIANTS)}")
    ap.add_argument("--input-smoothing", type=int, default=1,
                    help="average q, k, v over this many tokens (1: independent random tokens; see the module doc)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if a.input_smoothing < 1:
        ap.error(f"--input-smoothing must be >= 1, got {a.input_smoothing}")
    run([int(x) for x in a.lengths.split(",")], a.out, with_fla=not a.no_fla,
        backward_max_len=a.backward_max_len, time_budget_s=a.time_budget_s, tune=a.tune,
        variants=check_variants(a.variants.split(",")), input_smoothing=a.input_smoothing)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
