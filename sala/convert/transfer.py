"""Weight transfer from a dense teacher to a SALA hybrid (no training).

- Embeddings, norms, MLPs, lm_head: copied (a tied teacher's embedding is copied into lm_head).
- Lightning layers: W_q, W_o copied; W_k, W_v copied and expanded from GQA to one KV head per query
  head (KV head j serves query heads j*G .. j*G+G-1, the order of transformers' `repeat_kv`); q/k norms
  copied when the teacher has them (Qwen3), else ones; z_proj new (nn.Linear default init, seeded),
  o_norm ones.
- Sparse (kept softmax) layers: W_q, W_k, W_v copied; o_gate new with **zero weight**, so the gate starts
  at exactly sigmoid(0) = 0.5 everywhere, compensated by o_proj = 2 W_o: the layer computes the teacher's
  attention exactly at the start and the gate can open or close from there (gradients reach it).
  A Qwen3 teacher's q/k norms cannot be carried into sparse layers (SALA's sparse layers have no QK-norm):
  they are dropped there and stage 2 has to recover.
"""
from __future__ import annotations

import torch

from sala.convert.families import TeacherSpec
from sala.modeling.configuration_sala import LIGHTNING, SalaConfig

GLOBAL_KEYS = ("model.embed_tokens.weight", "model.norm.weight")
LAYER_COPY = ("input_layernorm.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight",
              "mlp.up_proj.weight", "mlp.down_proj.weight")


