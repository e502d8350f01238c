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


import torch
import torch.nn.functional as F

from sala.engine.memory import MLP_SLICE_TOKENS
from sala.engine.static_cache import StaticCache
from sala.modeling.configuration_sala import SalaConfig
from sala.modeling.modeling_sala import SalaForCausalLM, rope_cos_sin, sparse_params_from_config
from sala.ops.dense import dense_causal_attention
from sala.ops.infllmv2 import (compress_window_range, compressed_lengths, infllmv2_attention, infllmv2_decode,
                               update_compressed_keys)
from sala.ops.lightning import lightning_attention, lightning_decode_step
from sala.ops.slopes import lightning_log_decay


def _mlp_residual(layer, w_gate_up: torch.Tensor, h: torch.Tensor, scale: float, norm=None,
                  silu_mul=None) -> torch.Tensor:
    """h + mlp(norm(h)) * scale, computed in token slices (bounds the MLP activations). h [B, T, H].
    norm / silu_mul: replacements for the layer's post-attention norm and `_silu_mul` (compiled prefill)."""
    norm = layer.post_attention_layernorm if norm is None else norm
    T = h.shape[1]
    if T <= MLP_SLICE_TOKENS:
        return h + _mlp(layer, w_gate_up, norm(h), silu_mul) * scale
    for a in range(0, T, MLP_SLICE_TOKENS):
        part = h[:, a:a + MLP_SLICE_TOKENS]
        part.add_(_mlp(layer, w_gate_up, norm(part), silu_mul) * scale)
    return h


def _fuse(linears: list[torch.nn.Linear]) -> tuple[torch.Tensor, list[int]]:
    """Concatenate bias-free Linear weights along the output dim; re-point each module at its slice."""
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


def _silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of the fused gate|up projection [..., 2I] -> [..., I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _mlp(layer, w_gate_up: torch.Tensor, x: torch.Tensor, silu_mul=None) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) with gate|up as one GEMM."""
    return layer.mlp.down_proj((_silu_mul if silu_mul is None else silu_mul)(F.linear(x, w_gate_up)))


def _residual(h: torch.Tensor, a: torch.Tensor, scale: float) -> torch.Tensor:
    """h + a * scale (the decoder's scaled residual add)."""
    return h + a * scale


class ModelRunner:
    """Holds a model, its per-layer constants and the sparse settings; runs prefill chunks.

    compile=True: the prefill's elementwise pieces (both norms, attention prepare / finish, SiLU x up, the
    scaled residual adds) run through `torch.compile` (dynamic shapes: one graph per piece for every chunk
    length and layer); GEMMs and the attention kernels stay as they are, decode stays eager (it is
    CUDA-graph captured). The first chunk pays the compilation.
    """

    def __init__(self, model: SalaForCausalLM, *, compile: bool = False, compile_backend: str = "inductor") -> None:
        self.model = model
        self.config: SalaConfig = model.config
        self.device = model.lm_head.weight.device
        self.dtype = model.lm_head.weight.dtype
        self.params = sparse_params_from_config(self.config)
        self.layers = list(model.model.layers)
        self.sparse_ids = set(self.config.sparse_layer_ids)
        self.log_decay = lightning_log_decay(self.config.lightning_nh, device=self.device)
        self.compiled = compile
        wrap = (lambda f: torch.compile(f, backend=compile_backend, dynamic=True)) if compile else (lambda f: f)
        self.in_norm = [wrap(layer.input_layernorm) for layer in self.layers]
        self.post_norm = [wrap(layer.post_attention_layernorm) for layer in self.layers]
        self.prepare = [wrap(layer.self_attn.prepare) for layer in self.layers]
        self.finish = [wrap(layer.self_attn.finish) for layer in self.layers]
        self.silu_mul = wrap(_silu_mul)
        self.residual = wrap(_residual)
        # Fused projection weights: one GEMM for q|k|v(|z or |o_gate) and one for gate|up per layer. The
        # modules' own weights become views into them, so no memory is added and the model is unchanged.
        self.fused_attn: list[torch.Tensor] = []
        self.fused_attn_split: list[list[int]] = []
        self.fused_mlp: list[torch.Tensor] = []
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
        return list(F.linear(x, self.fused_attn[i]).split(self.fused_attn_split[i], dim=-1))

    def _lightning_prefill(self, i: int, attn, x: torch.Tensor, cos, sin, state: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        parts = self.project(i, x)
        q = parts[0].reshape(B, T, attn.num_heads, attn.head_dim)
        k = parts[1].reshape(B, T, attn.num_kv_heads, attn.head_dim)
        v = parts[2].reshape(B, T, attn.num_kv_heads, attn.head_dim).contiguous()
        z = parts[3] if attn.z_proj is not None else None
        del parts
        q, k, v = self.prepare[i](q, k, v, cos, sin)
        o, final = lightning_attention(q, k, v, self.log_decay, scale=attn.scale, initial_state=state,
                                       output_final_state=True)
        del q, k, v
        state.copy_(final)
        return self.finish[i](o, z, x.dtype)

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
        q, k = self.prepare[layer](q, k, cos, sin, positions)
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
        return self.finish[layer](o if o.dim() == 4 else o[:, None], gate)

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
        rs = cfg.residual_scale
        for i, layer in enumerate(self.layers):
            x = self.in_norm[i](h)
            if i in self.sparse_ids:
                a = self._sparse_prefill(layer.self_attn, x, positions, scos, ssin, cache, i, row, start)
            else:
                a = self._lightning_prefill(i, layer.self_attn, x, cos, sin, cache.state(i)[row:row + 1])
            del x
            h = self.residual(h, a, rs)
            del a
            h = _mlp_residual(layer, self.fused_mlp[i], h, rs, self.post_norm[i], self.silu_mul)
        cache.lengths[row] = start + T
        cache.seqlens[row] = start + T
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
        q, k, v = attn.prepare(q, k, v, cos, sin)
        o = lightning_decode_step(q[:, 0], k[:, 0], v[:, 0], self.runner.log_decay, state, scale=attn.scale,
                                  out=self.light_out)
        return attn.finish(o[:, None], z, x.dtype)

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
        return attn.finish(o if o.dim() == 4 else o[:, None], gate)

    @torch.no_grad()
    def __call__(self) -> torch.Tensor:
        r = self.runner
        cfg = r.config
        self.cache.seqlens.add_(1)
        pos = self.cache.seqlens.long() - 1                                   # [B]
        cos, sin = self._cos_sin(pos, self.inv_freq)
        scos, ssin = (self._cos_sin(pos, self.inv_freq_sparse) if cfg.attn_use_rope else (None, None))
        h = r.model.model.embed_tokens(self.ids[:, None]) * cfg.scale_emb      # [B, 1, H]
        rs = cfg.residual_scale
        for i, layer in enumerate(r.layers):
            x = layer.input_layernorm(h)
            if i in r.sparse_ids:
                a = self._sparse(layer.self_attn, x, pos, scos, ssin, i)
            else:
                a = self._lightning(i, layer.self_attn, x, cos, sin, self.cache.state(i))
            h = h + a * rs
            h = h + _mlp(layer, r.fused_mlp[i], layer.post_attention_layernorm(h)) * rs
        self.logits.copy_(r.logits_of(h[:, 0]))
        return self.logits
