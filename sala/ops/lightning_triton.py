"""Triton kernels of Lightning attention: chunked prefill (forward + backward) and the decode step.

Work layout (forward). Every sequence is cut into segments of `chunks_per_segment` chunks of C tokens,
and three kernels run:
  1. `_segment_state_kernel`, parallel over (segment, head, V tile): the segment's own state
     contribution U = sum_t gamma^(end-1-t) k_t^T v_t (fp32), for every segment but the last of a sequence;
  2. `_segment_scan_kernel`, parallel over (sequence, head, state tile): a short sequential scan giving
     the state entering each segment, S_in(next) = gamma^len S_in + U, starting from the initial state;
  3. `_segment_output_kernel`, parallel over (segment, head, V tile): walks the segment's chunks from
     S_in, o = scale * ((q S) * gamma^(i+1) + ((q k^T) * D) v) with D_ij = gamma^(i-j) (i >= j), and
     S <- gamma^L S + (k * gamma^(L-1-j))^T v with L the chunk's true length; the last segment of a
     sequence writes the final state.
Because the decay is a per-head constant, D is built once per program. Every decay factor is
exp2(log2(gamma) * n) with n >= 0, so nothing overflows. The state stays fp32 in registers; matmul
operands are the input dtype (fp32 inputs use IEEE fp32 dots).

Backward: dq is the same forward pass with (q, k, v, S0) -> (do, v, k, S0^T); dk and dv are the
time-reversed pass (flag REVERSE) with (k, q, do) and (v, do, q), whose reversed "initial state" is the
gradient of the final state and whose reversed final state gives the gradient of the initial state.

Launch settings come from a frozen `LightningConfig` (sala.ops.lightning_plan, with the segment planning);
launches go through `sala.ops.triton_launch`. All kernels run under TRITON_INTERPRET=1 (fixed configurations, no
autotuning).
"""
from __future__ import annotations

import weakref

import torch
import triton
import triton.language as tl
from torch import Tensor

from sala.ops.dispatch import interpreter_enabled
from sala.ops.lightning_plan import (
    DEFAULT_CONFIG,
    LightningConfig,
    Segments,
    block_v,
    chunk_and_warps,
    fit_to_dtype,
    segments_for,
)
from sala.ops.triton_launch import launch

LOG2E = 1.4426950408889634
# the factored intra-chunk decay multiplies a score by gamma^(i-c) (up to 2^FACTORED_MAX_EXP) before gamma^(c-j):
# exact while |q.k| < 2^(127 - FACTORED_MAX_EXP) = 2^37; a call with a faster decay (|log2 gamma| * C/2 above it)
# uses the table instead
FACTORED_MAX_EXP = 90.0
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)

__all__ = ["DEFAULT_CONFIG", "LightningConfig", "lightning_attention_triton", "lightning_decode_step_triton"]

# the compiled kernels of the latest launches by role ("state", "output"): benchmarks read their
# registers and spills (`n_regs`, `n_spills`) next to the timings
LAST_KERNELS: dict[str, object] = {}


# --------------------------------------------------------------------------------------------- kernels
# Only core `tl` builtins are used (no tl.cdiv / tl.zeros / tl.sum, which are themselves @triton.jit
# functions built when triton is imported): then re-importing this module with TRITON_INTERPRET=1
# is enough to get interpreter-mode kernels even if triton was imported earlier without it.

