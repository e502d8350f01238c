"""Weight quantization for the engine: `quantization="fp8"` of `SalaEngine.from_pretrained` / `from_preset`.

    quant = resolve_quantization("fp8", device, path)        # checks the device BEFORE any weight is read
    model = load_quantized_model(path, device, dtype, quant)  # bf16 checkpoint quantized at load, or FP8 as stored

An FP8 checkpoint directory (config.json with an fp8 `quantization_config`, `sala quantize`) is loaded as stored
whatever `quantization` says (None included); a bf16 one is quantized after loading, layer by layer.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from sala.modeling.fp8 import is_fp8_config, load_fp8_checkpoint, quantize_model_fp8
from sala.ops.fp8 import check_fp8_supported

QUANTIZATIONS = ("none", "fp8")


def is_fp8_checkpoint(path: str | os.PathLike) -> bool:
    """Whether the model directory's config.json declares the FP8 format (`sala.modeling.fp8`)."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return is_fp8_config(json.loads(cfg.read_text()))
    except json.JSONDecodeError:
        return False


def resolve_quantization(quantization: str | None, device: torch.device, path: str | os.PathLike | None = None
                         ) -> str | None:
    """"fp8" or None for the engine's `quantization` argument (None/"none"/"bf16": none; an FP8 checkpoint at
    `path`: "fp8"). For "fp8", raise `Fp8UnsupportedError` now when `device` cannot run FP8 GEMMs, so the refusal
    comes before minutes of loading."""
    q = None if quantization in (None, "none", "bf16") else quantization
    if q not in (None, "fp8"):
        raise ValueError(f"unknown quantization {quantization!r}; choose from {', '.join(QUANTIZATIONS)}")
    if q is None and path is not None and is_fp8_checkpoint(path):
        q = "fp8"
    if q == "fp8":
        check_fp8_supported(device)
    return q


def load_quantized_model(path: str | os.PathLike, device: torch.device, dtype: torch.dtype, quantization: str):
    """The model of `path` with FP8 projections: an FP8 checkpoint as stored, or a bf16 one quantized at load."""
    if quantization != "fp8":
        raise ValueError(f"load_quantized_model: unknown quantization {quantization!r}")
    if is_fp8_checkpoint(path):
        return load_fp8_checkpoint(path, device, dtype)
    from sala.engine.loading import load_model_dir

    model = load_model_dir(path, device=device, dtype=dtype)
    quantize_model_fp8(model)
    return model


def quantize_loaded_model(model, quantization: str | None):
    """`model` with its projections quantized when quantization == "fp8" (in place), else unchanged."""
    if quantization == "fp8":
        quantize_model_fp8(model)
    return model
