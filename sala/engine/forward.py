"""The engine's own forward passes over a `SalaForCausalLM`'s weights, writing into a `StaticCache`.

- `prefill_sequence`: one sequence, in chunks of `chunk_size` tokens; lightning states carried from chunk
  to chunk, sparse K/V appended to the cache and compressed keys extended; only the last position's logits.
- `DecodeStep`: one new token for every sequence of the cache, with static shapes and no host syncs (so a
  CUDA graph can capture it): lightning_decode_step(out=...), K/V written at each sequence's own length,
  update_compressed_keys, infllmv2_decode.

Both compute exactly what `SalaForCausalLM.forward` computes (same modules, same op order); the tests
check it.
"""
from __future__ import annotations


import functools
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from sala.engine.memory import MLP_SLICE_TOKENS
from sala.engine.static_cache import StaticCache
from sala.modeling.configuration_sala import SalaConfig
from sala.modeling.fp8 import Fp8Linear, concat_fp8_linears
from sala.modeling.modeling_sala import SalaForCausalLM, rope_cos_sin, sparse_params_from_config
from sala.ops.dense import dense_causal_attention
from sala.ops.fused import add_rms_norm, qk_norm_rope, rms_norm, rms_norm_gate, silu_mul
from sala.ops.fused_reference import (add_rms_norm_reference, qk_norm_rope_reference, rms_norm_gate_reference,
                                      rms_norm_reference, silu_mul_reference)
from sala.ops.infllmv2 import (compress_window_range, compressed_lengths, infllmv2_attention, infllmv2_decode,
                               update_compressed_keys)
from sala.ops.lightning import lightning_attention, lightning_decode_step
from sala.ops.slopes import lightning_log_decay


def _fuse(linears: list[torch.nn.Linear]) -> tuple[torch.Tensor | Fp8Linear, list[int]]:
    """Concatenate bias-free Linear weights along the output dim; re-point each module at its slice.
    FP8 modules (`quantize_model_fp8`) give one stacked Fp8Linear instead of a weight (`_linear` runs either)."""
    if any(isinstance(m, Fp8Linear) for m in linears):
        if not all(isinstance(m, Fp8Linear) for m in linears):
            raise ValueError("engine: a layer's fused projections must be all FP8 or all unquantized; "
                             f"got {[type(m).__name__ for m in linears]} (skip whole groups in quantize_model_fp8)")
        return concat_fp8_linears(linears), [m.out_features for m in linears]
    if any(m.bias is not None for m in linears):
        raise ValueError("engine: fused projections need bias-free linear layers (attention_bias=False)")
    w = torch.cat([m.weight.detach() for m in linears], dim=0)
    sizes, o = [], 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight = torch.nn.Parameter(w[o:o + n], requires_grad=False)
        sizes.append(n)
        o += n
    return w, sizes


def _linear(x: torch.Tensor, w: torch.Tensor | Fp8Linear) -> torch.Tensor:
    """x @ w^T for a fused weight tensor, or the fused Fp8Linear module's forward."""
    return w(x) if isinstance(w, Fp8Linear) else F.linear(x, w)


class FusedOps(NamedTuple):
    """The elementwise pieces of a layer, as one set of functions (`sala.ops.fused` signatures)."""
    rms_norm: Callable
    add_rms_norm: Callable
    qk_norm_rope: Callable
    rms_norm_gate: Callable
    silu_mul: Callable


# Eager: the Triton kernels on CUDA (references elsewhere); the residual add updates h in place.
EAGER_OPS = FusedOps(rms_norm, functools.partial(add_rms_norm, inplace=True), qk_norm_rope, rms_norm_gate,
                     silu_mul)


# Unfused: the references, i.e. the modules' own chains of elementwise torch ops (for A/B comparisons).
REFERENCE_OPS = FusedOps(rms_norm_reference, add_rms_norm_reference, qk_norm_rope_reference,
                         rms_norm_gate_reference, silu_mul_reference)


