"""Which dense checkpoints `sala convert` accepts, and the SALA configuration a teacher converts to.

Supported families (by `config.json` `model_type`): Llama, Qwen2, Qwen3 (transformers' own classes) and
MiniCPM (`minicpm`, MiniCPM-1/2/4 dense; run through an exact SALA emulation, no remote code).
All share the checkpoint layout `model.layers.{i}.self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`,
`input_layernorm`, `post_attention_layernorm`, `model.embed_tokens`, `model.norm`, `lm_head`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sala.modeling.configuration_sala import LIGHTNING, PRESETS, SPARSE, SalaConfig

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "minicpm")


@dataclass
class TeacherSpec:
    """The facts about a dense teacher that conversion needs (read from its config.json)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    qkv_bias: bool                 # q/k/v projections carry a bias (Qwen2)
    o_bias: bool                   # o_proj carries a bias (Llama attention_bias=True)
    qk_norm: bool                  # per-head q_norm / k_norm (Qwen3)
    tie_word_embeddings: bool
    scale_emb: float = 1.0         # muP factors (MiniCPM); 1 / sqrt(L) / hidden for the others
    scale_depth: float | None = None
    dim_model_base: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str = "float32"
    raw: dict[str, Any] = field(default_factory=dict)


def _rope(cfg: dict[str, Any]) -> float:
    """rope_theta of a plain-RoPE config; raises on any RoPE scaling (not representable in SALA)."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling")
    rope_type = (params.get("rope_type") or params.get("type") or "default") if params else "default"
    if scaling and (scaling.get("rope_type") or scaling.get("type") or "default") != "default":
        rope_type = scaling.get("rope_type") or scaling.get("type")
    if rope_type != "default":
        raise ValueError(f"teacher uses RoPE scaling {rope_type!r}; sala convert supports plain RoPE only "
                         "(SALA's lightning layers use unscaled RoPE)")
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def read_teacher_spec(teacher_dir: str | Path) -> TeacherSpec:
    """Read and check `teacher_dir/config.json`; ValueError names anything unsupported."""
    path = Path(teacher_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"teacher {teacher_dir}: no config.json (expected a Hugging Face model folder)")
    cfg = json.loads(path.read_text())
    mt = cfg.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"teacher {teacher_dir}: model_type {mt!r} is not supported by sala convert; "
                         f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"teacher {teacher_dir}: hidden_act {act!r} is not supported (SALA's MLP is SwiGLU/silu)")
    if cfg.get("mlp_bias"):
        raise ValueError(f"teacher {teacher_dir}: mlp_bias=true is not supported (SALA's MLP has no biases)")
    if cfg.get("use_sliding_window") or (mt == "qwen3" and cfg.get("layer_types") and
                                         any(t != "full_attention" for t in cfg["layer_types"])):
        raise ValueError(f"teacher {teacher_dir}: sliding-window attention layers are not supported")
    H = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or hidden // H)
    attention_bias = bool(cfg.get("attention_bias", False))
    spec = TeacherSpec(
        model_type=mt, vocab_size=int(cfg["vocab_size"]), hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]), num_layers=int(cfg["num_hidden_layers"]),
        num_heads=H, num_kv_heads=int(cfg.get("num_key_value_heads") or H), head_dim=head_dim,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=_rope(cfg),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        qkv_bias=mt == "qwen2" or attention_bias, o_bias=mt in ("llama", "minicpm") and attention_bias,
        qk_norm=mt == "qwen3", tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"),
        pad_token_id=cfg.get("pad_token_id"),
        torch_dtype=str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"), raw=cfg)
    if mt == "minicpm":
        spec.scale_emb = float(cfg.get("scale_emb", 1.0))
        spec.scale_depth = float(cfg.get("scale_depth", math.sqrt(spec.num_layers)))
        spec.dim_model_base = int(cfg.get("dim_model_base", hidden))
        if cfg.get("sparse_config"):
            raise ValueError(f"teacher {teacher_dir}: this MiniCPM checkpoint already has a sparse_config "
                             "(InfLLM-V2 attention); sala convert expects a dense MiniCPM teacher")
    if H % spec.num_kv_heads:
        raise ValueError(f"teacher {teacher_dir}: num_attention_heads {H} is not a multiple of "
                         f"num_key_value_heads {spec.num_kv_heads}")
    if head_dim % 2:
        raise ValueError(f"teacher {teacher_dir}: head_dim {head_dim} must be even for RoPE")
    return spec


def sala_config_for(spec: TeacherSpec, softmax_layers: list[int], keep_sparse_rope: bool = False,
                    sparse_preset: str = "minicpm-sala-9b", use_sparse_attention: bool = True,
                    sparse_overrides: dict[str, Any] | None = None) -> SalaConfig:
    """The converted model's SalaConfig: teacher shapes, `softmax_layers` sparse, the others lightning.

    The teacher's decoder has no muP factors, so scale_emb = 1, scale_depth = sqrt(L) (residual factor 1) and
    dim_model_base = hidden_size (logit divisor 1) make the SALA decoder compute the teacher's function where
    weights are copied; a MiniCPM teacher keeps its own factors.
    """
    L = spec.num_layers
    bad = [i for i in softmax_layers if not 0 <= i < L]
    if bad:
        raise ValueError(f"softmax layer indices {bad} are out of range for a {L}-layer teacher (0..{L - 1})")
    if sparse_preset not in PRESETS:
        raise ValueError(f"unknown sparse preset {sparse_preset!r}; available: {', '.join(sorted(PRESETS))}")
    sparse_config = {**PRESETS[sparse_preset].get("sparse_config", {}), **(sparse_overrides or {})}
    eos = spec.eos_token_id
    return SalaConfig(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=L, num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim, lightning_nh=spec.num_heads, lightning_nkv=spec.num_heads,
        lightning_head_dim=spec.head_dim, lightning_scale="1/sqrt(d)", hidden_act="silu",
        max_position_embeddings=max(spec.max_position_embeddings, 1 << 20), rms_norm_eps=spec.rms_norm_eps,
        bos_token_id=spec.bos_token_id, eos_token_id=eos, pad_token_id=spec.pad_token_id,
        tie_word_embeddings=False, rope_theta=spec.rope_theta, attention_bias=spec.qkv_bias or spec.o_bias,
        scale_emb=spec.scale_emb, scale_depth=spec.scale_depth if spec.scale_depth is not None else math.sqrt(L),
        dim_model_base=spec.dim_model_base or spec.hidden_size, qk_norm=True, use_output_norm=True,
        use_output_gate=True, attn_use_rope=keep_sparse_rope, lightning_use_rope=True, attn_use_output_gate=True,
        sparse_config=sparse_config,
        mixer_types=[SPARSE if i in set(softmax_layers) else LIGHTNING for i in range(L)],
        use_sparse_attention=use_sparse_attention,
    )


def teacher_emulation_config(spec: TeacherSpec) -> SalaConfig:
    """A SalaConfig whose network is exactly the dense teacher (all layers softmax with RoPE, dense attention,
    no output gate). Used to run MiniCPM teachers without remote code."""
    if spec.qk_norm or spec.qkv_bias != spec.o_bias:
        raise ValueError(f"model_type {spec.model_type!r} cannot be emulated by a dense SALA config")
    cfg = sala_config_for(spec, list(range(spec.num_layers)), keep_sparse_rope=True, use_sparse_attention=False)
    cfg.attn_use_output_gate = False
    return cfg
