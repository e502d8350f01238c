"""Building the model to train: a SALA preset/config, the dense Llama baseline, or a saved model folder."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from sala.train.config import ModelConfig

# A small dense baseline; any LlamaConfig field can be overridden through model.config.
LLAMA_DEFAULTS: dict[str, Any] = {
    "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 4, "max_position_embeddings": 1 << 17, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "rms_norm_eps": 1e-6,
}


def _check_fields(cfg: Any, fields: dict, what: str) -> None:
    for k in fields:
        if not hasattr(cfg, k):
            raise ValueError(f"model.config.{k}: {what} has no field {k!r}")


def build_model(spec: ModelConfig, vocab_size: int | None = None, bos_id: int | None = None,
                eos_id: int | None = None, pad_id: int | None = None) -> torch.nn.Module:
    """A freshly initialised (or loaded) causal LM in fp32 on the CPU.

    `vocab_size` / token ids (from the dataset's tokenizer) override the config's for new models; for a
    pretrained folder they must fit its vocabulary.
    """
    ids = {k: v for k, v in (("bos_token_id", bos_id), ("eos_token_id", eos_id), ("pad_token_id", pad_id))
           if v is not None}
    if spec.kind == "sala":
        from sala import SalaConfig, SalaForCausalLM

        fields = dict(spec.config)
        _check_fields(SalaConfig(), fields, "SalaConfig")
        if vocab_size is not None and "vocab_size" not in fields:
            fields["vocab_size"] = vocab_size
            fields.update(ids)
        # built in one go, so derived fields follow the overrides (a preset's layer pattern follows its depth)
        cfg = SalaConfig.from_preset(spec.preset, **fields) if spec.preset else SalaConfig(**fields)
        cfg.validate()
        return SalaForCausalLM(cfg).float()
    if spec.kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        fields = {**LLAMA_DEFAULTS, **spec.config}
        if vocab_size is not None and "vocab_size" not in spec.config:
            fields["vocab_size"] = vocab_size
            fields.update(ids)
        try:
            cfg = LlamaConfig(**fields)
        except TypeError as e:
            raise ValueError(f"model.config: invalid LlamaConfig fields ({e})") from None
        cfg._attn_implementation = "sdpa"
        return LlamaForCausalLM(cfg).float()
    if spec.kind == "pretrained":
        model = load_model_dir(spec.path, dtype=torch.float32)
        v = model.get_input_embeddings().weight.shape[0]
        if vocab_size is not None and vocab_size > v:
            raise ValueError(f"the dataset's tokenizer has {vocab_size} tokens but the model at {spec.path} "
                             f"embeds only {v}; prepare the data with the model's tokenizer "
                             f"(`sala data prepare --tokenizer {spec.path}`)")
        return model
    raise ValueError(f"unknown model.kind {spec.kind!r}")


def load_model_dir(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu") -> torch.nn.Module:
    """Load a causal LM saved with `save_pretrained` (SALA folders without remote code)."""
    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"model folder {path} has no config.json")
    raw = json.loads((p / "config.json").read_text())
    model_type = raw.get("model_type")
    from sala.modeling.fp8 import is_fp8_config, load_fp8_checkpoint

    if model_type == "minicpm_sala" and is_fp8_config(raw):   # `sala quantize` output (docs/fp8.md): runs on GPUs
        return load_fp8_checkpoint(p, device, dtype)
    if model_type == "minicpm_sala":
        from sala import SalaForCausalLM

        model = SalaForCausalLM.from_pretrained(str(p), dtype=dtype)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(p), dtype=dtype)
    return model.to(device)


def is_sala(model: torch.nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) == "minicpm_sala"


def set_fused_projections(model: torch.nn.Module, enabled: bool) -> int:
    """Run the projections that share an input (q, k, v and the output gate of each attention layer; gate and up of
    each MLP) as one GEMM over their concatenated weights (`sala.modeling.modeling_sala.project`): the same values,
    one autocast cast of the input and one input-gradient GEMM per group. The decoder layers' norms, whose outputs
    then feed one GEMM each, emit the autocast dtype themselves (`SalaRMSNorm.autocast_output`: no cast kernel, same
    values and gradients). Returns the modules switched."""
    n = 0
    for m in model.modules():
        if hasattr(type(m), "fuse_projections"):
            m.fuse_projections = bool(enabled)
            n += 1
        if hasattr(m, "input_layernorm") and hasattr(m, "post_attention_layernorm"):
            m.input_layernorm.autocast_output = m.post_attention_layernorm.autocast_output = bool(enabled)
    return n


def apply_throughput_options(model: torch.nn.Module, spec: ModelConfig) -> None:
    """The SALA-only throughput options of `spec` on `model` (fused projections, chunked loss; compile_loss and
    compile_blocks are applied by `compile_for_training`): refused for another model, as the trainer runs them (and the step profiler)."""
    for option in ("fuse_projections", "loss_chunk", "compile_loss", "compile_blocks"):
        if getattr(spec, option) and not is_sala(model):
            raise ValueError(f"model.{option} is for SALA models; this one is not")
    if spec.fuse_projections:
        set_fused_projections(model, True)
    if spec.loss_chunk:
        model.loss_chunk = int(spec.loss_chunk)


def set_sparse_attention(model: torch.nn.Module, enabled: bool) -> None:
    """Switch SALA's sparse (top-k) attention on or off (off = dense causal attention in those layers)."""
    if not is_sala(model):
        raise ValueError("stage.sparse is set but the model is not a SALA model")
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "use_sparse_attention"):
            cfg.use_sparse_attention = bool(enabled)
