"""torch.compile for training: the fixed-shape, elementwise-heavy pieces of a SALA model, the attention ops eager.

The lightning and sparse attention ops take packed-document bounds from the host (a different list every
step), which whole-model compilation would turn into graph breaks and recompiles. What costs time around them
in a small model is elementwise work (fp32 RMSNorms, RoPE, gates, SwiGLU, scaled residual adds); the model compiles
those pieces itself (`SalaForCausalLM.compile_for_training`). Their shapes are the same every step ([1, tokens per
micro-batch, ...]), so each compiles once.
"""
from __future__ import annotations

import torch

# Compiled graphs kept per function before dynamo falls back to running it eagerly: every (shape, grad mode, norm
# kind) a run meets needs one (training and evaluation batches of the calibration and of each stage), more than
# dynamo's default of 8.
RECOMPILE_LIMIT = 64


def _raise_recompile_limit(limit: int = RECOMPILE_LIMIT) -> None:
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):   # the name of torch >= 2.6, and before
        if hasattr(dynamo_config, name) and getattr(dynamo_config, name) < limit:
            setattr(dynamo_config, name, limit)


def compile_for_training(model: torch.nn.Module, backend: str = "inductor", compile_loss: bool = False,
                         blocks: bool = False) -> torch.nn.Module:
    """Compile `model` for training; returns the module to call.

    SALA models compile their own pieces in place (`SalaForCausalLM.compile_for_training`: `blocks` for two regions
    per decoder layer, `compile_loss` for the LM head + cross-entropy as one function); the model object stays the one
    to call. Other models (the dense Llama baseline): `torch.compile(model)`. Raises dynamo's recompile limit to
    RECOMPILE_LIMIT.
    """
    from sala.modeling.modeling_sala import SalaForCausalLM

    _raise_recompile_limit()
    if not isinstance(model, SalaForCausalLM):
        return torch.compile(model, backend=backend)
    return model.compile_for_training(backend=backend, blocks=blocks, compile_loss=compile_loss)
