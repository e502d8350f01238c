"""torch.compile for training: the fixed-shape, elementwise-heavy pieces of a SALA model, the attention ops eager.

The lightning and sparse attention ops take packed-document bounds from the host (a different list every
step), which whole-model compilation would turn into graph breaks and recompiles. What costs time around them
in a small model is elementwise work (fp32 RMSNorms, RoPE, gates, SwiGLU, scaled residual adds): each decoder
layer's first norm, MLP and scaled residual adds (the first with the norm after it), and each attention layer's
`prepare` (QK-norm, RoPE, HyPE scaling) and `finish` (output norm, gate, output projection), are compiled
separately. Their shapes are the same every step ([1, tokens per micro-batch, ...]), so each compiles once.
"""
from __future__ import annotations

import torch


def compile_for_training(model: torch.nn.Module, backend: str = "inductor", compile_loss: bool = False
                         ) -> torch.nn.Module:
    """Compile `model` for training in place; returns the module to call.

    SALA models: the pieces listed in the module docstring (the model object itself stays the one to call); with
    `compile_loss` also the LM head + cross-entropy as one function (`SalaForCausalLM.lm_loss`: the cast to fp32,
    log-softmax and its backward fuse, so the [tokens, vocab] fp32 logits are never stored; the model then returns
    no logits with its loss). Other models (the dense Llama baseline): `torch.compile(model)`.
    """
    from sala.modeling.modeling_sala import (SalaDecoderLayer, SalaForCausalLM, SalaLightningAttention,
                                             SalaSparseAttention)

    if not isinstance(model, SalaForCausalLM):
        return torch.compile(model, backend=backend)
    for module in model.modules():
        if isinstance(module, SalaDecoderLayer):
            for child in (module.input_layernorm, module.mlp):
                child.compile(backend=backend, dynamic=False)
            # the residual adds with their scale, and the second norm with the add before it
            module.add_and_norm = torch.compile(module.add_and_norm, backend=backend, dynamic=False)
            module.add_residual = torch.compile(module.add_residual, backend=backend, dynamic=False)
        elif isinstance(module, (SalaLightningAttention, SalaSparseAttention)):
            module.prepare = torch.compile(module.prepare, backend=backend, dynamic=False)
            module.finish = torch.compile(module.finish, backend=backend, dynamic=False)
    model.model.norm.compile(backend=backend, dynamic=False)
    if compile_loss:
        model.lm_loss = torch.compile(model.lm_loss, backend=backend, dynamic=False)
        model.loss_only = True
    return model