def compiled_ops(backend: str = "inductor") -> FusedOps:
    """The references through torch.compile (dynamic shapes: one graph per piece for every layer and length)."""
    return FusedOps(*(torch.compile(f, backend=backend, dynamic=True) for f in REFERENCE_OPS))


def mlp_out(ops: FusedOps, layer, w_gate_up: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) for x [B, T, hidden], gate|up as one GEMM, in token slices of
    MLP_SLICE_TOKENS (bounds the [T, 2I] activations); returns [B, T, hidden]."""
    down = layer.mlp.down_proj
    T = x.shape[1]
    if T <= MLP_SLICE_TOKENS:
        return down(ops.silu_mul(_linear(x, w_gate_up)))
    out = torch.empty(x.shape[:-1] + (down.weight.shape[0],), dtype=x.dtype, device=x.device)
    for a in range(0, T, MLP_SLICE_TOKENS):
        out[:, a:a + MLP_SLICE_TOKENS] = down(ops.silu_mul(_linear(x[:, a:a + MLP_SLICE_TOKENS], w_gate_up)))
    return out


def decoder_layers(ops: FusedOps, layers, fused_mlp: list[torch.Tensor], h: torch.Tensor, rs: float, attention):
    """Run the decoder stack on h [B, T, hidden]: per layer a = attention(i, layer, norm(h)), then
    h += a * rs and h += mlp(norm(h)) * rs. Each residual add is fused with the norm that follows it
    (the next layer's input norm for the MLP's). Returns the last hidden state (before the final norm)."""
    first = layers[0].input_layernorm
    x = ops.rms_norm(h, first.weight, first.eps)
    for i, layer in enumerate(layers):
        a = attention(i, layer, x)
        del x
        post = layer.post_attention_layernorm
        h, x = ops.add_rms_norm(h, a, rs, post.weight, post.eps)
        del a
        m = mlp_out(ops, layer, fused_mlp[i], x)
        del x
        if i + 1 < len(layers):
            nxt = layers[i + 1].input_layernorm
            h, x = ops.add_rms_norm(h, m, rs, nxt.weight, nxt.eps)
        else:
            h = h + m * rs
        del m
    return h


class ModelRunner:
    """Holds a model, its per-layer constants and the sparse settings; runs prefill chunks.

    The elementwise pieces (RMSNorm with the residual add before it, QK-norm + RoPE, output norm + gate,
    SiLU x up) run as the fused kernels of `sala.ops.fused` (`ops` for prefill, `decode_ops` for decode).
    compile=True instead runs the prefill's pieces as torch.compile'd references (dynamic shapes: one graph
    per piece for every chunk length and layer); decode stays on the fused kernels (it is CUDA-graph
    captured). The first chunk pays the compilation.
    """

    def __init__(self, model: SalaForCausalLM, *, compile: bool = False, compile_backend: str = "inductor") -> None:
        self.model = model
        self.config: SalaConfig = model.config
        self.device = model.lm_head.weight.device
        self.dtype = model.model.embed_tokens.weight.dtype     # the activations' (the LM head may be FP8)
        self.params = sparse_params_from_config(self.config)
        self.layers = list(model.model.layers)
        self.sparse_ids = set(self.config.sparse_layer_ids)
        self.log_decay = lightning_log_decay(self.config.lightning_nh, device=self.device)
        self.compiled = compile
        self.ops = compiled_ops(compile_backend) if compile else EAGER_OPS     # prefill
        self.decode_ops = EAGER_OPS                                             # decode (graph-captured)
        # Fused projection weights: one GEMM for q|k|v(|z or |o_gate) and one for gate|up per layer. The
        # modules' own weights become views into them, so no memory is added and the model is unchanged.
        self.fused_attn: list[torch.Tensor | Fp8Linear] = []
        self.fused_attn_split: list[list[int]] = []
        self.fused_mlp: list[torch.Tensor | Fp8Linear] = []
        for layer in self.layers:
            a = layer.self_attn
            extra = getattr(a, "z_proj", None) if layer.mixer_type != "minicpm4" else getattr(a, "o_gate", None)
            mods = [a.q_proj, a.k_proj, a.v_proj] + ([extra] if extra is not None else [])
            w, sizes = _fuse(mods)
            self.fused_attn.append(w)
            self.fused_attn_split.append(sizes)
            self.fused_mlp.append(_fuse([layer.mlp.gate_proj, layer.mlp.up_proj])[0])

    # ------------------------------------------------------------------ prefill
    def project(self, i: int, x: torch.Tensor) -> list[torch.Tensor]:
        """[q, k, v, z | o_gate] of layer i for x [B, T, hidden] with one GEMM (views of one output)."""
        return list(_linear(x, self.fused_attn[i]).split(self.fused_attn_split[i], dim=-1))

    def _lightning_prefill(self, i: int, attn, x: torch.Tensor, cos, sin, state: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        parts = self.project(i, x)
        q = parts[0].reshape(B, T, attn.num_heads, attn.head_dim)
        k = parts[1].reshape(B, T, attn.num_kv_heads, attn.head_dim)
        v = parts[2].reshape(B, T, attn.num_kv_heads, attn.head_dim)   # a view: the kernels take its strides
        z = parts[3] if attn.z_proj is not None else None
        del parts
        q, k, v = attn.prepare(q, k, v, cos, sin, qk_norm_rope=self.ops.qk_norm_rope)
        o, final = lightning_attention(q, k, v, self.log_decay, scale=attn.scale, initial_state=state,
                                       output_final_state=True)
        del q, k, v
        state.copy_(final)
        return attn.finish(o, z, x.dtype, rms_norm_gate=self.ops.rms_norm_gate)

    def _sparse_prefill(self, attn, x: torch.Tensor, positions: torch.Tensor, cos, sin, cache: StaticCache,
                        layer: int, row: int, start: int) -> torch.Tensor:
        B, T, _ = x.shape
        cfg = self.config
        parts = self.project(layer, x)
        q = parts[0].reshape(B, T, attn.num_heads, attn.head_dim).contiguous()
        k = parts[1].reshape(B, T, attn.num_kv_heads, attn.head_dim)
        v = parts[2].reshape(B, T, attn.num_kv_heads, attn.head_dim)
        gate = parts[3] if attn.o_gate is not None else None
        del parts
        q, k = attn.prepare(q, k, cos, sin, positions)
        buf = cache.sparse[layer]
        end = start + T
        buf.k[row, start:end] = k[0]
        buf.v[row, start:end] = v[0]
        del k, v
        keys, values = buf.k[row:row + 1, :end], buf.v[row:row + 1, :end]
        p = self.params
        n1_old, n2_old = compressed_lengths(start, p)
        n1, n2 = compressed_lengths(end, p)
        for comp, kernel, stride, lo, hi in ((buf.k1, p.kernel_size, p.kernel_stride, n1_old, n1),
                                             (buf.k2, p.k2_kernel, p.k2_stride, n2_old, n2)):
            if hi > lo:
                comp[row, lo:hi] = compress_window_range(buf.k[row:row + 1], lo, hi, kernel, stride)[0]
        if cfg.use_sparse_attention:
            o = infllmv2_attention(q, keys, values, p, scale=attn.scale, k1=buf.k1[row:row + 1, :n1],
                                   k2=buf.k2[row:row + 1, :n2])
        else:
            o = dense_causal_attention(q, keys, values, scale=attn.scale)
        return attn.finish(o if o.dim() == 4 else o[:, None], gate, rms_norm_gate=self.ops.rms_norm_gate)

    @torch.no_grad()
    def prefill_chunk(self, ids: torch.Tensor, cache: StaticCache, row: int) -> torch.Tensor:
        """Run tokens ids [T] of sequence `row` after its cached tokens; returns the final hidden [1, T, H]
        (after the last norm). Updates the cache and its lengths."""
        T = ids.shape[0]
        cache.check_room(row, T)
        start = cache.lengths[row]
        cfg = self.config
        positions = torch.arange(start, start + T, device=self.device)[None]
        cos = sin = None
        if cfg.lightning_use_rope or cfg.attn_use_rope:
            cos, sin = rope_cos_sin(positions, cfg.lightning_head_dim, cfg.rope_theta)
        scos, ssin = cos, sin
        if cfg.attn_use_rope and cfg.head_dim != cfg.lightning_head_dim:
            scos, ssin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
        h = self.model.model.embed_tokens(ids[None]) * cfg.scale_emb

        def attention(i: int, layer, x: torch.Tensor) -> torch.Tensor:
            if i in self.sparse_ids:
                return self._sparse_prefill(layer.self_attn, x, positions, scos, ssin, cache, i, row, start)
            return self._lightning_prefill(i, layer.self_attn, x, cos, sin, cache.state(i)[row:row + 1])

        h = decoder_layers(self.ops, self.layers, self.fused_mlp, h, cfg.residual_scale, attention)
        cache.lengths[row] = start + T
        cache.seqlens[row:row + 1].fill_(start + T)      # a fill kernel: no host sync (item assignment syncs)
        return h

    @torch.no_grad()
    def logits_of(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [..., V] fp32 of hidden states [..., H] (final norm applied here)."""
        h = self.model.model.norm(hidden)
        return self.model.lm_head(h / self.config.logit_divisor).float()

    @torch.no_grad()
    def prefill_sequence(self, ids: torch.Tensor, cache: StaticCache, row: int, chunk_size: int,
                         on_chunk=None) -> torch.Tensor:
        """Prefill all of ids [T] into `row` in chunks; returns the last position's logits [V] fp32."""
        if ids.dim() != 1 or ids.shape[0] < 1:
            raise ValueError(f"prefill: token ids must be a non-empty 1-D tensor, got shape {tuple(ids.shape)}")
        if chunk_size < 1:
            raise ValueError(f"prefill: chunk_size must be >= 1, got {chunk_size}")
        T = ids.shape[0]
        last = None
        for s in range(0, T, chunk_size):
            h = self.prefill_chunk(ids[s:s + chunk_size], cache, row)
            last = h[:, -1]
            del h
            if on_chunk is not None:
                on_chunk(min(T, s + chunk_size), T)
        return self.logits_of(last)[0]


