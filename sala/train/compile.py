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


# compiled graphs kept per function before dynamo falls back to running it eagerly: every (shape, grad mode, norm
# kind) a run meets needs one (training and evaluation batches of the calibration and of each stage); the default 8
# ran out in run 16's evaluations
RECOMPILE_LIMIT = 64


def _raise_recompile_limit(limit: int = RECOMPILE_LIMIT) -> None:
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):   # the name of torch >= 2.6, and before
        if hasattr(dynamo_config, name) and getattr(dynamo_config, name) < limit:
            setattr(dynamo_config, name, limit)


def compile_for_training(model: torch.nn.Module, backend: str = "inductor", compile_loss: bool = False,
                         blocks: bool = False) -> torch.nn.Module:
    """Compile `model` for training in place; returns the module to call.

    SALA models: the pieces listed in the module docstring (the model object itself stays the one to call); with
    `blocks`, instead, each decoder layer as two regions around its attention op (`SalaDecoderLayer.pre_attention`:
    norm, projections, QK-norm and RoPE; `post_attention`: output norm, gate and projection, residual, norm, MLP,
    residual), so a step calls 2 compiled graphs per layer instead of 6 (less host time per step, for steps the host
    cannot keep ahead of; inference, with a cache or padding, runs the layers as before); with `compile_loss` also the
    LM head + cross-entropy as one function (`SalaForCausalLM.lm_loss`: the cast to fp32, log-softmax and its backward
    fuse, so the [tokens, vocab] fp32 logits are never stored; the model then returns no logits with its loss). Other
    models (the dense Llama baseline): `torch.compile(model)`. Raises dynamo's recompile limit to RECOMPILE_LIMIT.
    """
    from sala.modeling.modeling_sala import (SalaDecoderLayer, SalaForCausalLM, SalaLightningAttention,
                                             SalaSparseAttention)

    _raise_recompile_limit()
    if not isinstance(model, SalaForCausalLM):
        return torch.compile(model, backend=backend)
    for module in model.modules():
        if isinstance(module, SalaDecoderLayer) and blocks:
            module.pre_attention = torch.compile(module.pre_attention, backend=backend, dynamic=False)
            module.post_attention = torch.compile(module.post_attention, backend=backend, dynamic=False)
            module.use_blocks = True
        elif isinstance(module, SalaDecoderLayer):
            for child in (module.input_layernorm, module.mlp):
                child.compile(backend=backend, dynamic=False)
            # the residual adds with their scale, and the second norm with the add before it
            module.add_and_norm = torch.compile(module.add_and_norm, backend=backend, dynamic=False)
            module.add_residual = torch.compile(module.add_residual, backend=backend, dynamic=False)
        elif isinstance(module, (SalaLightningAttention, SalaSparseAttention)) and not blocks:
            module.prepare = torch.compile(module.prepare, backend=backend, dynamic=False)
            module.finish = torch.compile(module.finish, backend=backend, dynamic=False)
    model.model.norm.compile(backend=backend, dynamic=False)
    if compile_loss:
        model.lm_loss = torch.compile(model.lm_loss, backend=backend, dynamic=False)
        model.loss_only = True
    return model
