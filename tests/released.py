"""Helpers that write tiny checkpoints in the released MiniCPM-SALA layout (config.json + sharded safetensors)."""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

# Fields of the released config.json that this project does not model itself; they must load unchanged.
RELEASED_EXTRA = {
    "architectures": ["MiniCPMSALAForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_minicpm_sala.MiniCPMSALAConfig",
        "AutoModel": "modeling_minicpm_sala.MiniCPMSALAModel",
        "AutoModelForCausalLM": "modeling_minicpm_sala.MiniCPMSALAForCausalLM",
    },
    "model_type": "minicpm_sala",
    "mup_denominator": 32,
    "torch_dtype": "bfloat16",
    "rope_scaling": None,
}


def released_config_dict(cfg) -> dict:
    """The config as the released config.json spells it (no fields of this project's own)."""
    d = {k: v for k, v in cfg.to_dict().items()
         if k not in ("use_sparse_attention", "hype_query_scale_base", "transformers_version", "dtype")}
    d.update(RELEASED_EXTRA)
    return d


def write_released_checkpoint(model, path: Path, shards: int = 3) -> Path:
    """Write model's weights as `shards` safetensors files + model.safetensors.index.json + config.json."""
    path.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    names = sorted(sd)
    weight_map = {}
    for s in range(shards):
        part = names[s::shards]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: sd[k] for k in part}, str(path / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (path / "config.json").write_text(json.dumps(released_config_dict(model.config), indent=2))
    return path
