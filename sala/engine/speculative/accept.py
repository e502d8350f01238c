"""Acceptance of draft tokens against the target's logits.

Greedy: the longest prefix of the drafts that equals the target's argmax, then the target's own next token.
Sampling (Leviathan et al. 2023): draft x_i is accepted with probability min(1, p_i(x_i) / q_i(x_i)); at the first
rejection the token is drawn from norm(max(0, p_i - q_i)); when every draft is accepted a bonus token is drawn from
p_k. Every emitted token is then distributed exactly as the target's p. Deterministic drafters (n-gram lookup, a
greedy draft model) have q = a point mass at x_i: accept with probability p_i(x_i), on rejection draw from p_i with
x_i removed. p applies temperature, top-k and top-p exactly as non-speculative sampling does.
"""
from __future__ import annotations

import torch

from sala.engine.sampling import SamplingParams, sampling_probs


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(probs, 1, generator=generator)[0])


def _uniform(device: torch.device, generator: torch.Generator | None) -> float:
    return float(torch.rand((), device=device, generator=generator))


def accept_greedy(best: list[int], drafts: list[int]) -> tuple[list[int], int]:
    """Greedy acceptance from the target's argmax tokens `best` (k + 1 of them, after the last accepted token and
    after each draft): the longest prefix of `drafts` equal to them, then the target's next token."""
    a = 0
    while a < len(drafts) and best[a] == drafts[a]:
        a += 1
    return drafts[:a] + [best[a]], a


def accept_drafts(logits: torch.Tensor, drafts: list[int], params: SamplingParams,
                  generator: torch.Generator | None = None, draft_probs: torch.Tensor | None = None
                  ) -> tuple[list[int], int]:
    """Tokens to emit and the number of drafts accepted.

    logits [k + 1, V]: the target's logits after the last accepted token and after each draft; drafts: k ids;
    draft_probs [k, V] or None (deterministic drafts: point masses). Returns (accepted drafts + one target token,
    number accepted), i.e. between 1 and k + 1 tokens.
    """
    k = len(drafts)
    if logits.shape[0] != k + 1:
        raise ValueError(f"accept_drafts: logits {tuple(logits.shape)} must have k + 1 = {k + 1} rows")
    if params.greedy:
        return accept_greedy(torch.argmax(logits, dim=-1).tolist(), drafts)
    p = sampling_probs(logits, params)
    for i, x in enumerate(drafts):
        if draft_probs is None:
            ratio = float(p[i, x])
        else:
            qx = float(draft_probs[i, x])
            ratio = 1.0 if qx <= 0 else min(1.0, float(p[i, x]) / qx)
        if _uniform(p.device, generator) < ratio:
            continue
        if draft_probs is None:
            resid = p[i].clone()
            resid[x] = 0.0
        else:
            resid = torch.clamp(p[i] - draft_probs[i], min=0.0)
        if float(resid.sum()) <= 0.0:      # p is (numerically) the draft itself: nothing else to draw
            resid = p[i]
        return drafts[:i] + [_draw(resid, generator)], i
    return list(drafts) + [_draw(p[k], generator)], k
