"""MiniCPM-SALA in PyTorch: 25% InfLLM-V2 sparse-attention layers + 75% Lightning linear-attention layers.

Read top to bottom: norms and RoPE, the two mixers, the MLP, the decoder layer, the model, the LM head.
Shapes: B batch, T new tokens, H heads, D head dim, Hkv key/value heads. Semantics: shared/spec/SALA.md.
"""
from __future__ import annotations

import math
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
from sala.ops.dense import dense_causal_attention
from sala.ops.fused_reference import qk_norm_rope_reference, rms_norm_gate_reference, rms_norm_reference
from sala.ops.infllmv2 import SparseParams, infllmv2_attention
from sala.ops.lightning import lightning_attention, lightning_decode_step
from sala.ops.linear_cross_entropy import linear_cross_entropy
from sala.ops.slopes import lightning_log_decay


# ----------------------------------------------------------------------------- building blocks
class SalaRMSNorm(nn.Module):
    """RMSNorm over the last dim: variance in fp32, cast back to the input dtype, then times the weight.

    `autocast_output` (set with fused projections on the decoder layers' two norms, each of which then feeds one
    GEMM): under autocast the output is in the autocast dtype, which that GEMM would cast it to anyway, so the same
    values and gradients without a separate cast kernel and its fp32 copy (compiled, the cast fuses into the norm)."""

    autocast_output = False

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def output_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype `forward(x)` returns."""
        if self.autocast_output and torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return torch.promote_types(x.dtype, self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = rms_norm_reference(x, self.weight, self.eps)
        return y.to(self.output_dtype(x)) if self.autocast_output else y


def _norm_args(norm: SalaRMSNorm | None) -> tuple[torch.Tensor | None, float]:
    """(weight, eps) of an optional RMSNorm, as the functional ops take them (None, 0.0 when absent)."""
    return (norm.weight, norm.eps) if norm is not None else (None, 0.0)


def rope_cos_sin(position_ids: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, T, dim] in fp32 for NeoX ("rotate half") RoPE at integer positions [B, T]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=position_ids.device, dtype=torch.float32) / dim))
    freqs = position_ids.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, H, D] by cos/sin [B, T, D]; computed in fp32, returned in x.dtype."""
    return qk_norm_rope_reference(x, None, 0.0, cos, sin)


def project(x: torch.Tensor, linears: list[nn.Linear], fused: bool) -> list[torch.Tensor]:
    """x through several Linear layers that share it: [l(x) for l in linears], or with `fused` one GEMM over their
    concatenated weights, split back (views). Same values; for training, where it makes one autocast cast of x and
    one input-gradient GEMM instead of one per layer plus their sums (`set_fused_projections`)."""
    if not fused:
        return [lin(x) for lin in linears]
    weight = torch.cat([lin.weight for lin in linears])
    bias = None if linears[0].bias is None else torch.cat([lin.bias for lin in linears])
    return list(F.linear(x, weight, bias).split([lin.out_features for lin in linears], dim=-1))