def _get(sd: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in sd:
        raise ValueError(f"teacher checkpoint has no tensor {name!r} "
                         f"(is it a {', '.join(['llama', 'qwen2', 'qwen3', 'minicpm'])} "
                         f"checkpoint in the transformers layout?)")
    return sd[name]


def expand_kv(w: torch.Tensor, num_kv_heads: int, num_heads: int, head_dim: int) -> torch.Tensor:
    """[Hkv*D, in] (or a bias [Hkv*D]) -> [H*D, in]: each KV head repeated for its G = H/Hkv query heads."""
    if w.shape[0] != num_kv_heads * head_dim:
        raise ValueError(f"k/v projection has {w.shape[0]} output rows, expected num_key_value_heads x head_dim = "
                         f"{num_kv_heads} x {head_dim}")
    g = num_heads // num_kv_heads
    rest = w.shape[1:]
    return w.reshape(num_kv_heads, head_dim, *rest).repeat_interleave(g, dim=0).reshape(num_heads * head_dim, *rest)


def lightning_layer_init(teacher_sd: dict[str, torch.Tensor], spec: TeacherSpec, layer: int,
                         fresh: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """State dict of a `SalaLightningAttention` initialised from the teacher's attention of `layer`.

    `fresh` is a newly constructed lightning module's state dict: it supplies the new tensors (z_proj,
    o_norm, norms the teacher lacks) and the expected key set.
    """
    p = f"model.layers.{layer}.self_attn."
    out = {k: v.clone() for k, v in fresh.items()}
    H, Hkv, D = spec.num_heads, spec.num_kv_heads, spec.head_dim
    out["q_proj.weight"] = _get(teacher_sd, p + "q_proj.weight").clone()
    out["o_proj.weight"] = _get(teacher_sd, p + "o_proj.weight").clone()
    out["k_proj.weight"] = expand_kv(_get(teacher_sd, p + "k_proj.weight"), Hkv, H, D)
    out["v_proj.weight"] = expand_kv(_get(teacher_sd, p + "v_proj.weight"), Hkv, H, D)
    if spec.qkv_bias:
        out["q_proj.bias"] = _get(teacher_sd, p + "q_proj.bias").clone()
        out["k_proj.bias"] = expand_kv(_get(teacher_sd, p + "k_proj.bias"), Hkv, H, D)
        out["v_proj.bias"] = expand_kv(_get(teacher_sd, p + "v_proj.bias"), Hkv, H, D)
    _biases(out, teacher_sd, spec, p, gate="z_proj.bias")
    if spec.qk_norm:
        out["q_norm.weight"] = _get(teacher_sd, p + "q_norm.weight").clone()
        out["k_norm.weight"] = _get(teacher_sd, p + "k_norm.weight").clone()
    else:
        out["q_norm.weight"] = torch.ones_like(fresh["q_norm.weight"])
        out["k_norm.weight"] = torch.ones_like(fresh["k_norm.weight"])
    out["o_norm.weight"] = torch.ones_like(fresh["o_norm.weight"])
    return out


def _biases(out: dict[str, torch.Tensor], teacher_sd: dict[str, torch.Tensor], spec: TeacherSpec, p: str,
            gate: str) -> None:
    """Biases a biased SALA config has but the teacher may not: zeros (o_proj's copied when present)."""
    if "o_proj.bias" in out:
        out["o_proj.bias"] = (teacher_sd[p + "o_proj.bias"].clone() if spec.o_bias
                              else torch.zeros_like(out["o_proj.bias"]))
    if gate in out:
        out[gate] = torch.zeros_like(out[gate])
    for name in ("q_proj.bias", "k_proj.bias", "v_proj.bias"):
        if name in out and not spec.qkv_bias:
            out[name] = torch.zeros_like(out[name])


def sparse_layer_init(teacher_sd: dict[str, torch.Tensor], spec: TeacherSpec, layer: int,
                      fresh: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """State dict of a `SalaSparseAttention` from the teacher's attention of `layer` (see module doc)."""
    p = f"model.layers.{layer}.self_attn."
    out = {k: v.clone() for k, v in fresh.items()}
    for name in ("q_proj.weight", "k_proj.weight", "v_proj.weight"):
        out[name] = _get(teacher_sd, p + name).clone()
    if spec.qkv_bias:
        for name in ("q_proj.bias", "k_proj.bias", "v_proj.bias"):
            out[name] = _get(teacher_sd, p + name).clone()
    _biases(out, teacher_sd, spec, p, gate="o_gate.bias")
    w_o = _get(teacher_sd, p + "o_proj.weight")
    if "o_gate.weight" in out:
        out["o_gate.weight"] = torch.zeros_like(out["o_gate.weight"])
        out["o_proj.weight"] = 2.0 * w_o      # sigmoid(0) = 0.5: compensate so the layer is exact at start
    else:
        out["o_proj.weight"] = w_o.clone()
    return out


def transfer_state_dict(teacher_sd: dict[str, torch.Tensor], spec: TeacherSpec, config: SalaConfig,
                        fresh_sd: dict[str, torch.Tensor],
                        lightning_overrides: dict[int, dict[str, torch.Tensor]] | None = None
                        ) -> dict[str, torch.Tensor]:
    """The full SALA state dict (keys of `fresh_sd`, a newly built SalaForCausalLM's state dict).

    `lightning_overrides[i]` (e.g. stage-1 students) replaces the weight-transfer init of lightning layer i.
    """
    out: dict[str, torch.Tensor] = {}
    for k in GLOBAL_KEYS:
        out[k] = _get(teacher_sd, k).clone()
    head = teacher_sd.get("lm_head.weight")
    out["lm_head.weight"] = (head if head is not None else _get(teacher_sd, "model.embed_tokens.weight")).clone()
    for i, mixer in enumerate(config.mixer_types):
        p = f"model.layers.{i}."
        for k in LAYER_COPY:
            out[p + k] = _get(teacher_sd, p + k).clone()
        attn_prefix = p + "self_attn."
        fresh = {k[len(attn_prefix):]: v for k, v in fresh_sd.items() if k.startswith(attn_prefix)}
        if mixer == LIGHTNING:
            sub = (lightning_overrides or {}).get(i) or lightning_layer_init(teacher_sd, spec, i, fresh)
        else:
            sub = sparse_layer_init(teacher_sd, spec, i, fresh)
        for k, v in sub.items():
            out[attn_prefix + k] = v
    missing = set(fresh_sd) - set(out)
    extra = set(out) - set(fresh_sd)
    if missing or extra:
        raise RuntimeError(f"weight transfer produced a mismatched state dict: missing {sorted(missing)[:6]}, "
                           f"unexpected {sorted(extra)[:6]}")
    for k, v in out.items():
        if v.shape != fresh_sd[k].shape:
            raise ValueError(f"teacher tensor for {k} has shape {list(v.shape)}, "
                             f"SALA expects {list(fresh_sd[k].shape)}")
    return {k: v.to(fresh_sd[k].dtype) for k, v in out.items()}