@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _mm(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation. UPCAST: feed fp32 operands (Triton's interpreter mis-computes bf16 dots)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _mm_acc(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b (fp32 accumulator updated by the matrix unit)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _chunk_rows(c, n_chunks, bos, eos, offs_c, C: tl.constexpr, REVERSE: tl.constexpr):
    """Chunk c of the segment [bos, eos) in walking order (last first when REVERSE): its token count n, the
    validity [C] and the token rows [C] of its slots."""
    if REVERSE:
        cc = n_chunks - 1 - c
    else:
        cc = c
    t0 = bos + cc * C
    n = tl.minimum(eos - t0, C)
    return n, offs_c < n, t0 + offs_c


@triton.jit
def _load_rows(ptr, rows, stride_t, h, stride_h, offs, valid):
    """Tile [C, len(offs)] of head h at token rows `rows` (zeros where not valid)."""
    return tl.load(ptr + rows[:, None] * stride_t + h * stride_h + offs[None, :], mask=valid[:, None], other=0.0)


@triton.jit
def _load_chunk(q_ptr, k_ptr, v_ptr, c, n_chunks, bos, eos, h, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt,
                stride_vh, offs_c, offs_k, offs_v, C: tl.constexpr, REVERSE: tl.constexpr):
    """Chunk c of the walk over [bos, eos): its token count n, validity, rows, and its q, k [C, DK] and v [C, BV]."""
    n, valid, rows = _chunk_rows(c, n_chunks, bos, eos, offs_c, C, REVERSE)
    qb = _load_rows(q_ptr, rows, stride_qt, h, stride_qh, offs_k, valid)
    kb = _load_rows(k_ptr, rows, stride_kt, h, stride_kh, offs_k, valid)
    vb = _load_rows(v_ptr, rows, stride_vt, h, stride_vh, offs_v, valid)
    return n, valid, rows, qb, kb, vb


@triton.jit
def _store_rows(ptr, rows, stride_t, h, stride_h, offs, valid, x):
    """Store the tile x [C, len(offs)] of head h at token rows `rows` (where valid), in the buffer's dtype."""
    tl.store(ptr + rows[:, None] * stride_t + h * stride_h + offs[None, :], x.to(ptr.dtype.element_ty),
             mask=valid[:, None])


@triton.jit
def _state_step(state, keys_b, vals_b, dec, lg, n, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """The state after a chunk of n tokens: state * gamma^n + (keys_b * dec)^T vals_b (fp32)."""
    kw = (keys_b.to(tl.float32) * dec[:, None]).to(keys_b.dtype)
    return _mm_acc(tl.trans(kw), vals_b, state * tl.exp2(lg * n.to(tl.float32)), DOT_PRECISION, UPCAST)


@triton.jit
def _chunk_output(rows_b, keys_b, vals_b, state, row_dec, intra, row_fac, col_fac, causal,
                  DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, INTRA: tl.constexpr):
    """One chunk's outputs before the scale (fp32 [C, len(vals)]): rows_b @ state * row_dec (the entering state)
    plus (rows_b keys_b^T, decayed and causal) @ vals_b (the chunk itself). INTRA 0: the [C, C] table `intra`;
    1: row_fac[i] * col_fac[j] where `causal`."""
    raw = _mm(rows_b, tl.trans(keys_b), DOT_PRECISION, UPCAST)
    if INTRA == 0:
        scores = raw * intra
    else:
        scores = tl.where(causal, (raw * row_fac[:, None]) * col_fac[None, :], 0.0)
    out = _mm(rows_b, state.to(rows_b.dtype), DOT_PRECISION, UPCAST) * row_dec[:, None]
    return _mm_acc(scores.to(vals_b.dtype), vals_b, out, DOT_PRECISION, UPCAST)


@triton.jit
def _chunk_decays(n, offs_c, valid, lg, REVERSE: tl.constexpr):
    """A chunk of n tokens walked forward (REVERSE: backward): (row_dec, state_dec) [C] fp32. row_dec[i]: the decay of
    the entering state when row i reads it; state_dec[i]: row i's weight in the state the chunk hands on (0 past n)."""
    if REVERSE:
        row_expo = tl.maximum(n - 1 - offs_c, 0)
        state_expo = offs_c + 1
    else:
        row_expo = offs_c + 1
        state_expo = tl.maximum(n - 1 - offs_c, 0)
    return tl.exp2(lg * row_expo.to(tl.float32)), tl.where(valid, tl.exp2(lg * state_expo.to(tl.float32)), 0.0)


@triton.jit
def _chunk_causal(rows, bos, valid, REVERSE: tl.constexpr, INTRA: tl.constexpr):
    """The causal mask `_chunk_output` takes: with the factored decay (INTRA 1) [C, C] from the chunk's positions
    (loop-variant, so that no [C, C] tensor is hoisted out of the walk and kept live in registers), else `valid`
    (the table already holds it)."""
    causal = valid
    if INTRA == 1:
        local = (rows - bos).to(tl.int32)
        # one orientation of `gap` for both directions: the transposed difference cost the reverse walk 240
        # instead of 144 bytes of stack (sm_90, Triton 3.6; scripts/lightning_sm90_resources.py)
        gap = local[:, None] - local[None, :]
        if REVERSE:
            causal = gap <= 0
        else:
            causal = gap >= 0
    return causal


@triton.jit
def _intra_decay(offs_c, lg, C: tl.constexpr, REVERSE: tl.constexpr, FACTORED: tl.constexpr):
    """The intra-chunk decay gamma^(i-j) on the causal side (j-i when REVERSE), once per program: (intra, row_fac,
    col_fac). FACTORED: gamma^(i-c) * gamma^(c-j) (reverse: gamma^(c-i) * gamma^(j-c)), c = C/2, as row and column
    factors [C] (the launcher checked |log2 gamma| * C/2 <= FACTORED_MAX_EXP for every head, so no factor
    overflows), `intra` a placeholder; else the [C, C] table `intra`, the factors placeholders."""
    if FACTORED:
        centred = (offs_c - C // 2).to(tl.float32)
        if REVERSE:
            row_fac = tl.exp2(-lg * centred)
            col_fac = tl.exp2(lg * centred)
        else:
            row_fac = tl.exp2(lg * centred)
            col_fac = tl.exp2(-lg * centred)
        intra = lg
    else:
        if REVERSE:
            gap = offs_c[None, :] - offs_c[:, None]
        else:
            gap = offs_c[:, None] - offs_c[None, :]
        intra = tl.where(gap >= 0, tl.exp2(lg * tl.maximum(gap, 0).to(tl.float32)), 0.0)
        row_fac = lg
        col_fac = lg
    return intra, row_fac, col_fac


@triton.jit
def _segment_state_kernel(
    k_ptr, v_ptr, u_ptr, log2_decay_ptr, seg_start_ptr, seg_end_ptr, seg_ids_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
    REVERSE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """U[seg, h, :, tile] = sum over the segment's tokens of decayed k_t^T v_t (see module doc)."""
    seg = tl.load(seg_ids_ptr + tl.program_id(0))
    h = tl.program_id(1)
    iv = tl.program_id(2)
    bos = tl.load(seg_start_ptr + seg)
    eos = tl.load(seg_end_ptr + seg)
    lg = tl.load(log2_decay_ptr + h)
    offs_c = tl.arange(0, C)
    offs_k = tl.arange(0, DK)
    offs_v = iv * BV + tl.arange(0, BV)
    n_chunks = (eos - bos + C - 1) // C
    acc = tl.full([DK, BV], 0.0, tl.float32)
    for c in range(0, n_chunks):
        n, valid, rows = _chunk_rows(c, n_chunks, bos, eos, offs_c, C, REVERSE)
        kb = _load_rows(k_ptr, rows, stride_kt, h, stride_kh, offs_k, valid)
        vb = _load_rows(v_ptr, rows, stride_vt, h, stride_vh, offs_v, valid)
        _, kdec = _chunk_decays(n, offs_c, valid, lg, REVERSE)
        acc = _state_step(acc, kb, vb, kdec, lg, n, DOT_PRECISION, UPCAST)
    u_base = u_ptr + (seg * H + h) * DK * DV
    tl.store(u_base + offs_k[:, None] * DV + offs_v[None, :], acc)


@triton.jit
def _segment_scan_kernel(
    u_ptr, s_in_ptr, init_ptr, final_ptr, log2_decay_ptr, seg_start_ptr, seg_end_ptr, seq_seg_ptr,
    H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BLOCK: tl.constexpr,
    HAS_INIT: tl.constexpr, WANT_FINAL: tl.constexpr, REVERSE: tl.constexpr,
):
    """S_in[seg] for every segment of sequence n (and final[n] = state entering its last-walked segment)."""
    n = tl.program_id(0)
    h = tl.program_id(1)
    offs = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    lg = tl.load(log2_decay_ptr + h)
    first = tl.load(seq_seg_ptr + n)
    last = tl.load(seq_seg_ptr + n + 1)
    if HAS_INIT:
        state = tl.load(init_ptr + (n * H + h) * DK * DV + offs)
    else:
        state = tl.full([BLOCK], 0.0, tl.float32)
    count = last - first
    for i in range(0, count):
        if REVERSE:
            seg = last - 1 - i
        else:
            seg = first + i
        tl.store(s_in_ptr + (seg * H + h) * DK * DV + offs, state)
        if i < count - 1:
            length = tl.load(seg_end_ptr + seg) - tl.load(seg_start_ptr + seg)
            u = tl.load(u_ptr + (seg * H + h) * DK * DV + offs)
            state = state * tl.exp2(lg * length.to(tl.float32)) + u
    if WANT_FINAL:
        # overwritten by the output kernel of the last-walked segment; stays for empty sequences
        tl.store(final_ptr + (n * H + h) * DK * DV + offs, state)


@triton.jit
def _output_walk(q_ptr, k_ptr, v_ptr, o_ptr, state, bos, eos, lg, h, scale, intra, row_fac, col_fac,
                 stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                 offs_c, offs_k, offs_v, C: tl.constexpr, REVERSE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 UPCAST: tl.constexpr, INTRA: tl.constexpr):
    """Walk the chunks of [bos, eos) from `state`, writing outputs; returns the state after the last chunk.

    INTRA (the intra-chunk decay gamma^(i-j), `_intra_decay`): 0 the [C, C] table `intra`; 1 row_fac[i] * col_fac[j],
    with the causal mask from the chunk's positions (`_chunk_causal`).
    """
    n_chunks = (eos - bos + C - 1) // C
    for c in range(0, n_chunks):
        n, valid, rows, qb, kb, vb = _load_chunk(q_ptr, k_ptr, v_ptr, c, n_chunks, bos, eos, h, stride_qt, stride_qh,
                                                 stride_kt, stride_kh, stride_vt, stride_vh, offs_c, offs_k, offs_v,
                                                 C, REVERSE)
        q_dec, k_dec = _chunk_decays(n, offs_c, valid, lg, REVERSE)
        causal = _chunk_causal(rows, bos, valid, REVERSE, INTRA)
        out = _chunk_output(qb, kb, vb, state, q_dec, intra, row_fac, col_fac, causal, DOT_PRECISION, UPCAST, INTRA)
        _store_rows(o_ptr, rows, stride_ot, h, stride_oh, offs_v, valid, out * scale)
        state = _state_step(state, kb, vb, k_dec, lg, n, DOT_PRECISION, UPCAST)
    return state


@triton.jit
def _segment_output_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, s_in_ptr, final_ptr, log2_decay_ptr,
    seg_start_ptr, seg_end_ptr, seg_seq_ptr, seg_final_ptr, scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
    REVERSE: tl.constexpr, WANT_FINAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, INTRA_FACTORED: tl.constexpr,
):
    """Outputs of one (segment, head, V tile), walking its chunks from the entering state."""
    seg = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    iv = tl.program_id(2)
    bos = tl.load(seg_start_ptr + seg)
    eos = tl.load(seg_end_ptr + seg)
    lg = tl.load(log2_decay_ptr + h)
    offs_c = tl.arange(0, C)
    offs_k = tl.arange(0, DK)
    offs_v = iv * BV + tl.arange(0, BV)
    state_offs = offs_k[:, None] * DV + offs_v[None, :]
    state = tl.load(s_in_ptr + (seg * H + h) * DK * DV + state_offs)
    args = (stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, offs_c, offs_k,
            offs_v)
    intra, row_fac, col_fac = _intra_decay(offs_c, lg, C, REVERSE, INTRA_FACTORED)
    state = _output_walk(q_ptr, k_ptr, v_ptr, o_ptr, state, bos, eos, lg, h, scale, intra, row_fac, col_fac, *args,
                         C=C, REVERSE=REVERSE, DOT_PRECISION=DOT_PRECISION, UPCAST=UPCAST, INTRA=INTRA_FACTORED)
    if WANT_FINAL:
        if tl.load(seg_final_ptr + seg) != 0:
            n_seq = tl.load(seg_seq_ptr + seg)
            tl.store(final_ptr + (n_seq * H + h) * DK * DV + state_offs, state)


@triton.jit
def _decode_step_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, state_ptr, log_decay_ptr, scale, T,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr,
):
    """T tokens in order, the state tile held in registers between them: for each token t,
    state[b, h, :, tile] <- gamma * state + k_t^T v_t ; o_t[b, h, tile] = scale * q_t state."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_k = tl.arange(0, DK)
    offs_v = tl.program_id(2) * BV + tl.arange(0, BV)
    gamma = tl.exp(tl.load(log_decay_ptr + h).to(tl.float32))
    s_ptrs = state_ptr + (b * H + h) * DK * DV + offs_k[:, None] * DV + offs_v[None, :]
    state = tl.load(s_ptrs)
    for t in range(T):
        qv = tl.load(q_ptr + b * stride_qb + t * stride_qt + h * stride_qh + offs_k).to(tl.float32)
        kv = tl.load(k_ptr + b * stride_kb + t * stride_kt + h * stride_kh + offs_k).to(tl.float32)
        vv = tl.load(v_ptr + b * stride_vb + t * stride_vt + h * stride_vh + offs_v).to(tl.float32)
        state = state * gamma + kv[:, None] * vv[None, :]
        out = tl.reduce(qv[:, None] * state, 0, _add) * scale
        tl.store(o_ptr + b * stride_ob + t * stride_ot + h * stride_oh + offs_v, out.to(o_ptr.dtype.element_ty))
    tl.store(s_ptrs, state)


# --------------------------------------------------------------------------------------------- launchers

def _check_head_dims(dk: int, dv: int) -> None:
    for name, d in (("Dk", dk), ("Dv", dv)):
        if d not in SUPPORTED_HEAD_DIMS:
            raise ValueError(f"lightning (Triton): head dim {name}={d} is not supported; supported: "
                             f"{SUPPORTED_HEAD_DIMS} (set SALA_KERNELS=reference to use the PyTorch reference)")


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Uninitialised buffer (one place, so tests can poison every kernel output with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _chunked_pass(q: Tensor, k: Tensor, v: Tensor, log2_decay: Tensor, scale: float, segs: Segments,
                  init: Tensor | None, want_final: bool, reverse: bool, config: LightningConfig,
                  max_abs_log2_decay: float | None = None) -> tuple[Tensor, Tensor | None]:
    """One direction of the chunked recurrence over packed [TT, H, D] tensors (last dim contiguous).

    Forward: o_t = scale * q_t S_t with S_t = gamma S_{t-1} + k_t^T v_t, S_{-1} = init.
    Reverse: o_t = scale * q_t R_t with R_t = gamma R_{t+1} + k_t^T v_t, R_{T} = init / gamma
    (so `init` enters token t with gamma^(T-1-t)); the returned state is the one seen just before token 0
    (gamma^(t+1) weights). Returns (o [TT, H, Dv] in q.dtype, state [N, H, Dk, Dv] fp32 or None).
    max_abs_log2_decay: max_h |log2 gamma_h| when known (`_max_abs_log2_decay`), which allows the factored decay.
    """
    tt, heads, dk = q.shape
    dv = v.shape[-1]
    bv = block_v(config, dv, dk)
    chunk, warps = chunk_and_warps(config, dk, dv)
    o = _empty((tt, heads, dv), q.dtype, q.device)
    s_in, final = _entering_states(k, v, log2_decay, segs, init, want_final, reverse, bv, chunk, warps, config)
    if segs.num_segments:
        LAST_KERNELS["output"] = launch(
            _segment_output_kernel, (segs.num_segments, heads, dv // bv),
            (q, k, v, o, s_in, final, log2_decay, segs.start, segs.end, segs.seq,
             segs.first if reverse else segs.last, float(scale),
             q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1)),
            dict(H=heads, DK=dk, DV=dv, BV=bv, C=chunk, REVERSE=reverse, WANT_FINAL=want_final,
                 DOT_PRECISION=_dot_precision(q.dtype), UPCAST=interpreter_enabled(),
                 INTRA_FACTORED=_use_factored(max_abs_log2_decay, chunk)),
            warps, config.num_stages, fast=config.fast_launch)
    return o, (final if want_final else None)


def _entering_states(k: Tensor, v: Tensor, log2_decay: Tensor, segs: Segments, init: Tensor | None, want_final: bool,
                     reverse: bool, bv: int, chunk: int, warps: int, config: LightningConfig) -> tuple[Tensor, Tensor]:
    """The state entering every segment (`_segment_state_kernel` over the segments, then `_segment_scan_kernel`
    along each sequence): s_in [S, H, Dk, Dv] fp32, and final [N, H, Dk, Dv] (the state each sequence hands on, to
    be completed by the output pass; s_in itself when not `want_final`)."""
    tt, heads, dk = k.shape
    dv = v.shape[-1]
    prec, upcast = _dot_precision(k.dtype), interpreter_enabled()
    s_in = _empty((segs.num_segments, heads, dk, dv), torch.float32, k.device)
    final = _empty((segs.num_seqs, heads, dk, dv), torch.float32, k.device) if want_final else s_in
    state_ids = segs.not_first_ids if reverse else segs.not_last_ids
    u = _empty(tuple(s_in.shape), torch.float32, k.device) if state_ids.numel() else s_in
    if state_ids.numel():
        LAST_KERNELS["state"] = launch(
            _segment_state_kernel, (state_ids.numel(), heads, dv // bv),
            (k, v, u, log2_decay, segs.start, segs.end, state_ids, k.stride(0), k.stride(1), v.stride(0), v.stride(1)),
            dict(H=heads, DK=dk, DV=dv, BV=bv, C=chunk, REVERSE=reverse, DOT_PRECISION=prec, UPCAST=upcast),
            warps, config.num_stages, fast=config.fast_launch)
    scan_block = min(1024, dk * dv)
    launch(_segment_scan_kernel, (segs.num_seqs, heads, dk * dv // scan_block),
           (u, s_in, init if init is not None else s_in, final, log2_decay, segs.start, segs.end, segs.seq_ptr),
           dict(H=heads, DK=dk, DV=dv, BLOCK=scan_block, HAS_INIT=init is not None, WANT_FINAL=want_final,
                REVERSE=reverse), 4, fast=config.fast_launch)
    return s_in, final


# per-tensor memos of a log_decay tensor: id -> (weak reference, version, value); identity-keyed (a tensor's == is
# elementwise)
_DECAY_RANGE: dict[int, tuple[weakref.ref, int, float]] = {}   # max |log2 gamma|
_LOG2_DECAY: dict[int, tuple[weakref.ref, int, Tensor]] = {}   # log2 gamma as contiguous fp32


def _version(t: Tensor) -> int | None:
    """The tensor's in-place version counter, or None where it has none (tensors made under inference_mode)."""
    try:
        return t._version
    except RuntimeError:
        return None


def _memo(cache: dict, t: Tensor, compute, reads_host: bool):
    """compute(t), remembered per tensor until it changes in place; tensors without a version counter are computed
    every time. While a CUDA graph is being captured, a value not known yet is computed but not kept, or, when
    `compute` reads the tensor on the host (a sync capture forbids), not computed at all: None."""
    version = _version(t)
    hit = cache.get(id(t))
    if hit is not None and version is not None and hit[0]() is t and hit[1] == version:
        return hit[2]
    capturing = t.is_cuda and torch.cuda.is_current_stream_capturing()
    if capturing and reads_host:
        return None
    value = compute(t)
    if version is not None and not capturing:
        if len(cache) > 256:   # forget tensors that are gone
            for key in [key for key, (ref, _, _) in cache.items() if ref() is None]:
                del cache[key]
        cache[id(t)] = (weakref.ref(t), version, value)
    return value


def _log2_decay(log_decay: Tensor) -> Tensor:
    """log2 gamma_h as contiguous fp32 [H], computed once per log_decay tensor (a model's decays are fixed buffers),
    so that a forward call launches nothing before its first kernel; recomputed when the tensor changes in place."""
    return _memo(_LOG2_DECAY, log_decay, lambda t: (t.detach().to(torch.float32) * LOG2E).contiguous(),
                 reads_host=False)


def _max_abs_log2_decay(log_decay: Tensor, config: LightningConfig) -> float | None:
    """max_h |log2 gamma_h| of a log_decay tensor when config.intra_factored asks for it, else None.

    Read once per tensor (one host sync; a model's decays are fixed buffers) and remembered until the tensor
    changes in place; None while a CUDA graph is being captured and the tensor was not seen before.
    """
    if not config.intra_factored:
        return None
    return _memo(_DECAY_RANGE, log_decay, lambda t: float(t.detach().abs().max()) * LOG2E, reads_host=True)


def _use_factored(max_abs_log2_decay: float | None, chunk: int) -> bool:
    """Whether the output kernel may apply the intra-chunk decay as gamma^(i-c) * gamma^(c-j) (no factor overflows)."""
    return max_abs_log2_decay is not None and max_abs_log2_decay * (chunk // 2) <= FACTORED_MAX_EXP


def _packed(x: Tensor) -> Tensor:
    """[B, T, H, D] -> [B*T, H, D] with a contiguous last dim."""
    b, t, h, d = x.shape
    x = x.reshape(b * t, h, d)
    return x if x.stride(-1) == 1 else x.contiguous()


def _forward(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, scale: float, initial_state: Tensor | None,
             output_final_state: bool, cu_seqlens: Tensor | None, config: LightningConfig):
    """The chunked forward pass: (o [B, T, H, Dv], final state or None, what the backward needs)."""
    batch, length, heads, dk = q.shape
    dv = v.shape[-1]
    _check_head_dims(dk, dv)
    log2_decay = _log2_decay(log_decay)
    qp, kp, vp = _packed(q), _packed(k), _packed(v)
    init = None if initial_state is None else initial_state.detach().to(torch.float32).contiguous()
    segs = segments_for(config, batch, length, cu_seqlens, heads, dk, dv, q.device)
    lg_max = _max_abs_log2_decay(log_decay, config)
    o, final = _chunked_pass(qp, kp, vp, log2_decay, scale, segs, init, output_final_state, False, config, lg_max)
    return o.view(batch, length, heads, dv), final, (qp, kp, vp, log2_decay, init, lg_max)


class _LightningFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens, config):
        batch, length = q.shape[:2]
        o, final, (qp, kp, vp, log2_decay, init, lg_max) = _forward(q, k, v, log_decay, scale, initial_state,
                                                                    output_final_state, cu_seqlens, config)
        ctx.save_for_backward(qp, kp, vp, log2_decay, init if init is not None else torch.empty(0))
        ctx.meta = (batch, length, scale, initial_state is not None,
                    initial_state.dtype if initial_state is not None else None, cu_seqlens, lg_max, config)
        return o, final

    @staticmethod
    def backward(ctx, do, dfinal):
        """dq: the forward pass with (do, v, k, S0^T); dv and dk: the reverse passes with (k, q, do) and (v, do, q),
        whose reversed initial state is the final state's gradient and whose reversed final state gives the
        initial state's gradient."""
        qp, kp, vp, log2_decay, init = ctx.saved_tensors
        batch, length, scale, has_init, init_dtype, cu_seqlens, lg_max, config = ctx.meta
        heads, dk, dv = qp.shape[1], qp.shape[2], vp.shape[2]
        dop = _packed(do.to(qp.dtype))
        need_q, need_k, need_v = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        need_init = has_init and ctx.needs_input_grad[5]
        dq = dk_ = dv_ = dinit = None
        rev_init = None
        if dfinal is not None:
            rev_init = (dfinal.to(torch.float32) / scale).contiguous()
        if need_q:
            segs_q = segments_for(config, batch, length, cu_seqlens, heads, dv, dk, qp.device)
            init_t = init.transpose(-1, -2).contiguous() if has_init else None
            dq, _ = _chunked_pass(dop, vp, kp, log2_decay, scale, segs_q, init_t, False, False, config, lg_max)
            dq = dq.view(batch, length, heads, dk)
        if need_v or need_init:
            segs_v = segments_for(config, batch, length, cu_seqlens, heads, dk, dv, qp.device)
            dv_, g = _chunked_pass(kp, qp, dop, log2_decay, scale, segs_v, rev_init, need_init, True, config, lg_max)
            dv_ = dv_.view(batch, length, heads, dv)
            if need_init:
                dinit = (g * scale).to(init_dtype)
        if need_k:
            segs_k = segments_for(config, batch, length, cu_seqlens, heads, dv, dk, qp.device)
            rev_init_t = rev_init.transpose(-1, -2).contiguous() if rev_init is not None else None
            dk_, _ = _chunked_pass(vp, dop, qp, log2_decay, scale, segs_k, rev_init_t, False, True, config, lg_max)
            dk_ = dk_.view(batch, length, heads, dk)
        return dq, dk_, (dv_ if need_v else None), None, None, dinit, None, None, None


def lightning_attention_triton(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, scale: float | None,
                               initial_state: Tensor | None, output_final_state: bool,
                               cu_seqlens: Tensor | None, config: LightningConfig | None = None
                               ) -> tuple[Tensor, Tensor | None]:
    """Triton path of `sala.ops.lightning.lightning_attention` (inputs already validated); config None: the
    defaults."""
    if q.dtype == torch.float64:
        raise ValueError("lightning (Triton): float64 inputs are not supported; use SALA_KERNELS=reference")
    config = fit_to_dtype(DEFAULT_CONFIG if config is None else config, q.dtype)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, initial_state)):
        return _LightningFunction.apply(q, k, v, log_decay, scale, initial_state, bool(output_final_state),
                                        cu_seqlens, config)
    # nothing to differentiate (inference, or inputs without grad): no autograd node, nothing kept for a backward
    o, final, _ = _forward(q, k, v, log_decay, scale, initial_state, bool(output_final_state), cu_seqlens, config)
    return o, final


def lightning_decode_step_triton(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, state: Tensor,
                                 scale: float | None = None, out: Tensor | None = None,
                                 config: LightningConfig | None = None) -> Tensor:
    """Triton decode step: one launch, no host sync; allocates only `o` (nothing when `out` is given).

    q, k [B, H, Dk], v [B, H, Dv] (one token), or [B, T, H, D] (T tokens in order, e.g. a verify step's: the
    state stays in registers between them). State must be contiguous fp32 [B, H, Dk, Dv]; q, k, v need a
    contiguous last dim. config None: the defaults.
    """
    config = DEFAULT_CONFIG if config is None else config
    if q.dim() == 3:
        (batch, heads, dk), T = q.shape, 1
    else:
        batch, T, heads, dk = q.shape
    dv = v.shape[-1]
    if dk not in SUPPORTED_HEAD_DIMS or dv not in SUPPORTED_HEAD_DIMS:
        _check_head_dims(dk, dv)
    if state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError(f"lightning (Triton): decode state must be contiguous float32, got {state.dtype} "
                         f"contiguous={state.is_contiguous()}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError(f"lightning (Triton): q, k and v must have a contiguous last dim, got strides {q.stride()}, "
                         f"{k.stride()}, {v.stride()}")
    scale = dk ** -0.5 if scale is None else float(scale)
    o = out if out is not None else _empty(tuple(q.shape[:-1]) + (dv,), q.dtype, q.device)

    def bth(x: Tensor) -> tuple[int, int, int]:
        """(batch, token, head) strides; a one-token call's token stride is never used."""
        st = x.stride()
        return (st[0], 0, st[1]) if x.dim() == 3 else (st[0], st[1], st[2])

    bv = min(config.decode_block_v, dv)
    grid = (batch, heads, dv // bv)
    launch(_decode_step_kernel, grid, (q, k, v, o, state, log_decay, scale, T, *bth(q), *bth(k), *bth(v), *bth(o)),
           dict(H=heads, DK=dk, DV=dv, BV=bv), config.decode_num_warps, fast=config.fast_launch)
    return o
