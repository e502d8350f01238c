"""Building a model for the engine: a checkpoint directory, or a preset with random weights made on the device."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from sala.modeling.configuration_sala import SalaConfig
from sala.modeling.fp8 import is_fp8_config, load_fp8_checkpoint
from sala.modeling.modeling_sala import SalaForCausalLM

# Standard deviation of random weights (benchmarks only): keeps activations of the 9B shape in range.
RANDOM_INIT_STD = 0.02


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPU (the released dtype), fp32 on CPU (exact and fast enough for small models)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def parse_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if name is None or name == "auto":
        return default_dtype(device)
    if isinstance(name, torch.dtype):
        return name
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; use one of auto, {', '.join(table)}")
    return table[name]


def materialize_random(model_cls, config, device: torch.device | str, dtype: torch.dtype, seed: int = 0,
                       std: float = RANDOM_INIT_STD) -> torch.nn.Module:
    """`model_cls(config)` with random weights made directly on `device` in `dtype` (no CPU or fp32 copy).

    Built on the meta device, then allocated: linear and embedding weights ~ N(0, std), norm weights 1.
    Deterministic for a seed and device. Buffers are left for the caller (SALA has none; HF rotary buffers do).
    """
    device = torch.device(device)
    with torch.device("meta"):
        model = model_cls(config)
    model = model.to(dtype).to_empty(device=device)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=gen)
    return model.eval()


def random_model(config: SalaConfig, device: torch.device | str, dtype: torch.dtype, seed: int = 0,
                 std: float = RANDOM_INIT_STD) -> SalaForCausalLM:
    """A SALA model with random weights created directly on `device` in `dtype`."""
    return materialize_random(SalaForCausalLM, config, device, dtype, seed, std)


def load_model_dir(path: str | os.PathLike, *, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The one model loader: a causal LM folder saved with `save_pretrained` in `dtype`, on `device`, in eval mode.

    SALA folders load as `SalaForCausalLM` (no remote code, checked first: shards, keys, shapes); other model types
    (the dense Llama baseline of the training experiments) through transformers' AutoModelForCausalLM."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model directory: no config.json in it")
    raw = json.loads((path / "config.json").read_text())
    model_type = raw.get("model_type")
    if model_type == SalaConfig.model_type and is_fp8_config(raw):   # `sala quantize` output: FP8 as stored
        return load_fp8_checkpoint(path, device, dtype).eval()
    if model_type == SalaConfig.model_type:
        model = SalaForCausalLM.from_pretrained(str(path), dtype=dtype)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    return model.to(device).eval()


def load_config_dir(path: str | os.PathLike) -> SalaConfig:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model directory: no config.json in it")
    return SalaConfig.from_pretrained(str(path))


def load_tokenizer_dir(path: str | os.PathLike):
    """The tokenizer stored in a model directory (sala.modeling.tokenizer.TextTokenizer), or None if it has none."""
    from sala.modeling.tokenizer import load_tokenizer

    path = Path(path)
    if not any((path / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    return load_tokenizer(path)
