"""GPU check of the engine at length: a 1M-token prefill gives finite logits and the same next-token
distribution for two prefill chunk sizes (released layer shapes, 4 layers: 2 sparse + 2 lightning)."""
from __future__ import annotations

import os

import pytest
import torch

from sala.engine import SalaEngine

pytestmark = pytest.mark.gpu

LENGTH = int(os.environ.get("SALA_GPU_TEST_LENGTH", 1 << 20))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_million_token_prefill_is_finite_and_chunk_size_independent():
    overrides = dict(num_hidden_layers=4, mixer_types=["minicpm4", "lightning-attn", "lightning-attn", "minicpm4"])
    engine = SalaEngine.from_preset("minicpm-sala-9b", random_weights=True, device="cuda", dtype="bf16", seed=1,
                                    config_overrides=overrides)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, engine.config.vocab_size, (LENGTH,), generator=g).tolist()
    logps = []
    for chunk in (16384, 65536):
        engine.chunk_size = chunk
        logits = engine.prefill([ids], LENGTH + 1)[0]
        assert torch.isfinite(logits).all(), f"non-finite logits at {LENGTH} tokens, chunk {chunk}"
        logps.append(torch.log_softmax(logits.double(), -1))
        engine.cache = None
        torch.cuda.empty_cache()
    p, q = logps[0].exp(), logps[1].exp()
    kl = float((p * (logps[0] - logps[1])).sum())
    tv = float((p - q).abs().sum() / 2)
    assert kl < 1e-2 and tv < 0.05, f"chunk sizes 16K vs 64K disagree at {LENGTH} tokens: KL {kl:.3g}, TV {tv:.3g}"
    assert int(logps[1].argmax()) in logps[0].topk(5).indices.tolist()
