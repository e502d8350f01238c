"""FLOPs of a training step and model FLOPs utilisation (MFU).

Counted: every matrix product of the dense projections (2 FLOPs per multiply-add, lm_head included,
embedding lookups excluded) and the attention arithmetic; a training step costs 3x the forward
(backward = 2x forward). Recomputation by gradient checkpointing is not counted (MFU, not HFU).

- softmax attention over a document of L tokens: 4·H·d·L²/2 per layer (QKᵀ and PV, causal half);
  when sparse attention is active and L exceeds the dense length, each query sees at most
  (topk + window) tokens.
- lightning (linear) attention: 4·H·d_k·d_v per token per layer (state update kᵀv and readout qS).
"""
from __future__ import annotations

from typing import Iterable

import torch

# dense bf16 tensor-core peaks (no sparsity), TFLOP/s
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "GH200": 989.4, "H800": 989.4, "A100": 312.0, "A800": 312.0,
                    "L40S": 362.1, "L4": 121.0, "A10": 125.0, "B200": 2250.0, "RTX 4090": 165.2}


def peak_tflops(device: torch.device) -> float | None:
    """Nominal dense bf16 peak of a CUDA device, or None when unknown (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_BF16_TFLOPS[key]
    return None


def linear_params(model: torch.nn.Module) -> int:
    """Weights of all nn.Linear modules (the dense projections and lm_head)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def layer_kinds(config) -> list[dict]:
    """Per layer: {"kind": "softmax"|"sparse"|"linear", "heads", "head_dim"} from a SALA or Llama config."""
    n = config.num_hidden_layers
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    mixers = getattr(config, "mixer_types", None)
    if not mixers:
        return [{"kind": "softmax", "heads": config.num_attention_heads, "head_dim": hd}] * n
    out = []
    for t in mixers:
        if "lightning" in str(t):
            out.append({"kind": "linear", "heads": getattr(config, "lightning_nh", config.num_attention_heads),
                        "head_dim": getattr(config, "lightning_head_dim", hd)})
        else:
            out.append({"kind": "sparse", "heads": config.num_attention_heads, "head_dim": hd})
    return out


def attention_forward_flops(config, doc_lengths: Iterable[int], sparse_active: bool = False) -> float:
    """Forward attention FLOPs of all layers for documents of the given lengths."""
    sc = getattr(config, "sparse_config", None) or {}
    dense_len = sc.get("dense_len", float("inf")) if isinstance(sc, dict) else float("inf")
    cap = ((sc.get("topk", 64) * sc.get("block_size", 64) + sc.get("window_size", 2048))
           if isinstance(sc, dict) and sc else None)
    lengths = [int(x) for x in doc_lengths]
    total = 0.0
    for layer in layer_kinds(config):
        h, d = layer["heads"], layer["head_dim"]
        for L in lengths:
            if layer["kind"] == "linear":
                total += 4.0 * h * d * d * L
            elif layer["kind"] == "sparse" and sparse_active and cap is not None and L >= dense_len:
                total += 4.0 * h * d * (cap * cap / 2 + (L - cap) * cap)
            else:
                total += 4.0 * h * d * L * L / 2
    return total


def train_step_flops(model: torch.nn.Module, doc_lengths: Iterable[int], sparse_active: bool = False) -> float:
    """FLOPs of forward + backward over documents of the given lengths (tokens = sum of lengths)."""
    lengths = list(doc_lengths)
    tokens = sum(lengths)
    fwd = 2.0 * linear_params(model) * tokens + attention_forward_flops(model.config, lengths, sparse_active)
    return 3.0 * fwd
