"""LM-head projection and cross-entropy over token chunks, without the [tokens, vocab] logits in memory.

`linear_cross_entropy(hidden, weight, labels)` equals
`F.cross_entropy((hidden @ weight.T).float(), labels, ignore_index=-100)` (mean over the labelled tokens). The
forward walks `chunk` tokens at a time: their logits (in the matmul dtype: bf16 under autocast, as the plain
lm_head computes them, then fp32), log-sum-exp, loss, and right away the gradients of that chunk
(softmax - one-hot), folded into d_hidden [tokens, hidden] and an fp32 d_weight [vocab, hidden]. The backward only
scales them by the incoming gradient. Peak extra memory: one chunk of fp32 logits (chunk x vocab x 4 bytes) plus
d_hidden and d_weight, instead of the logits and their gradient for all tokens (a 4K-token row of a 73K vocab: 1.2
GB each in fp32). Plain PyTorch, so CPU and GPU alike.
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100


def _matmul_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the plain lm_head would multiply in: the autocast dtype when autocast is on, else t's."""
    dev = t.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return t.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
        dt = _matmul_dtype(hidden)
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(dt), weight.to(dt)
            n_valid = (labels != IGNORE_INDEX).sum().float()   # a tensor: no host sync
            inv = 1.0 / n_valid.clamp_min(1.0)
            loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
            d_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
            d_weight = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                        if ctx.needs_input_grad[1] else None)
            for s in range(0, h.shape[0], chunk):
                y = labels[s:s + chunk]
                valid = (y != IGNORE_INDEX).float()[:, None]
                idx = y.clamp_min(0)[:, None]
                logits = (h[s:s + chunk] @ w.T).float()
                lse = torch.logsumexp(logits, dim=-1, keepdim=True)
                loss += ((lse - logits.gather(1, idx)) * valid).sum()
                if d_hidden is None and d_weight is None:
                    continue
                # d(mean loss)/d(logits) = (softmax - one-hot) / n_valid on labelled rows, 0 on the others
                g = torch.exp(logits - lse).scatter_add_(1, idx, -torch.ones_like(valid)).mul_(valid * inv).to(dt)
                if d_hidden is not None:
                    d_hidden[s:s + chunk] = (g @ w).to(hidden.dtype)
                if d_weight is not None:
                    d_weight += (g.T @ h[s:s + chunk]).float()
        ctx.save_for_backward(d_hidden if d_hidden is not None else hidden.new_empty(0),
                              d_weight if d_weight is not None else weight.new_empty(0))
        ctx.weight_dtype = weight.dtype
        return loss / n_valid   # NaN when no token is labelled, as F.cross_entropy

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        d_hidden, d_weight = ctx.saved_tensors
        gh = d_hidden * grad_loss.to(d_hidden.dtype) if ctx.needs_input_grad[0] else None
        gw = (d_weight * grad_loss).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         chunk: int = 4096) -> torch.Tensor:
    """Mean cross-entropy of logits = hidden @ weight.T over the tokens whose label is not -100, in chunks of
    `chunk` tokens. hidden [N, H], weight [V, H], labels int [N]; returns a scalar fp32 loss (NaN when no token is
    labelled, as F.cross_entropy)."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: hidden [N, H] and weight [V, H], got {list(hidden.shape)} and "
                         f"{list(weight.shape)}")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"linear_cross_entropy: labels [N] = [{hidden.shape[0]}], got {list(labels.shape)}")
    if chunk < 1:
        raise ValueError(f"linear_cross_entropy: chunk must be >= 1, got {chunk}")
    if labels.device.type == "cpu":   # on a GPU, gather's device assert catches it (a check here would sync)
        bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= weight.shape[0]))
        if bool(bad.any()):
            raise ValueError(f"linear_cross_entropy: label {int(labels[bad][0])} outside the vocabulary "
                             f"[0, {weight.shape[0]})")
    return _LinearCrossEntropy.apply(hidden, weight, labels, int(chunk))
