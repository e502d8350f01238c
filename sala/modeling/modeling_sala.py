"""MiniCPM-SALA in PyTorch: 25% InfLLM-V2 sparse-attention layers + 75% Lightning linear-attention layers.

This file is the only forward of the project: training, transformers generation and the engine's chunked prefill
and graph-captured decode all run these layers, told by a `ForwardContext` which mode they are in and where the
cache is. Read top to bottom: norms and projections, the two mixers, the MLP, the decoder layer, the model, the
LM head. Shapes: B batch, T new tokens, H heads, D head dim, Hkv key/value heads. Semantics: shared/spec/SALA.md.
"""
from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

try:  # transformers >= 4.52
    from transformers.modeling_layers import GradientCheckpointingLayer
except ImportError:  # pragma: no cover
    GradientCheckpointingLayer = nn.Module

from sala.modeling.cache import LightningLayerCache, SalaCache, SparseLayerCache
from sala.modeling.configuration_sala import SPARSE, SalaConfig
from sala.modeling.context import (
    DECODE,
    FULL,
    PREFILL,
    REFERENCE_OPS,
    ElementwiseOps,
    ForwardContext,
    rope_cos_sin,  # noqa: F401  (re-exported: the one RoPE frequency computation)
)
from sala.ops.dense import dense_causal_attention
from sala.ops.fused_reference import qk_norm_rope_reference
from sala.ops.infllmv2 import (
    SparseParams,
    compress_keys,
    compressed_lengths,
    gather_paged,
    gather_paged_range,
    infllmv2_attention,
    infllmv2_attention_paged,
    infllmv2_decode,
    paged_rows,
    update_compressed_keys,
    write_paged_rows,
)
from sala.ops.lightning import lightning_attention, lightning_decode_step
from sala.ops.linear_cross_entropy import linear_cross_entropy
from sala.ops.slopes import lightning_log_decay

# Inference runs the MLP over at most this many tokens at a time: bounds the [tokens, 2 x intermediate]
# activations of a long prefill chunk (the engine's memory plan counts on it).
MLP_SLICE_TOKENS = 8192

# How an RMSNorm's output dtype is chosen: "promote" (torch's promotion of input and weight: the released
# semantics), "autocast" (under autocast, the autocast dtype: the GEMM it feeds casts to it anyway, so the same
# values without a separate cast kernel; used with fused projections in training), "input" (the input's dtype:
# the conversion's distillation under autocast, where fp32 norm weights would promote bf16 activations).
NORM_OUTPUT_MODES = ("promote", "autocast", "input")


# ----------------------------------------------------------------------------- building blocks
class SalaRMSNorm(nn.Module):
    """RMSNorm over the last dim: variance in fp32, cast back to the input dtype, then times the weight."""

    def __init__(self, dim: int, eps: float = 1e-6, output_mode: str = "promote") -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.set_output_mode(output_mode)

    def set_output_mode(self, mode: str) -> None:
        """How the output dtype is chosen (one of NORM_OUTPUT_MODES)."""
        if mode not in NORM_OUTPUT_MODES:
            raise ValueError(f"SalaRMSNorm output mode must be one of {NORM_OUTPUT_MODES}, got {mode!r}")
        self.output_mode = mode

    def output_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype `forward(x)` returns."""
        if self.output_mode == "autocast" and torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        if self.output_mode == "input":
            return x.dtype
        return torch.promote_types(x.dtype, self.weight.dtype)

    def _cast(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return y if self.output_mode == "promote" else y.to(self.output_dtype(x))

    def forward(self, x: torch.Tensor, ops: ElementwiseOps = REFERENCE_OPS) -> torch.Tensor:
        return self._cast(ops.rms_norm(x, self.weight, self.eps), x)

    def add_and_norm(self, hidden: torch.Tensor, delta: torch.Tensor, scale: float,
                     ops: ElementwiseOps = REFERENCE_OPS) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden + delta * scale, this norm of it) in one op (in place on hidden with the fused inference ops)."""
        hidden, y = ops.add_rms_norm(hidden, delta, scale, self.weight, self.eps)
        return hidden, self._cast(y, hidden)


