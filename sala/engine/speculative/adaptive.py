"""Adaptive number of draft tokens per request: the k that gives the most tokens per unit of time.

A verify step over k drafts emits the accepted drafts and one token of the target's own. If each draft is accepted
with probability alpha (given the ones before it), that is E(k) = 1 + alpha + ... + alpha^k tokens, for the cost
of r(k) = 1 + cost_per_token * k decode steps (measured: a CUDA-graph verify step at the 9B shape and 64K context
costs 1.26 decode steps with its rollback at k = 8, about 0.03 per draft; on a CPU the drafts' positions cost
about 0.35 each). Plain decoding is E = r = 1, so speculation pays when max_k E(k) / r(k) > 1.
"""
from __future__ import annotations

# Cost of one draft position in a verify step, in decode steps (see the module docstring), by device type.
COST_PER_DRAFT = {"cuda": 0.03, "cpu": 0.35}


def expected_tokens(alpha: float, k: int) -> float:
    """E(k) = 1 + alpha + ... + alpha^k: tokens a verify step over k drafts emits on average."""
    return float(sum(alpha ** j for j in range(k + 1)))


class AdaptiveK:
    """k for the next verify step of one request (0: decode plainly this step).

    alpha is estimated from the request's own verify steps: accepted drafts are successes, a rejection (fewer
    accepted than drafted) one failure; both counts decay by `decay` per step (the text changes: a quoted span
    ends), starting from `prior` with the weight of `prior_weight` drafts. k maximizes E(k) / r(k) over 0..max_k;
    it is 0 unless that beats plain decoding by `margin`. While at 0, after `probe_after` plain tokens one step
    drafts k = 1, so a request whose text turns repetitive later gets drafts again (no probes where even accepted
    drafts could not pay for their cost). Deterministic: the same
    acceptance history gives the same k (seeded sampling stays reproducible).
    """

    def __init__(self, max_k: int, cost_per_token: float = COST_PER_DRAFT["cuda"], prior: float = 0.6,
                 prior_weight: float = 2.0, decay: float = 0.9, margin: float = 1.05, probe_after: int = 16) -> None:
        if max_k < 0:
            raise ValueError(f"num_speculative_tokens must be >= 0, got {max_k}")
        if cost_per_token < 0:
            raise ValueError(f"speculative cost per draft token must be >= 0, got {cost_per_token}")
        if not 0.0 <= prior <= 1.0 or not 0.0 < decay <= 1.0:
            raise ValueError(f"AdaptiveK: prior must be in [0, 1] and decay in (0, 1], got {prior}, {decay}")
        self.max_k, self.cost, self.margin = max_k, cost_per_token, margin
        self.probe_after, self.decay = probe_after, decay
        self._acc = prior * prior_weight          # decayed accepted drafts
        self._rej = (1.0 - prior) * prior_weight  # decayed rejections
        self._plain = 0
        # whether drafts could pay at all (every one accepted): if not, no probes either
        self._can_pay = any((k + 1) / (1.0 + self.cost * k) >= margin for k in range(1, max_k + 1))
        self.k = self._best_k()

    @property
    def alpha(self) -> float:
        """The current estimate of a draft's acceptance probability."""
        return self._acc / max(self._acc + self._rej, 1e-9)

    def _best_k(self) -> int:
        a = min(self.alpha, 1.0 - 1e-9)
        value = [expected_tokens(a, k) / (1.0 + self.cost * k) for k in range(self.max_k + 1)]
        best = max(range(self.max_k + 1), key=lambda k: (value[k], -k))
        return best if best > 0 and value[best] >= self.margin else 0

    def next_k(self) -> int:
        """k to use now (0: decode plainly this step)."""
        if self.k == 0 and self._can_pay:
            self._plain += 1
            if self._plain > self.probe_after:
                self._plain = 0
                return 1
        return self.k

    def update(self, drafted: int, accepted: int) -> None:
        """Record one verify step's outcome."""
        if drafted <= 0:
            return
        self._acc = self._acc * self.decay + accepted
        self._rej = self._rej * self.decay + (1.0 if accepted < drafted else 0.0)
        self.k = self._best_k()