def project_qkv(layer: nn.Module, x: torch.Tensor, gate: nn.Linear | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """An attention layer's q [B, T, H, D], k, v [B, T, Hkv, D] and output-gate input (None without a gate) from x
    [B, T, hidden], through `project` (one GEMM when the layer's fuse_projections is set)."""
    B, T, _ = x.shape
    q, k, v, *g = project(x, [layer.q_proj, layer.k_proj, layer.v_proj, *([gate] if gate is not None else [])],
                          layer.fuse_projections)
    return (q.view(B, T, layer.num_heads, layer.head_dim), k.view(B, T, layer.num_kv_heads, layer.head_dim),
            v.view(B, T, layer.num_kv_heads, layer.head_dim), g[0] if g else None)


class SalaMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    fuse_projections = False   # gate and up as one GEMM; set by the trainer
    # with fuse_projections: the one GEMM's weight interleaves gate and up rows, so the SwiGLU reads (and its backward
    # writes) each gate/up pair side by side, instead of two halves a row apart (`project`'s concatenation)
    interleave_fused = True

    def __init__(self, config: SalaConfig) -> None:
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (SALA uses 'silu')")
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fuse_projections and self.interleave_fused:
            weight = torch.stack([self.gate_proj.weight, self.up_proj.weight], dim=1).flatten(0, 1)   # [2I, hidden]
            gate_up = F.linear(x, weight).unflatten(-1, (-1, 2))                                     # [..., I, 2]
            gate, up = gate_up[..., 0], gate_up[..., 1]
        else:
            gate, up = project(x, [self.gate_proj, self.up_proj], self.fuse_projections)
        return self.down_proj(F.silu(gate) * up)


class _Batch:
    """Per-call facts shared by all layers: positions, padding, packing."""

    def __init__(self, position_ids: torch.Tensor, pad: list[int] | None, cu_seqlens: torch.Tensor | None,
                 real_mask: torch.Tensor | None) -> None:
        self.position_ids = position_ids        # [B, T]
        self.pad = pad                          # new left-pad tokens per row in this call, or None
        self.cu_seqlens = cu_seqlens            # [N+1] packed documents (B == 1), on the CPU, or None
        self.real_mask = real_mask              # [B, T] bool, True for real tokens, or None
        self._rope: dict[tuple[int, float], tuple[torch.Tensor, torch.Tensor]] = {}

    def rope(self, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
        key = (dim, theta)
        if key not in self._rope:
            self._rope[key] = rope_cos_sin(self.position_ids, dim, theta)
        return self._rope[key]


# ----------------------------------------------------------------------------- lightning attention layer
class SalaLightningAttention(nn.Module):
    """Lightning linear attention: QK-norm, RoPE, fixed per-head decay (ALiBi slopes), o_norm, z gate."""

    fuse_projections = False   # q, k, v and the gate as one GEMM (`project`); set by the trainer

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

    def log_decay(self, device: torch.device) -> torch.Tensor:
        """log(gamma_h) [H] fp32; recomputed (cheap), so nothing depends on buffers surviving a load."""
        return lightning_log_decay(self.num_heads, device=device)

    def prepare(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor | None,
                sin: torch.Tensor | None, qk_norm_rope=qk_norm_rope_reference
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """QK-norm, RoPE (cos/sin [B, T, D]), one dtype, GQA expansion: q, k, v [B, T, H(kv), D] -> [B, T, H, D].
        qk_norm_rope: the op doing norm + rotation (`sala.ops.fused` signature; the engine passes its kernel)."""
        if not self.use_rope:
            cos = sin = None
        q = qk_norm_rope(q, *_norm_args(self.q_norm), cos, sin)
        k = qk_norm_rope(k, *_norm_args(self.k_norm), cos, sin)
        # Under autocast the projections are low precision while fp32 norm weights promote q and k: one dtype.
        q, k = q.to(v.dtype), k.to(v.dtype)
        if self.num_kv_heads != self.num_heads:
            rep = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        return q, k, v

    def finish(self, o: torch.Tensor, z: torch.Tensor | None, dtype: torch.dtype,
               rms_norm_gate=rms_norm_gate_reference) -> torch.Tensor:
        """o [B, T, H, D] -> o_norm over all heads -> * sigmoid(z) (z = z_proj(x)) -> o_proj: [B, T, hidden].
        rms_norm_gate: the op doing norm + gate (`sala.ops.fused` signature; the engine passes its kernel)."""
        B, T = o.shape[:2]
        o = o.reshape(B, T, self.num_heads * self.head_dim).to(dtype)
        o = rms_norm_gate(o, *_norm_args(self.o_norm), z, normalize=self.o_norm is not None)
        return self.o_proj(o)

    def rope(self, batch: _Batch) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """cos, sin of this layer's RoPE for the batch's positions, or (None, None) without RoPE."""
        return batch.rope(self.head_dim, self.rope_theta) if self.use_rope else (None, None)

    def inputs(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
               position_ids: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """x [B, T, hidden] -> q, k, v [B, T, H, D] ready for the attention op, and the gate input z (or None)."""
        q, k, v, z = project_qkv(self, x, self.z_proj)
        q, k, v = self.prepare(q, k, v, cos, sin)
        return q, k, v, z

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: _Batch,
               cache: LightningLayerCache | None = None) -> torch.Tensor:
        """The lightning op over the batch's documents (or one decode step on the cache): o [B, T, H, D]."""
        if batch.real_mask is not None:   # padding tokens must not enter the state: zero their keys
            k = k * batch.real_mask[:, :, None, None].to(k.dtype)
        log_decay = self.log_decay(q.device)
        if cache is not None and cache.state is not None and q.shape[1] == 1:
            return lightning_decode_step(q[:, 0], k[:, 0], v[:, 0], log_decay, cache.state, scale=self.scale)[:, None]
        o, state = lightning_attention(
            q, k, v, log_decay, scale=self.scale,
            initial_state=cache.state if cache is not None else None,
            output_final_state=cache is not None, cu_seqlens=batch.cu_seqlens,
        )
        if cache is not None:
            cache.state = state
        return o

    def outputs(self, o: torch.Tensor, z: torch.Tensor | None, x_dtype: torch.dtype) -> torch.Tensor:
        """o [B, T, H, D] -> [B, T, hidden]; x_dtype: the dtype of the layer's input x."""
        # o's working dtype: x's promoted by the weights' (fp32 under autocast over fp32 weights, also when the
        # decoder norm hands x over in bf16: SalaRMSNorm.autocast_output)
        # (an FP8 o_proj, sala.modeling.fp8.Fp8Linear, names the dtype of the Linear it replaced: compute_dtype)
        return self.finish(o, z, torch.promote_types(x_dtype, getattr(self.o_proj, "compute_dtype",
                                                                       self.o_proj.weight.dtype)))

    def forward(self, x: torch.Tensor, batch: _Batch, cache: LightningLayerCache | None) -> torch.Tensor:
        q, k, v, z = self.inputs(x, *self.rope(batch))
        return self.outputs(self.attend(q, k, v, batch, cache), z, x.dtype)


# ----------------------------------------------------------------------------- InfLLM-V2 sparse attention layer
def sparse_params_from_config(config: SalaConfig) -> SparseParams:
    """The InfLLM-V2 settings of `config.sparse_config` (dense_len and use_nope play no part in the semantics)."""
    sc = config.sparse_config
    return SparseParams(block_size=sc["block_size"], kernel_size=sc["kernel_size"], kernel_stride=sc["kernel_stride"],
                        topk=sc["topk"], init_blocks=sc["init_blocks"], window_size=sc["window_size"])


class SalaSparseAttention(nn.Module):
    """InfLLM-V2 sparse attention: GQA, NoPE (by default), output gate; dense-exact for short contexts."""

    fuse_projections = False   # q, k, v and the gate as one GEMM (`project`); set by the trainer

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

    def finish(self, o: torch.Tensor, gate: torch.Tensor | None, rms_norm_gate=rms_norm_gate_reference) -> torch.Tensor:
        """o [B, T, Hq, D] -> * sigmoid(gate) (gate = o_gate(x)) -> o_proj: [B, T, hidden].
        rms_norm_gate: the gate op (`sala.ops.fused` signature, used without its norm; the engine passes its kernel)."""
        B, T = o.shape[:2]
        o = o.reshape(B, T, self.num_heads * self.head_dim)
        return self.o_proj(rms_norm_gate(o, None, 0.0, gate, normalize=False))

    def rope(self, batch: _Batch) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """cos, sin of RoPE for the batch's positions when attn_use_rope (off as released), else (None, None)."""
        return batch.rope(self.head_dim, self.config.rope_theta) if self.config.attn_use_rope else (None, None)

    def inputs(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
               position_ids: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """x [B, T, hidden] -> q [B, T, Hq, D], k, v [B, T, Hkv, D] for the attention op, and the gate input."""
        q, k, v, gate = project_qkv(self, x, self.o_gate)
        q, k = self.prepare(q, k, cos, sin, position_ids)
        return q, k, v, gate

    def outputs(self, o: torch.Tensor, gate: torch.Tensor | None, x_dtype: torch.dtype | None = None) -> torch.Tensor:
        """o [B, T, Hq, D] -> [B, T, hidden] (x_dtype: unused, the lightning layers' signature)."""
        return self.finish(o, gate)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: _Batch,
               cache: SparseLayerCache | None = None) -> torch.Tensor:
        """The attention op over the batch's documents (row by row with padding or a cache): o [B, T, Hq, D]."""
        B, T = q.shape[:2]
        if cache is None and batch.pad is None:
            o = self._attend(q, k, v, cu_seqlens=batch.cu_seqlens)
        else:
            # Row by row: each sequence keeps only its real tokens, so block boundaries are its own.
            o = q.new_zeros(B, T, self.num_heads, self.head_dim)
            for b in range(B):
                p = batch.pad[b] if batch.pad is not None else 0
                if p == T:
                    continue
                if cache is None:
                    o[b:b + 1, p:] = self._attend(q[b:b + 1, p:], k[b:b + 1, p:], v[b:b + 1, p:])
                else:
                    cache.append(b, k[b, p:], v[b, p:], B)
                    kb, vb, k1, k2 = cache.sequence(b)
                    o[b:b + 1, p:] = self._attend(q[b:b + 1, p:], kb, vb, k1, k2)
        return o

    def forward(self, x: torch.Tensor, batch: _Batch, cache: SparseLayerCache | None) -> torch.Tensor:
        q, k, v, gate = self.inputs(x, *self.rope(batch), batch.position_ids)
        return self.outputs(self.attend(q, k, v, batch, cache), gate)


# ----------------------------------------------------------------------------- decoder
class SalaDecoderLayer(GradientCheckpointingLayer):
    """h += mixer(norm(h)) * s ; h += mlp(norm(h)) * s, with s = scale_depth / sqrt(num_layers)."""

    def __init__(self, config: SalaConfig, layer_idx: int) -> None:
        super().__init__()
        self.mixer_type = config.mixer_types[layer_idx]
        mixer = SalaSparseAttention if self.mixer_type == SPARSE else SalaLightningAttention
        self.self_attn = mixer(config, layer_idx)
        self.mlp = SalaMLP(config)
        self.input_layernorm = SalaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = SalaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.residual_scale = config.residual_scale

    def add_and_norm(self, hidden: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden + delta * s, post_attention_layernorm of it): one fused kernel when compiled for training."""
        hidden = hidden + delta * self.residual_scale
        return hidden, self.post_attention_layernorm(hidden)

    def add_residual(self, hidden: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """hidden + delta * s (compiled for training: the scale and the add in one kernel)."""
        return hidden + delta * self.residual_scale

    # True (set by `compile_for_training(..., blocks=True)`): without a cache or padding (training), the layer runs
    # as `pre_attention`, the attention op, `post_attention`: two compiled regions instead of six compiled pieces.
    # Otherwise it calls its attention module (whose forward hooks, e.g. the conversion's captures, then fire)
    use_blocks = False

    def pre_attention(self, hidden: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                      position_ids: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Everything before the attention op: norm, projections, QK-norm / RoPE. Returns q, k, v and the gate input."""
        return self.self_attn.inputs(self.input_layernorm(hidden), cos, sin, position_ids)

    def post_attention(self, hidden: torch.Tensor, o: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        """Everything after it: output norm / gate / projection, residual, norm, MLP, residual. Returns the new hidden."""
        x_dtype = self.input_layernorm.output_dtype(hidden)   # the dtype of the attention layer's input
        return self.residual_and_mlp(hidden, self.self_attn.outputs(o, gate, x_dtype))

    def residual_and_mlp(self, hidden: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """The layer after its attention module: residual, norm, MLP, residual. Returns the new hidden."""
        hidden, normed = self.add_and_norm(hidden, attn_out)
        return self.add_residual(hidden, self.mlp(normed))

    def forward(self, hidden: torch.Tensor, batch: _Batch, cache: Any = None) -> torch.Tensor:
        if self.use_blocks and cache is None and batch.pad is None and batch.real_mask is None:
            q, k, v, gate = self.pre_attention(hidden, *self.self_attn.rope(batch), batch.position_ids)
            return self.post_attention(hidden, self.self_attn.attend(q, k, v, batch), gate)
        return self.residual_and_mlp(hidden, self.self_attn(self.input_layernorm(hidden), batch, cache))


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


def _positions_and_padding(
    input_shape: tuple[int, int], device: torch.device, past: int, attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None, cu_seqlens: torch.Tensor | None, cache: SalaCache | None,
) -> _Batch:
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
        return _Batch(position_ids, None, cu_host, None)

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
    return _Batch(position_ids, pad, None, real_mask)


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
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.training and self.gradient_checkpointing:
            use_cache = False
        if use_cache and past_key_values is None:
            past_key_values = SalaCache(self.config)
        if past_key_values is not None and not isinstance(past_key_values, SalaCache):
            raise TypeError(f"past_key_values must be a SalaCache, got {type(past_key_values).__name__}")
        cache = past_key_values if use_cache else None
        past = cache.seen_tokens if cache is not None else 0
        batch = _positions_and_padding((B, T), inputs_embeds.device, past, attention_mask, position_ids,
                                       cu_seqlens, cache)
        hidden = inputs_embeds * self.config.scale_emb
        for i, layer in enumerate(self.layers):
            hidden = layer(hidden, batch, cache.layers[i] if cache is not None else None)
        hidden = self.norm(hidden)
        if cache is not None:
            cache.seen_tokens += T
        return BaseModelOutputWithPast(last_hidden_state=hidden, **{CACHE_FIELD: cache})


def _mean_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits [B, T, vocab] against labels [B, T], labels -100 ignored."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


class SalaForCausalLM(SalaPreTrainedModel, GenerationMixin):
    """SALA causal LM: `SalaModel` + untied lm_head on h / (hidden_size / dim_model_base); logits in fp32."""

    _tied_weights_keys: list[str] = []
    # > 0: with labels, the loss comes from `linear_cross_entropy` over chunks of this many tokens and no logits are
    # returned (training; set by the trainer's model.loss_chunk); 0: logits [B, T, vocab] fp32 and F.cross_entropy
    loss_chunk: int = 0
    # True: with labels, the loss comes from `lm_loss` and no logits are returned (training; set with
    # model.compile_loss by `compile_for_training`, which compiles `lm_loss` so the fp32 logits are never stored)
    loss_only: bool = False

    def __init__(self, config: SalaConfig) -> None:
        super().__init__(config)
        self.model = SalaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

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
