"""torch.compile for training: the fixed-shape, elementwise-heavy pieces of a SALA model, the attention ops eager.

The lightning and sparse attention ops take packed-document bounds from the host (a different list every
step), which whole-model compilation would turn into graph breaks and recompiles. What costs time around them
in a small model is elementwise work (fp32 RMSNorms, RoPE, gates, SwiGLU): each decoder layer's two norms
and MLP, and each attention layer's `prepare` (QK-norm, RoPE, HyPE scaling) and `finish` (output norm, gate,
output projection), are compiled separately. Their shapes are the same every step ([1, tokens per
micro-batch, ...]), so each compiles once.
"""
from __future__ import annotations

import torch


def compile_for_training(model: torch.nn.Module, backend: str = "inductor") -> torch.nn.Module:
    """Compile `model` for training in place; returns the module to call.

    SALA models: the pieces listed in the module docstring (the model object itself stays the one to call).
    Other models (the dense Llama baseline): `torch.compile(model)`.
    """
    from sala.modeling.modeling_sala import (SalaDecoderLayer, SalaForCausalLM, SalaLightningAttention,
                                             SalaSparseAttention)

    if not isinstance(model, SalaForCausalLM):
        return torch.compile(model, backend=backend)
    for module in model.modules():
        if isinstance(module, SalaDecoderLayer):
            for child in (module.input_layernorm, module.post_attention_layernorm, module.mlp):
                child.compile(backend=backend, dynamic=False)
        elif isinstance(module, (SalaLightningAttention, SalaSparseAttention)):
            module.prepare = torch.compile(module.prepare, backend=backend, dynamic=False)
            module.finish = torch.compile(module.finish, backend=backend, dynamic=False)
    model.model.norm.compile(backend=backend, dynamic=False)
    return model