def _norm_args(norm: SalaRMSNorm | None) -> tuple[torch.Tensor | None, float]:
    """(weight, eps) of an optional RMSNorm, as the functional ops take them (None, 0.0 when absent)."""
    return (norm.weight, norm.eps) if norm is not None else (None, 0.0)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, H, D] by cos/sin [B, T, D]; computed in fp32, returned in x.dtype."""
    return qk_norm_rope_reference(x, None, 0.0, cos, sin)


class FusedProjections:
    """Mixin of an attention module: its q, k, v and output-gate Linears (which share an input) as one real
    `qkv_proj` Linear (one GEMM), and back. Saved checkpoints keep the released layout (`save_pretrained` splits the
    fused weights: `SalaPreTrainedModel.released_state_dict`); loading a released-layout state dict into a fused
    module concatenates it (a load pre-hook)."""

    qkv_proj: nn.Linear | None
    gate_name: str | None

    def projection_names(self) -> list[str]:
        return ["q_proj", "k_proj", "v_proj"] + ([self.gate_name] if self.gate_name else [])

    def projection_sizes(self) -> list[int]:
        return [self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim,
                self.num_kv_heads * self.head_dim] + ([self.num_heads * self.head_dim] if self.gate_name else [])

    @property
    def fused(self) -> bool:
        return self.qkv_proj is not None

    def fuse_projections(self) -> None:
        if self.fused:
            return
        self.qkv_proj = _concat_linears([getattr(self, n) for n in self.projection_names()])
        for n in self.projection_names():
            setattr(self, n, None)

    def unfuse_projections(self) -> None:
        if not self.fused:
            return
        for n, lin in zip(self.projection_names(), _split_linear(self.qkv_proj, self.projection_sizes())):
            setattr(self, n, lin)
        self.qkv_proj = None

    def fused_parts(self) -> dict[str, list[tuple[str, int]]]:
        """{fused parameter name: [(released name, rows), ...]} (empty when not fused)."""
        if not self.fused:
            return {}
        out = {}
        for p in ("weight", "bias"):
            if getattr(self.qkv_proj, p) is not None:
                out[f"qkv_proj.{p}"] = [(f"{n}.{p}", s) for n, s in zip(self.projection_names(),
                                                                         self.projection_sizes())]
        return out

    def project_qkv(self, x: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """q [B, T, H, D], k, v [B, T, Hkv, D] and the output-gate input (None without a gate) of x [B, T, hidden]:
        one GEMM when fused (views of its output), one per projection otherwise."""
        B, T, _ = x.shape
        if self.fused:
            q, k, v, *g = self.qkv_proj(x).split(self.projection_sizes(), dim=-1)
        else:
            q, k, v, *g = [getattr(self, n)(x) for n in self.projection_names()]
        return (q.view(B, T, self.num_heads, self.head_dim), k.view(B, T, self.num_kv_heads, self.head_dim),
                v.view(B, T, self.num_kv_heads, self.head_dim), g[0] if g else None)


def _concat_linears(linears: list[nn.Linear], interleave: bool = False) -> nn.Linear:
    """One Linear whose output rows are those of `linears` concatenated (or, with `interleave`, two Linears' rows
    alternating); a new real parameter, the same device, dtype and requires_grad."""
    if any(type(m) is not nn.Linear for m in linears):   # quantized modules (sala.modeling.fp8) fuse themselves
        kinds = {type(m) for m in linears}
        concat = getattr(next(iter(kinds)), "concat", None)
        if interleave or len(kinds) != 1 or concat is None:
            raise ValueError("fusing projections: a layer's projections must be all FP8 or all unquantized, and FP8 "
                             f"ones cannot interleave; got {[type(m).__name__ for m in linears]}")
        return concat(linears)
    w0 = linears[0].weight
    bias = linears[0].bias is not None
    out = sum(lin.out_features for lin in linears)
    lin = nn.Linear(linears[0].in_features, out, bias=bias, device=w0.device, dtype=w0.dtype)
    with torch.no_grad():
        def cat(ts):
            return torch.stack(ts, dim=1).flatten(0, 1) if interleave else torch.cat(ts)
        lin.weight.copy_(cat([m.weight for m in linears]))
        if bias:
            lin.bias.copy_(cat([m.bias for m in linears]))
    lin.requires_grad_(w0.requires_grad)
    return lin


def _split_linear(lin: nn.Linear, sizes: list[int], interleave: bool = False) -> list[nn.Linear]:
    """The inverse of `_concat_linears`."""
    outs = []
    for j, s in enumerate(sizes):
        m = nn.Linear(lin.in_features, s, bias=lin.bias is not None, device=lin.weight.device, dtype=lin.weight.dtype)
        with torch.no_grad():
            for p in ("weight", "bias"):
                src = getattr(lin, p)
                if src is not None:
                    part = src[j::len(sizes)] if interleave else src[sum(sizes[:j]):sum(sizes[:j + 1])]
                    getattr(m, p).copy_(part)
        m.requires_grad_(lin.weight.requires_grad)
        outs.append(m)
    return outs


def _fuse_on_load(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """load_state_dict pre-hook of a fused module: released-layout keys are concatenated into the fused ones."""
    interleave = getattr(module, "interleave", False)
    for fused_name, parts in module.fused_parts().items():
        keys = [prefix + n for n, _ in parts]
        if all(k in state_dict for k in keys):
            ts = [state_dict.pop(k) for k in keys]
            state_dict[prefix + fused_name] = torch.stack(ts, dim=1).flatten(0, 1) if interleave else torch.cat(ts)


# ----------------------------------------------------------------------------- lightning attention layer
class SalaLightningAttention(FusedProjections, nn.Module):
    """Lightning linear attention: QK-norm, RoPE, fixed per-head decay (ALiBi slopes), o_norm, z gate."""

    def __init__(self, config: SalaConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.lightning_nh
        self.num_kv_heads = config.lightning_nkv
        self.head_dim = config.lightning_head_dim
        self.scale = config.lightning_scale_value()
        self.use_rope = config.lightning_use_rope
        self.rope_theta = config.rope_theta
        h, d, bias = config.hidden_size, self.head_dim, config.attention_bias
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=bias)
        self.q_norm = SalaRMSNorm(d, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = SalaRMSNorm(d, config.rms_norm_eps) if config.qk_norm else None
        self.o_norm = SalaRMSNorm(self.num_heads * d, config.rms_norm_eps) if config.use_output_norm else None
        self.z_proj = nn.Linear(h, self.num_heads * d, bias=bias) if config.use_output_gate else None
        self.gate_name = "z_proj" if config.use_output_gate else None
        self.qkv_proj = None
        self.register_load_state_dict_pre_hook(_fuse_on_load)

    def log_decay(self, device: torch.device) -> torch.Tensor:
        """log(gamma_h) [H] fp32 (cached per device by `lightning_log_decay`)."""
        return lightning_log_decay(self.num_heads, device=device)

    def prepare(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor | None,
                sin: torch.Tensor | None, ops: ElementwiseOps = REFERENCE_OPS
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """QK-norm, RoPE (cos/sin [B, T, D]), one dtype, GQA expansion: q, k, v [B, T, H(kv), D] -> [B, T, H, D]."""
        if not self.use_rope:
            cos = sin = None
        q = ops.qk_norm_rope(q, *_norm_args(self.q_norm), cos, sin)
        k = ops.qk_norm_rope(k, *_norm_args(self.k_norm), cos, sin)
        # Under autocast the projections are low precision while fp32 norm weights promote q and k: one dtype.
        q, k = q.to(v.dtype), k.to(v.dtype)
        if self.num_kv_heads != self.num_heads:
            rep = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        return q, k, v

    def finish(self, o: torch.Tensor, z: torch.Tensor | None, dtype: torch.dtype,
               ops: ElementwiseOps = REFERENCE_OPS) -> torch.Tensor:
        """o [B, T, H, D] -> o_norm over all heads -> * sigmoid(z) (z = z_proj(x)) -> o_proj: [B, T, hidden]."""
        B, T = o.shape[:2]
        o = o.reshape(B, T, self.num_heads * self.head_dim).to(dtype)
        o = ops.rms_norm_gate(o, *_norm_args(self.o_norm), z, normalize=self.o_norm is not None)
        return self.o_proj(o)

    def rope(self, ctx: ForwardContext) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """cos, sin of this layer's RoPE for the call's positions, or (None, None) without RoPE."""
        return ctx.rope(self.head_dim, self.rope_theta) if self.use_rope else (None, None)

    def inputs(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
               position_ids: torch.Tensor | None = None, ops: ElementwiseOps = REFERENCE_OPS
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """x [B, T, hidden] -> q, k, v [B, T, H, D] ready for the attention op, and the gate input z (or None)."""
        q, k, v, z = self.project_qkv(x)
        q, k, v = self.prepare(q, k, v, cos, sin, ops)
        return q, k, v, z

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext,
               cache: LightningLayerCache | None = None) -> torch.Tensor:
        """The lightning op over the call's documents, a static-cache chunk or decode step: o [B, T, H, D]."""
        log_decay = self.log_decay(q.device)
        if ctx.mode == DECODE:      # T tokens per row, one step each (T > 1: a verify step)
            state = ctx.cache.state(self.layer_idx)
            o = lightning_decode_step(q, k, v, log_decay, state, scale=self.scale, out=ctx.out.get("lightning"))
            saved = ctx.saved_kv.get(self.layer_idx) if ctx.saved_kv else None
            if saved is not None:
                saved[0].copy_(k)
                saved[1].copy_(v)
            return o
        if ctx.mode == PREFILL:
            states = ctx.cache.state(self.layer_idx)
            # the row as a device index (ctx.row_index: no host value in the launched work) or as a slice
            indexed = ctx.row_index is not None
            state = states.index_select(0, ctx.row_index) if indexed else states[ctx.row:ctx.row + 1]
            o, final = lightning_attention(q, k, v, log_decay, scale=self.scale, initial_state=state,
                                           output_final_state=True)
            if indexed:
                states.index_copy_(0, ctx.row_index, final)
            else:
                state.copy_(final)
            return o
        if ctx.real_mask is not None:   # padding tokens must not enter the state: zero their keys
            k = k * ctx.real_mask[:, :, None, None].to(k.dtype)
        if cache is not None and cache.state is not None and q.shape[1] == 1:
            return lightning_decode_step(q[:, 0], k[:, 0], v[:, 0], log_decay, cache.state, scale=self.scale)[:, None]
        o, state = lightning_attention(
            q, k, v, log_decay, scale=self.scale,
            initial_state=cache.state if cache is not None else None,
            output_final_state=cache is not None, cu_seqlens=ctx.cu_seqlens,
        )
        if cache is not None:
            cache.state = state
        return o

    def outputs(self, o: torch.Tensor, z: torch.Tensor | None, x_dtype: torch.dtype,
                ops: ElementwiseOps = REFERENCE_OPS) -> torch.Tensor:
        """o [B, T, H, D] -> [B, T, hidden]; x_dtype: the dtype of the layer's input x."""
        # o's working dtype: x's promoted by the weights' (fp32 under autocast over fp32 weights, also when the
        # decoder norm hands x over in bf16: the norm's "autocast" output mode); an FP8 o_proj (sala.modeling.fp8)
        # names the dtype of the Linear it replaced
        w_dtype = getattr(self.o_proj, "compute_dtype", self.o_proj.weight.dtype)
        return self.finish(o, z, torch.promote_types(x_dtype, w_dtype), ops)

    def forward(self, x: torch.Tensor, ctx: ForwardContext, cache: LightningLayerCache | None = None) -> torch.Tensor:
        q, k, v, z = self.inputs(x, *self.rope(ctx), ctx.position_ids, ctx.ops)
        o = self.attend(q, k, v, ctx, cache)
        del q, k, v   # a long prefill chunk's q, k, v: freed before the output projection
        return self.outputs(o, z, x.dtype, ctx.ops)


