"""linear_cross_entropy (sala.ops.linear_cross_entropy) against F.cross_entropy on full logits (CPU)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sala.ops.linear_cross_entropy import linear_cross_entropy


def _case(n=37, h=16, v=50, seed=0, ignore=(3, 4, 20, 36)):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) * 0.5
    labels = torch.randint(0, v, (n,), generator=g)
    labels[list(ignore)] = -100
    return hidden, weight, labels


def _grads(fn, hidden, weight, labels):
    hd, wd = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fn(hd, wd, labels)
    loss.backward()
    return loss.detach(), hd.grad, wd.grad


@pytest.mark.parametrize("chunk", [1, 8, 37, 100])
def test_matches_full_logits_cross_entropy(chunk):
    hidden, weight, labels = _case()
    ref = _grads(lambda a, b, y: F.cross_entropy(a @ b.T, y, ignore_index=-100), hidden, weight, labels)
    got = _grads(lambda a, b, y: linear_cross_entropy(a, b, y, chunk=chunk), hidden, weight, labels)
    for r, x in zip(ref, got):
        torch.testing.assert_close(x.double(), r, rtol=1e-5, atol=1e-6)   # the logits are fp32 in both (by design)


def test_scaled_upstream_gradient_and_fp32_weights_gradient():
    hidden, weight, labels = (t.float() if t.is_floating_point() else t for t in _case())
    hd, wd = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    (3.0 * linear_cross_entropy(hd, wd, labels, chunk=5)).backward()
    hr, wr = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    (3.0 * F.cross_entropy(hr @ wr.T, labels, ignore_index=-100)).backward()
    torch.testing.assert_close(hd.grad, hr.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(wd.grad, wr.grad, rtol=1e-5, atol=1e-6)
    assert wd.grad.dtype == torch.float32


def test_bf16_autocast_matches_the_plain_lm_head_path():
    """Under autocast the logits come from a bf16 matmul, as the plain lm_head's; the loss then matches closely."""
    hidden, weight, labels = (t.float() if t.is_floating_point() else t for t in _case(n=64, h=32, v=80))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(F.linear(hidden, weight).float(), labels, ignore_index=-100)
        got = linear_cross_entropy(hidden, weight, labels, chunk=16)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_no_labelled_token_gives_nan_loss_and_zero_gradients():
    hidden, weight, labels = _case()
    labels[:] = -100
    loss, gh, gw = _grads(lambda a, b, y: linear_cross_entropy(a, b, y, chunk=8), hidden, weight, labels)
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(hidden @ weight.T, labels, ignore_index=-100))
    assert not gh.any() and not gw.any()


def test_bad_input_is_a_clear_error():
    hidden, weight, labels = _case()
    with pytest.raises(ValueError, match=r"hidden \[N, H\] and weight \[V, H\]"):
        linear_cross_entropy(hidden, weight[:, :3], labels)
    with pytest.raises(ValueError, match=r"labels \[N\] = \[37\]"):
        linear_cross_entropy(hidden, weight, labels[:5])
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        linear_cross_entropy(hidden, weight, labels, chunk=0)
    labels[0] = 50
    with pytest.raises(ValueError, match=r"label 50 outside the vocabulary \[0, 50\)"):
        linear_cross_entropy(hidden, weight, labels)
