"""The engine runs the model's own layers: on the bundled model, its chunked prefill and its decode steps give the
logits of `SalaForCausalLM.forward` over the whole sequence (CPU, fp32)."""
from __future__ import annotations

import torch

from sala.engine import SalaEngine
from sala.engine.forward import DecodeStep
from sala.engine.loading import load_model_dir
from sala.utils.bundled import bundled_model_dir


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_engine_prefill_and_decode_equal_the_model_forward_on_the_bundled_model():
    path = bundled_model_dir()
    assert path is not None, "the bundled model ships with the package"
    model = load_model_dir(path, device="cpu", dtype=torch.float32)
    sp = model.config.sparse_config
    # Below (topk + local blocks) x block_size keys every block is selected, so block-score ties at the top-k cut-off
    # (resolved by index only on some paths) cannot make the two computations pick different blocks; the sparse
    # layers still write their cache and compressed keys chunk by chunk and step by step. Selection past that point
    # is compared on sala-tiny in test_engine.py.
    n = (sp["topk"] + sp["window_size"] // sp["block_size"]) * sp["block_size"] - 40
    ids = torch.randint(3, model.config.vocab_size, (n,), generator=torch.Generator().manual_seed(0)).tolist()
    new = [11, 12, 13]
    with torch.no_grad():
        want = model(torch.tensor([ids + new])).logits[0]
    engine = SalaEngine(model, chunk_size=700)   # chunks 700, 700, 600 + decode
    assert model.projections_fused                     # the runner fused q/k/v(/gate) and gate/up for real
    got = engine.prefill([ids], n + len(new))[0]
    assert rel(got, want[n - 1]) < 1e-5
    step = DecodeStep(engine.runner, engine.cache)
    for t, tok in enumerate(new):
        step.ids.fill_(tok)
        assert rel(step()[0], want[n + t]) < 1e-5, f"decode step {t}"
    assert engine.cache.seqlens.tolist() == [n + len(new)]