class DecodeStep:
    """One decode step for all B sequences of a StaticCache, on static buffers (CUDA-graph capturable).

    Inputs: `ids` [B] int64 (the tokens to feed). Each call first advances `cache.seqlens` by one on the
    device, then writes logits [B, V] fp32 into `logits`. The host-side `cache.lengths` is the caller's.
    """

    def __init__(self, runner: ModelRunner, cache: StaticCache) -> None:
        self.runner = runner
        self.cache = cache
        cfg = runner.config
        B, dev, dt = cache.batch, runner.device, runner.dtype
        self.ids = torch.zeros(B, dtype=torch.long, device=dev)
        self.logits = torch.zeros(B, cfg.vocab_size, dtype=torch.float32, device=dev)
        self.rows = torch.arange(B, device=dev)
        self.light_out = torch.zeros(B, cfg.lightning_nh, cfg.lightning_head_dim, dtype=dt, device=dev)
        self.sparse_out = torch.zeros(B, cfg.num_attention_heads, cfg.head_dim, dtype=dt, device=dev)
        d = cfg.lightning_head_dim
        self.inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, device=dev, dtype=torch.float32) / d))
        ds = cfg.head_dim
        self.inv_freq_sparse = 1.0 / (cfg.rope_theta ** (torch.arange(0, ds, 2, device=dev, dtype=torch.float32) / ds))

    @staticmethod
    def _cos_sin(pos: torch.Tensor, inv_freq: torch.Tensor):
        freqs = pos.float()[:, None, None] * inv_freq                      # [B, 1, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def _lightning(self, i: int, attn, x: torch.Tensor, cos, sin, state: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        parts = self.runner.project(i, x)
        q = parts[0].reshape(B, 1, attn.num_heads, attn.head_dim)
        k = parts[1].reshape(B, 1, attn.num_kv_heads, attn.head_dim)
        v = parts[2].reshape(B, 1, attn.num_kv_heads, attn.head_dim).contiguous()
        z = parts[3] if attn.z_proj is not None else None
        q, k, v = attn.prepare(q, k, v, cos, sin, qk_norm_rope=self.runner.decode_ops.qk_norm_rope)
        o = lightning_decode_step(q[:, 0], k[:, 0], v[:, 0], self.runner.log_decay, state, scale=attn.scale,
                                  out=self.light_out)
        return attn.finish(o[:, None], z, x.dtype, rms_norm_gate=self.runner.decode_ops.rms_norm_gate)

    def _sparse(self, attn, x: torch.Tensor, pos: torch.Tensor, cos, sin, layer: int) -> torch.Tensor:
        B = x.shape[0]
        cfg = self.runner.config
        parts = self.runner.project(layer, x)
        q = parts[0].reshape(B, 1, attn.num_heads, attn.head_dim).contiguous()
        k = parts[1].reshape(B, 1, attn.num_kv_heads, attn.head_dim)
        v = parts[2].reshape(B, 1, attn.num_kv_heads, attn.head_dim)
        gate = parts[3] if attn.o_gate is not None else None
        q, k = attn.prepare(q, k, cos, sin, pos[:, None])
        buf = self.cache.sparse[layer]
        buf.k.index_put_((self.rows, pos), k[:, 0])
        buf.v.index_put_((self.rows, pos), v[:, 0])
        seqlens = self.cache.seqlens
        if cfg.use_sparse_attention:
            update_compressed_keys(buf.k, buf.k1, buf.k2, seqlens, self.runner.params)
            o = infllmv2_decode(q[:, 0], buf.k, buf.v, buf.k1, buf.k2, seqlens, self.runner.params,
                                scale=attn.scale, out=self.sparse_out)
        else:   # dense attention over the valid prefix of every sequence
            valid = torch.arange(buf.k.shape[1], device=x.device)[None, :] < seqlens[:, None].long()
            o = F.scaled_dot_product_attention(q.transpose(1, 2), buf.k.transpose(1, 2), buf.v.transpose(1, 2),
                                               attn_mask=valid[:, None, None, :], scale=attn.scale,
                                               enable_gqa=True)[:, :, 0]
        return attn.finish(o if o.dim() == 4 else o[:, None], gate, rms_norm_gate=self.runner.decode_ops.rms_norm_gate)

    @torch.no_grad()
    def __call__(self) -> torch.Tensor:
        r = self.runner
        cfg = r.config
        self.cache.seqlens.add_(1)
        pos = self.cache.seqlens.long() - 1                                   # [B]
        cos, sin = self._cos_sin(pos, self.inv_freq)
        scos, ssin = (self._cos_sin(pos, self.inv_freq_sparse) if cfg.attn_use_rope else (None, None))
        h = r.model.model.embed_tokens(self.ids[:, None]) * cfg.scale_emb      # [B, 1, H]

        def attention(i: int, layer, x: torch.Tensor) -> torch.Tensor:
            if i in r.sparse_ids:
                return self._sparse(layer.self_attn, x, pos, scos, ssin, i)
            return self._lightning(i, layer.self_attn, x, cos, sin, self.cache.state(i))

        h = decoder_layers(r.decode_ops, r.layers, r.fused_mlp, h, cfg.residual_scale, attention)
        self.logits.copy_(r.logits_of(h[:, 0]))
        return self.logits