# ----------------------------------------------------------------------------- InfLLM-V2 sparse attention layer
def sparse_params_from_config(config: SalaConfig) -> SparseParams:
    """The InfLLM-V2 settings of `config.sparse_config` (dense_len and use_nope play no part in the semantics)."""
    sc = config.sparse_config
    return SparseParams(block_size=sc["block_size"], kernel_size=sc["kernel_size"], kernel_stride=sc["kernel_stride"],
                        topk=sc["topk"], init_blocks=sc["init_blocks"], window_size=sc["window_size"])


class SalaSparseAttention(FusedProjections, nn.Module):
    """InfLLM-V2 sparse attention: GQA, NoPE (by default), output gate; dense-exact for short contexts."""

    def __init__(self, config: SalaConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim ** -0.5
        self.params = sparse_params_from_config(config)
        h, d, bias = config.hidden_size, self.head_dim, config.attention_bias
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=bias)
        self.o_gate = nn.Linear(h, self.num_heads * d, bias=bias) if config.attn_use_output_gate else None
        self.gate_name = "o_gate" if config.attn_use_output_gate else None
        self.qkv_proj = None
        self.register_load_state_dict_pre_hook(_fuse_on_load)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k1: torch.Tensor | None = None,
                k2: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """q [1|B, Tq, Hq, D] at the last Tq positions of k/v [.., Tk, Hkv, D]."""
        if self.config.use_sparse_attention:
            return infllmv2_attention(q, k, v, self.params, scale=self.scale, k1=k1, k2=k2, cu_seqlens=cu_seqlens)
        return dense_causal_attention(q, k, v, scale=self.scale, cu_seqlens=cu_seqlens)

    def prepare(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE when attn_use_rope (off as released: NoPE) and opt-in HyPE query scaling; q, k [B, T, H, D]."""
        if self.config.attn_use_rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.config.hype_query_scale_base is not None:   # HyPE: s_t = log(t + a) / log(a)
            a = float(self.config.hype_query_scale_base)
            s = torch.log(position_ids.float() + a) / math.log(a)
            q = (q.float() * s[:, :, None, None]).to(q.dtype)
        return q, k

    def finish(self, o: torch.Tensor, gate: torch.Tensor | None, ops: ElementwiseOps = REFERENCE_OPS) -> torch.Tensor:
        """o [B, T, Hq, D] -> * sigmoid(gate) (gate = o_gate(x)) -> o_proj: [B, T, hidden]."""
        B, T = o.shape[:2]
        o = o.reshape(B, T, self.num_heads * self.head_dim)
        return self.o_proj(ops.rms_norm_gate(o, None, 0.0, gate, normalize=False))

    def rope(self, ctx: ForwardContext) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """cos, sin of RoPE for the call's positions when attn_use_rope (off as released), else (None, None)."""
        return ctx.rope(self.head_dim, self.config.rope_theta) if self.config.attn_use_rope else (None, None)

    def inputs(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
               position_ids: torch.Tensor | None = None, ops: ElementwiseOps = REFERENCE_OPS
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """x [B, T, hidden] -> q [B, T, Hq, D], k, v [B, T, Hkv, D] for the attention op, and the gate input."""
        q, k, v, gate = self.project_qkv(x)
        q, k = self.prepare(q, k, cos, sin, position_ids)
        return q, k, v, gate

    def outputs(self, o: torch.Tensor, gate: torch.Tensor | None, x_dtype: torch.dtype | None = None,
                ops: ElementwiseOps = REFERENCE_OPS) -> torch.Tensor:
        """o [B, T, Hq, D] -> [B, T, hidden] (x_dtype: unused, the lightning layers' signature)."""
        return self.finish(o, gate, ops)

    def _attend_prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """A chunk of one sequence (B = 1): its K/V written into the static cache row after `ctx.start` cached
        tokens, the compressed keys extended, attention over everything cached."""
        buf = ctx.cache.sparse[self.layer_idx]
        row, start = ctx.row, ctx.start
        end = start + q.shape[1]
        if getattr(ctx.cache, "block_table", None) is not None:
            return self._attend_prefill_paged(q, k, v, buf, ctx, end)
        buf.k[row, start:end] = k[0]
        buf.v[row, start:end] = v[0]
        n1, n2 = self._extend_compressed(buf, row, start, end, lambda a, b: buf.k[row:row + 1, a:b])
        return self._attend(q.contiguous(), buf.k[row:row + 1, :end], buf.v[row:row + 1, :end],
                            buf.k1[row:row + 1, :n1], buf.k2[row:row + 1, :n2])

    def _extend_compressed(self, buf: Any, row: int, start: int, end: int, keys: Any) -> tuple[int, int]:
        """Write row `row`'s K1/K2 windows completed by keys [start, end) (`keys(a, b)`: its keys a..b-1 as
        [1, b - a, Hkv, D]); returns (n1, n2), the windows among `end` keys."""
        p = self.params
        n1_old, n2_old = compressed_lengths(start, p)
        n1, n2 = compressed_lengths(end, p)
        for comp, kernel, stride, lo, hi in ((buf.k1, p.kernel_size, p.kernel_stride, n1_old, n1),
                                             (buf.k2, p.k2_kernel, p.k2_stride, n2_old, n2)):
            if hi > lo:      # windows lo..hi-1 cover keys stride * lo .. stride * (hi - 1) + kernel - 1
                comp[row, lo:hi] = compress_keys(keys(stride * lo, stride * (hi - 1) + kernel), kernel, stride)[0]
        return n1, n2

    @staticmethod
    def _write_paged(buf: Any, table: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext) -> None:
        """Write the call's keys and values k, v [B, T, Hkv, D] at their positions (`ctx.position_ids`) into the
        pages of rows table int32 [B, NB]; the pool rows are computed once per call for every sparse layer."""
        rows = ctx.shared("paged_rows", lambda: paged_rows(table, ctx.position_ids, buf.k.shape[1]))
        write_paged_rows(buf.k, rows, k)
        write_paged_rows(buf.v, rows, v)

    def _attend_prefill_paged(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, buf: Any,
                              ctx: ForwardContext, end: int) -> torch.Tensor:
        """`_attend_prefill` over a paged cache: K/V written into the row's pages, the compressed keys extended
        from the keys their windows cover, attention read through the pages."""
        row = ctx.row
        table_row = ctx.cache.block_table[row]
        self._write_paged(buf, table_row[None], k, v, ctx)
        n1, n2 = self._extend_compressed(buf, row, ctx.start, end,
                                         lambda a, b: gather_paged_range(buf.k, table_row, a, b))
        if self.config.use_sparse_attention:
            return infllmv2_attention_paged(q.contiguous(), buf.k, buf.v, table_row, end, buf.k1[row:row + 1, :n1],
                                            buf.k2[row:row + 1, :n2], self.params, scale=self.scale)
        return dense_causal_attention(q, gather_paged_range(buf.k, table_row, 0, end),
                                      gather_paged_range(buf.v, table_row, 0, end), scale=self.scale)

    def _attend_decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """T tokens for every row of the static cache (positions `ctx.position_ids` [B, T], from the device
        lengths); static shapes, no host sync. Token j of a row sees the row's cache and tokens 0..j. Positions
        past the capacity (a padded verify row near its end, never accepted) are clamped: their keys land on the
        last slot, beyond the row's length, and their outputs are garbage nobody reads."""
        buf = ctx.cache.sparse[self.layer_idx]
        table = getattr(ctx.cache, "block_table", None)         # a paged cache: int32 [B, NB]
        B, T = q.shape[:2]
        S = buf.k.shape[1] if table is None else table.shape[1] * buf.k.shape[1]
        pos = ctx.position_ids
        if table is None:
            wpos = pos.clamp(max=S - 1)
            rows = torch.arange(B, device=q.device)[:, None].expand(B, T)
            buf.k.index_put_((rows, wpos), k)
            buf.v.index_put_((rows, wpos), v)
        else:                   # unmapped blocks (an idle row, a padded verify position) point at the scratch page
            self._write_paged(buf, table, k, v, ctx)
        seqlens = (pos + 1).clamp(max=S).to(torch.int32)                     # [B, T]: keys each token sees
        out = ctx.out.get("sparse")
        if self.config.use_sparse_attention:
            update_compressed_keys(buf.k, buf.k1, buf.k2, seqlens[:, -1].contiguous(), self.params, new_tokens=T,
                                   block_table=table)
            o = infllmv2_decode(q.reshape(B * T, self.num_heads, self.head_dim), buf.k, buf.v, buf.k1, buf.k2,
                                seqlens.reshape(B * T), self.params, scale=self.scale,
                                out=out.view(B * T, self.num_heads, self.head_dim) if out is not None else None,
                                queries_per_row=T, block_table=table)
            return o.view(B, T, self.num_heads, self.head_dim)
        # dense attention over the valid prefix of every token
        kc, vc = (buf.k, buf.v) if table is None else (gather_paged(buf.k, table, S), gather_paged(buf.v, table, S))
        valid = torch.arange(S, device=q.device)[None, None, :] < seqlens[:, :, None].long()     # [B, T, S]
        o = F.scaled_dot_product_attention(q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2),
                                           attn_mask=valid[:, None], scale=self.scale, enable_gqa=True)
        return o.transpose(1, 2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext,
               cache: SparseLayerCache | None = None) -> torch.Tensor:
        """The attention op over the call's documents (row by row with padding or a cache): o [B, T, Hq, D]."""
        if ctx.mode == PREFILL:
            return self._attend_prefill(q, k, v, ctx)
        if ctx.mode == DECODE:
            return self._attend_decode(q, k, v, ctx)
        B, T = q.shape[:2]
        if cache is None and ctx.pad is None:
            return self._attend(q, k, v, cu_seqlens=ctx.cu_seqlens)
        # Row by row: each sequence keeps only its real tokens, so block boundaries are its own.
        o = q.new_zeros(B, T, self.num_heads, self.head_dim)
        for b in range(B):
            p = ctx.pad[b] if ctx.pad is not None else 0
            if p == T:
                continue
            if cache is None:
                o[b:b + 1, p:] = self._attend(q[b:b + 1, p:], k[b:b + 1, p:], v[b:b + 1, p:])
            else:
                cache.append(b, k[b, p:], v[b, p:], B)
                kb, vb, k1, k2 = cache.sequence(b)
                if torch.is_grad_enabled():   # views of buffers the next rows' appends write: autograd saves copies
                    kb, vb = kb.clone(), vb.clone()
                o[b:b + 1, p:] = self._attend(q[b:b + 1, p:], kb, vb, k1, k2)
        return o

    def forward(self, x: torch.Tensor, ctx: ForwardContext, cache: SparseLayerCache | None = None) -> torch.Tensor:
        q, k, v, gate = self.inputs(x, *self.rope(ctx), ctx.position_ids, ctx.ops)
        o = self.attend(q, k, v, ctx, cache)
        del q, k, v
        return self.outputs(o, gate, x.dtype, ctx.ops)


# ----------------------------------------------------------------------------- MLP
class SalaMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); gate and up optionally one real `gate_up_proj` Linear (one GEMM)."""

    def __init__(self, config: SalaConfig) -> None:
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (SALA uses 'silu')")
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.gate_up_proj: nn.Linear | None = None
        self.interleave = False
        self.intermediate_size = config.intermediate_size
        self.register_load_state_dict_pre_hook(_fuse_on_load)

    @property
    def fused(self) -> bool:
        return self.gate_up_proj is not None

    def fuse_projections(self, interleave: bool = False) -> None:
        """gate and up as one Linear: their rows one after the other ([gate | up], what the fused `silu_mul` op
        reads), or with `interleave` alternating (each gate/up pair side by side, for training, where the SwiGLU
        and its backward then read and write adjacent elements)."""
        if self.fused:
            return
        self.gate_up_proj = _concat_linears([self.gate_proj, self.up_proj], interleave=interleave)
        self.interleave = interleave
        self.gate_proj = self.up_proj = None

    def unfuse_projections(self) -> None:
        if not self.fused:
            return
        self.gate_proj, self.up_proj = _split_linear(self.gate_up_proj, [self.intermediate_size] * 2, self.interleave)
        self.gate_up_proj = None
        self.interleave = False

    def fused_parts(self) -> dict[str, list[tuple[str, int]]]:
        if not self.fused:
            return {}
        return {"gate_up_proj.weight": [("gate_proj.weight", self.intermediate_size),
                                        ("up_proj.weight", self.intermediate_size)]}

    def _swiglu(self, x: torch.Tensor, ops: ElementwiseOps) -> torch.Tensor:
        if not self.fused:
            return F.silu(self.gate_proj(x)) * self.up_proj(x)
        gate_up = self.gate_up_proj(x)
        if self.interleave:
            gate_up = gate_up.unflatten(-1, (-1, 2))
            return F.silu(gate_up[..., 0]) * gate_up[..., 1]
        return ops.silu_mul(gate_up)

    def forward(self, x: torch.Tensor, ops: ElementwiseOps = REFERENCE_OPS) -> torch.Tensor:
        T = x.shape[-2] if x.dim() >= 2 else 1
        if T <= MLP_SLICE_TOKENS or torch.is_grad_enabled():
            return self.down_proj(self._swiglu(x, ops))
        # inference over many tokens: in slices, so the [tokens, 2 x intermediate] activations stay bounded
        out = torch.empty(x.shape[:-1] + (self.down_proj.out_features,), dtype=x.dtype, device=x.device)
        for a in range(0, T, MLP_SLICE_TOKENS):
            out[..., a:a + MLP_SLICE_TOKENS, :] = self.down_proj(self._swiglu(x[..., a:a + MLP_SLICE_TOKENS, :], ops))
        return out


# ----------------------------------------------------------------------------- decoder
class SalaDecoderLayer(GradientCheckpointingLayer):
    """h += mixer(norm(h)) * s ; h += mlp(norm(h)) * s, with s = scale_depth / sqrt(num_layers).

    Each residual add is one op with the norm after it: the post-attention norm, and for the MLP's the next
    layer's input norm (or the final norm) when the caller passes it as `next_norm`."""

    def __init__(self, config: SalaConfig, layer_idx: int) -> None:
        super().__init__()
        self.mixer_type = config.mixer_types[layer_idx]
        mixer = SalaSparseAttention if self.mixer_type == SPARSE else SalaLightningAttention
        self.self_attn = mixer(config, layer_idx)
        self.mlp = SalaMLP(config)
        self.input_layernorm = SalaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = SalaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.residual_scale = config.residual_scale
        # True (`SalaForCausalLM.compile_for_training(blocks=True)`): without a cache or padding (training) the
        # layer runs as `pre_attention`, the attention op, `post_attention` (two compiled regions). Otherwise it
        # calls its attention module (whose forward hooks, e.g. the conversion's captures, then fire).
        self.use_blocks = False

    def pre_attention(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                      position_ids: torch.Tensor | None, ops: ElementwiseOps = REFERENCE_OPS
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Everything before the attention op on the normed input x: projections, QK-norm / RoPE. Returns q, k, v
        and the gate input."""
        return self.self_attn.inputs(x, cos, sin, position_ids, ops)

    def post_attention(self, hidden: torch.Tensor, o: torch.Tensor, gate: torch.Tensor | None, x_dtype: torch.dtype,
                       next_norm: SalaRMSNorm | None, ops: ElementwiseOps = REFERENCE_OPS
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Everything after it: output norm / gate / projection, residual, norm, MLP, residual (+ next norm)."""
        return self.residual_and_mlp(hidden, self.self_attn.outputs(o, gate, x_dtype, ops), ops, next_norm)

    def residual_and_mlp(self, hidden: torch.Tensor, attn_out: torch.Tensor, ops: ElementwiseOps,
                         next_norm: SalaRMSNorm | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer after its attention module: residual + norm, MLP, residual (+ `next_norm`). Returns the new
        hidden and next_norm of it (None without next_norm)."""
        hidden, normed = self.post_attention_layernorm.add_and_norm(hidden, attn_out, self.residual_scale, ops)
        del attn_out
        return self.mlp_and_residual(hidden, normed, ops, next_norm)

    def mlp_and_residual(self, hidden: torch.Tensor, normed: torch.Tensor, ops: ElementwiseOps,
                         next_norm: SalaRMSNorm | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """MLP of the post-attention-normed hidden, residual (+ `next_norm`)."""
        m = self.mlp(normed, ops)
        del normed
        if next_norm is None:
            return hidden + m * self.residual_scale, None
        return next_norm.add_and_norm(hidden, m, self.residual_scale, ops)

    def forward(self, hidden: torch.Tensor, ctx: ForwardContext, cache: Any = None, normed: torch.Tensor | None = None,
                next_norm: SalaRMSNorm | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden [B, T, hidden] -> (new hidden, next_norm(new hidden) or None). normed: input_layernorm(hidden)
        when the caller has it (the previous layer's `next_norm` output)."""
        if normed is None:
            normed = self.input_layernorm(hidden, ctx.ops)
        if self.use_blocks and cache is None and ctx.mode == FULL and ctx.pad is None and ctx.real_mask is None:
            x_dtype = normed.dtype
            q, k, v, gate = self.pre_attention(normed, *self.self_attn.rope(ctx), ctx.position_ids)
            del normed
            return self.post_attention(hidden, self.self_attn.attend(q, k, v, ctx), gate, x_dtype, next_norm)
        attn_out = self.self_attn(normed, ctx, cache)
        del normed   # long prefill chunks: each [T, hidden] activation is freed as soon as it is used
        hidden, normed = self.post_attention_layernorm.add_and_norm(hidden, attn_out, self.residual_scale, ctx.ops)
        del attn_out
        return self.mlp_and_residual(hidden, normed, ctx.ops, next_norm)


class SalaPreTrainedModel(PreTrainedModel):
    config_class = SalaConfig
    config: SalaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["SalaDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _is_stateful = True
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            _init_normal(module.weight, std)
            if getattr(module, "bias", None) is not None:
                _init_zeros(module.bias)
        elif isinstance(module, SalaRMSNorm):
            _init_ones(module.weight)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False   # SALA needs its own hybrid cache; the model creates a SalaCache itself

    # ------------------------------------------------------------------ fused projections
    def fuse_projections(self, *, interleave_mlp: bool = False) -> int:
        """Replace each attention layer's q, k, v and output-gate Linears by one real `qkv_proj` and each MLP's gate
        and up by one `gate_up_proj` (one GEMM per group: fewer launches, one read of the shared input, one
        input-gradient GEMM in training). interleave_mlp: gate/up rows alternating (training) instead of [gate | up]
        (what the fused `silu_mul` inference op reads). Same values; `save_pretrained` still writes the released
        layout. Returns the modules fused."""
        n = 0
        for m in self.modules():
            if isinstance(m, SalaMLP):
                m.fuse_projections(interleave=interleave_mlp)
                n += 1
            elif isinstance(m, FusedProjections):
                m.fuse_projections()
                n += 1
        return n

    def unfuse_projections(self) -> int:
        """Undo `fuse_projections`: separate Linears again (the released layout). Returns the modules switched."""
        n = 0
        for m in self.modules():
            if isinstance(m, (SalaMLP, FusedProjections)):
                m.unfuse_projections()
                n += 1
        return n

    @property
    def projections_fused(self) -> bool:
        return any(getattr(m, "fused", False) for m in self.modules() if isinstance(m, (SalaMLP, FusedProjections)))

    def released_state_dict(self, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """`state_dict` (default: this model's) with fused projection weights split back into the released layout
        (q_proj, k_proj, v_proj, z_proj / o_gate, gate_proj, up_proj)."""
        sd = dict(self.state_dict() if state_dict is None else state_dict)
        for name, m in self.named_modules():
            if not isinstance(m, (SalaMLP, FusedProjections)):
                continue
            prefix = f"{name}." if name else ""
            interleave = getattr(m, "interleave", False)
            for fused_name, parts in m.fused_parts().items():
                key = prefix + fused_name
                if key not in sd:
                    continue
                t = sd.pop(key)
                offset = 0
                for j, (part, rows) in enumerate(parts):
                    sd[prefix + part] = t[j::len(parts)] if interleave else t[offset:offset + rows]
                    offset += rows
        return sd

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any,
                        state_dict: dict[str, torch.Tensor] | None = None, **kwargs: Any) -> Any:
        """transformers' save_pretrained, always in the released checkpoint layout (fused projections split)."""
        if self.projections_fused:
            state_dict = {k: v.contiguous() for k, v in self.released_state_dict(state_dict).items()}
        return super().save_pretrained(save_directory, *args, state_dict=state_dict, **kwargs)

    def set_norm_output_mode(self, mode: str) -> None:
        """Output dtype mode of every decoder layer's two RMSNorms (NORM_OUTPUT_MODES; "autocast" goes with fused
        projections in training: each of these norms feeds one GEMM)."""
        for m in self.modules():
            if isinstance(m, SalaDecoderLayer):
                m.input_layernorm.set_output_mode(mode)
                m.post_attention_layernorm.set_output_mode(mode)


try:  # transformers 5: guarded init functions that leave loaded weights alone
    from transformers import initialization as _hf_init
    _init_normal = lambda w, std: _hf_init.normal_(w, mean=0.0, std=std)   # noqa: E731
    _init_zeros, _init_ones = _hf_init.zeros_, _hf_init.ones_
except ImportError:  # pragma: no cover
    _init_normal = lambda w, std: nn.init.normal_(w, mean=0.0, std=std)    # noqa: E731
    _init_zeros, _init_ones = nn.init.zeros_, nn.init.ones_


# transformers renamed the cache of model outputs and of `forward` from `past_key_values` to `cache` (5.24);
# SALA accepts both names and fills whichever field this version's output classes have.
CACHE_FIELD = "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"


def output_cache(out: Any) -> Any:
    """The cache of a model output, under either name (transformers before and after 5.24)."""
    if "cache" in getattr(out, "__dataclass_fields__", {}):
        return out.cache
    return getattr(out, "past_key_values", None)


def cache_keyword(model: nn.Module) -> str:
    """The keyword under which `model.forward` takes its cache: "cache" (transformers >= 5.24 models) or
    "past_key_values" (older ones, and SALA, which accepts both)."""
    import inspect

    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def _cache_argument(past_key_values: Any, kwargs: dict) -> Any:
    """`past_key_values`, or the `cache` keyword that transformers >= 5.24 passes instead (both: an error)."""
    cache = kwargs.pop("cache", None)
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the cache once: as past_key_values or as cache, not both")
    return past_key_values if past_key_values is not None else cache


def _forward_context(
    input_shape: tuple[int, int], device: torch.device, past: int, attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None, cu_seqlens: torch.Tensor | None, cache: SalaCache | None,
) -> ForwardContext:
    B, T = input_shape
    pad: list[int] | None = None
    real_mask = None
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"cu_seqlens packs documents into one row: input batch must be 1, got {B}")
        if cache is not None:
            raise ValueError("cu_seqlens (packed training batches) cannot be combined with a cache")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("cu_seqlens and a padding attention_mask cannot be combined")
        # Read the bounds to the host once per forward; the ops get a CPU tensor, so no layer syncs again.
        bounds = cu_seqlens.tolist()
        if (cu_seqlens.ndim != 1 or not bounds or bounds[0] != 0 or bounds[-1] != T
                or any(b < a for a, b in zip(bounds, bounds[1:]))):
            raise ValueError(f"cu_seqlens must be 1-D, non-decreasing, start at 0 and end at the sequence length "
                             f"{T}; got {bounds}")
        cu_host = torch.tensor(bounds, dtype=torch.int64)
        if position_ids is None:
            cu = cu_host.to(device)
            idx = torch.arange(T, device=device)
            doc = torch.searchsorted(cu[1:], idx, right=True)
            position_ids = (idx - cu[doc])[None]
        return ForwardContext(position_ids, cu_seqlens=cu_host)

    if attention_mask is not None:
        if attention_mask.ndim != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] != past + T:
            raise ValueError(f"attention_mask must be [batch, past + new tokens] = [{B}, {past + T}], "
                             f"got {list(attention_mask.shape)}")
        mask = attention_mask.to(device=device, dtype=torch.bool)
        new = mask[:, past:]
        if not bool(mask.all()):
            # Only left padding is supported: once a row has a real token, every later token is real.
            first_real = mask.int().cumsum(-1) > 0
            if bool((first_real & ~mask).any()):
                raise ValueError("attention_mask has padding after real tokens; SALA supports left padding only "
                                 "(tokenizer.padding_side = 'left')")
            pad = (~new).sum(-1).tolist()
            real_mask = new
        if position_ids is None:
            position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
    if position_ids is None:
        position_ids = torch.arange(past, past + T, device=device)[None].expand(B, T)
    return ForwardContext(position_ids, pad=pad, real_mask=real_mask)


class SalaModel(SalaPreTrainedModel):
    """The decoder stack: embed * scale_emb -> layers -> final RMSNorm."""

    def __init__(self, config: SalaConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(SalaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = SalaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def run_layers(self, hidden: torch.Tensor, ctx: ForwardContext, layer_caches: list | None = None,
                   final_norm: SalaRMSNorm | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The decoder layers on hidden [B, T, hidden] (embeddings x scale_emb). Returns the last hidden state and
        final_norm of it (None without final_norm). layer_caches: one `SalaCache` entry per layer (FULL mode)."""
        normed = None
        n = len(self.layers)
        for i, layer in enumerate(self.layers):
            nxt = self.layers[i + 1].input_layernorm if i + 1 < n else final_norm
            hidden, normed = layer(hidden, ctx, layer_caches[i] if layer_caches is not None else None, normed, nxt)
        if n == 0 and final_norm is not None:
            normed = final_norm(hidden, ctx.ops)
        return hidden, normed

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: SalaCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        cu_seqlens: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        past_key_values = _cache_argument(past_key_values, kwargs)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if input_ids is not None and input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, tokens], got shape {list(input_ids.shape)}")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        B, T = inputs_embeds.shape[:2]
        if use_cache is None:   # a forward that builds a graph (training) keeps no cache unless asked to
            use_cache = self.config.use_cache and not torch.is_grad_enabled()
        if self.training and self.gradient_checkpointing:
            use_cache = False
        if use_cache and past_key_values is None:
            past_key_values = SalaCache(self.config)
        if past_key_values is not None and not isinstance(past_key_values, SalaCache):
            raise TypeError(f"past_key_values must be a SalaCache, got {type(past_key_values).__name__}")
        cache = past_key_values if use_cache else None
        past = cache.seen_tokens if cache is not None else 0
        ctx = _forward_context((B, T), inputs_embeds.device, past, attention_mask, position_ids, cu_seqlens, cache)
        _, hidden = self.run_layers(inputs_embeds * self.config.scale_emb, ctx,
                                    cache.layers if cache is not None else None, final_norm=self.norm)
        if cache is not None:
            cache.seen_tokens += T
        return BaseModelOutputWithPast(last_hidden_state=hidden, **{CACHE_FIELD: cache})


def _mean_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits [B, T, vocab] against labels [B, T], labels -100 ignored."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


class SalaForCausalLM(SalaPreTrainedModel, GenerationMixin):
    """SALA causal LM: `SalaModel` + untied lm_head on h / (hidden_size / dim_model_base); logits in fp32."""

    _tied_weights_keys: list[str] = []

    def __init__(self, config: SalaConfig) -> None:
        super().__init__(config)
        self.model = SalaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # > 0: with labels, the loss comes from `linear_cross_entropy` over chunks of this many tokens and no logits
        # are returned (training: `set_loss_chunk`); 0: logits [B, T, vocab] fp32 and F.cross_entropy
        self.loss_chunk = 0
        # True: with labels, the loss comes from `lm_loss` and no logits are returned (`compile_for_training` with
        # compile_loss, which compiles `lm_loss` so the fp32 logits are never stored)
        self.loss_only = False
        self.post_init()

    def set_loss_chunk(self, chunk: int) -> None:
        """Training: compute the loss over token chunks of `chunk` tokens without the [tokens, vocab] logits
        (0: the plain loss with logits)."""
        if chunk < 0:
            raise ValueError(f"loss chunk must be >= 0 (0: the plain loss), got {chunk}")
        self.loss_chunk = int(chunk)

    def compile_for_training(self, backend: str = "inductor", blocks: bool = False,
                             compile_loss: bool = False) -> SalaForCausalLM:
        """torch.compile the fixed-shape, elementwise-heavy pieces in place (the attention ops stay eager: they take
        packed-document bounds from the host, a different list every step). Default: every decoder-level RMSNorm
        (alone and with the residual add before it), each MLP, each attention layer's `prepare` and `finish`. With
        `blocks`, instead each decoder layer as two regions around its attention op (`pre_attention`: projections,
        QK-norm, RoPE; `post_attention`: output norm, gate and projection, residual, norm, MLP, residual, next norm):
        fewer compiled calls per step, for steps the host cannot keep ahead of; with a cache or padding the layers run
        as before. `compile_loss`: also the LM head + cross-entropy (`lm_loss`), so the [tokens, vocab] fp32 logits are
        never stored; the model then returns no logits with its loss. Returns self."""
        def comp(fn):
            return torch.compile(fn, backend=backend, dynamic=False)

        layers = list(self.model.layers)
        if layers:   # the first layer's input norm runs on its own (every later norm follows a residual add)
            layers[0].input_layernorm.compile(backend=backend, dynamic=False)
        for layer in layers:
            if blocks:
                layer.pre_attention = comp(layer.pre_attention)
                layer.post_attention = comp(layer.post_attention)
                layer.use_blocks = True
                continue
            layer.mlp.compile(backend=backend, dynamic=False)
            layer.self_attn.prepare = comp(layer.self_attn.prepare)
            layer.self_attn.finish = comp(layer.self_attn.finish)
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.add_and_norm = comp(norm.add_and_norm)
        if not blocks:
            self.model.norm.add_and_norm = comp(self.model.norm.add_and_norm)
        if compile_loss:
            self.lm_loss = comp(self.lm_loss)
            self.loss_only = True
        return self

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: SalaCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        cu_seqlens: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=_cache_argument(past_key_values, kwargs), inputs_embeds=inputs_embeds,
                         use_cache=use_cache, cu_seqlens=cu_seqlens)
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden[:, logits_to_keep]
        shift_labels = None
        if labels is not None:
            if labels.shape != (hidden.shape[0], out.last_hidden_state.shape[1]):
                raise ValueError(f"labels must be [batch, tokens] = {list(out.last_hidden_state.shape[:2])}, "
                                 f"got {list(labels.shape)}")
            shift_labels = labels[:, 1:]
            if cu_seqlens is not None:   # never predict across a document boundary
                shift_labels = shift_labels.clone()
                ends = cu_seqlens.to(labels.device).long()[1:-1] - 1
                shift_labels[0, ends[(ends >= 0) & (ends < shift_labels.shape[1])]] = -100
        if shift_labels is not None and self.loss_only:   # training: LM head + loss in one (compiled) function
            loss = self.lm_loss(hidden[:, :-1], shift_labels)
            return CausalLMOutputWithPast(loss=loss, logits=None, **{CACHE_FIELD: output_cache(out)})
        if shift_labels is not None and self.loss_chunk:   # training: the loss without the [tokens, vocab] logits
            h = (hidden / self.config.logit_divisor)[:, :-1]
            loss = linear_cross_entropy(h.reshape(-1, h.shape[-1]), self.lm_head.weight, shift_labels.reshape(-1),
                                        chunk=self.loss_chunk)
            return CausalLMOutputWithPast(loss=loss, logits=None, **{CACHE_FIELD: output_cache(out)})
        logits = self.lm_logits(hidden)
        loss = None if shift_labels is None else _mean_cross_entropy(logits[:, :-1], shift_labels)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: output_cache(out)})

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits [B, T, vocab] of lm_head(hidden / logit_divisor); hidden [B, T, hidden_size]."""
        return self.lm_head(hidden / self.config.logit_divisor).float()

    def lm_loss(self, hidden: torch.Tensor, shift_labels: torch.Tensor) -> torch.Tensor:
        """`forward`'s loss from hidden [B, T', hidden_size] and shift_labels [B, T'], its logits not returned (so that
        compiled, they are never stored)."""
        return _mean_cross_entropy(self.lm_logits(hidden), shift_labels)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any):
        """Load a SALA checkpoint; a local directory is checked first (shards, keys, shapes) with clear errors."""
        import os

        from sala.modeling.checkpoint import validate_checkpoint_dir

        path = pretrained_model_name_or_path
        if isinstance(path, (str, os.PathLike)) and os.path.isdir(path):
            config = kwargs.get("config")
            if not isinstance(config, SalaConfig):
                config = SalaConfig.from_pretrained(path)
            validate_checkpoint_dir(path, config, cls)
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(path, *args, output_loading_info=True, **kwargs)
        problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if problems:
            raise ValueError(f"checkpoint {path} does not match {cls.__name__}: " +
                             "; ".join(f"{k}: {sorted(map(str, v))[:8]}" for k, v in problems.items()))
        return (model, info) if want_info else model
