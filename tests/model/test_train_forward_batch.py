"""A plain training forward (HF style: `model(input_ids, labels=...)`, grad enabled) over a batch of several rows,
past the sparse layers' dense length: no cache by default, and a cache asked for does not break the backward."""
from __future__ import annotations

import pytest
import torch

from sala.modeling.configuration_sala import SalaConfig
from sala.modeling.modeling_sala import SalaForCausalLM


def _tiny() -> SalaForCausalLM:
    cfg = SalaConfig.from_preset("sala-small", num_hidden_layers=2, mixer_types=["minicpm4", "lightning-attn"],
                                 hidden_size=128, intermediate_size=256, num_attention_heads=4, vocab_size=512,
                                 sparse_config={"kernel_size": 32, "kernel_stride": 16, "block_size": 64, "topk": 4,
                                                "init_blocks": 1, "window_size": 128, "dense_len": 128,
                                                "use_nope": False})
    torch.manual_seed(0)
    return SalaForCausalLM(cfg).train()


@pytest.mark.parametrize("use_cache", [None, True])
def test_batched_training_forward_backward(use_cache):
    model = _tiny()
    ids = torch.randint(3, 512, (2, 320), generator=torch.Generator().manual_seed(1))
    out = model(input_ids=ids, labels=ids, use_cache=use_cache)
    assert (out.past_key_values is None) == (use_cache is None)
    out.loss.backward()
    # the same gradients as each row alone (the rows do not interact)
    g = model.model.layers[0].self_attn.o_proj.weight.grad.clone()
    model.zero_grad()
    for r in range(2):
        (model(input_ids=ids[r:r + 1], labels=ids[r:r + 1]).loss / 2).backward()
    torch.testing.assert_close(model.model.layers[0].self_attn.o_proj.weight.grad, g, rtol=1e-4, atol=1e-6)
