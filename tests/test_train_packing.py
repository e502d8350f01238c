"""Packed sequences: no attention across documents, for both SALA layer kinds and the Llama baseline.

A packed batch made by the trainer's collate must give every document exactly the logits it gets
alone, and changing one document must not change another's logits.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sala.data.batching import collate_windows
from sala.data.packed import Window


def _sala(mixers: list[str], sparse: bool):
    from sala import SalaConfig, SalaForCausalLM

    cfg = SalaConfig.from_preset("sala-tiny")
    cfg.num_hidden_layers = len(mixers)
    cfg.mixer_types = mixers
    cfg.use_sparse_attention = sparse
    torch.manual_seed(0)
    return SalaForCausalLM(cfg).eval()


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def _logits(model, batch, flat: bool) -> torch.Tensor:
    with torch.no_grad():
        if flat:
            return model(input_ids=batch["input_ids"], cu_seqlens=batch["cu_seqlens"], use_cache=False).logits
        return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits


def _check_isolation(model, flat: bool, lengths: list[int], vocab: int) -> None:
    rng = np.random.default_rng(1)
    T = sum(lengths)
    toks = rng.integers(3, vocab, size=T)
    starts = np.cumsum([0] + lengths[:-1])
    layout = "flat" if flat else "rows"
    packed = _logits(model, collate_windows([Window(toks, starts)], layout), flat)[0]
    for s, L in zip(starts, lengths):
        alone = _logits(model, collate_windows([Window(toks[s:s + L], np.array([0]))], layout), flat)[0]
        torch.testing.assert_close(packed[s:s + L], alone, rtol=1e-4, atol=1e-4)
    # perturb the first document: the others must not move at all
    toks2 = toks.copy()
    toks2[: lengths[0]] = rng.integers(3, vocab, size=lengths[0])
    packed2 = _logits(model, collate_windows([Window(toks2, starts)], layout), flat)[0]
    assert not torch.allclose(packed2[: lengths[0]], packed[: lengths[0]])
    torch.testing.assert_close(packed2[lengths[0]:], packed[lengths[0]:], rtol=1e-5, atol=1e-5)


# sala-tiny: dense_len 128, block 16 -> documents of 150+ tokens take the sparse (top-k) path
@pytest.mark.parametrize("kind, sparse, lengths", [
    ("lightning-attn", False, [37, 50, 41]),
    ("minicpm4", False, [37, 50, 41]),
    ("minicpm4", True, [170, 45, 190]),
])
def test_sala_layer_kinds_do_not_attend_across_documents(kind, sparse, lengths):
    model = _sala([kind, kind], sparse)
    _check_isolation(model, flat=True, lengths=lengths, vocab=model.config.vocab_size)


def test_llama_packed_rows_isolate_documents():
    _check_isolation(_llama(), flat=False, lengths=[29, 60, 35], vocab=512)


def test_multi_window_flat_batch_matches_rows():
    """Two windows flattened into one row with cu_seqlens equal the windows run one by one."""
    model = _sala(["minicpm4", "lightning-attn"], False)
    rng = np.random.default_rng(2)
    w1 = Window(rng.integers(3, 500, size=64), np.array([0, 20]))
    w2 = Window(rng.integers(3, 500, size=64), np.array([0, 33, 50]))
    both = _logits(model, collate_windows([w1, w2], "flat"), True)[0]
    one = _logits(model, collate_windows([w1], "flat"), True)[0]
    two = _logits(model, collate_windows([w2], "flat"), True)[0]
    torch.testing.assert_close(both, torch.cat([one, two]), rtol=1e-4, atol=1e-4)
