"""Adaptive number of draft tokens per request: the k that gives the most tokens per unit of time.

A verify step over k drafts emits the accepted drafts and one token of the target's own. If each draft is accepted
with probability alpha (given the ones before it), that is E(k) = 1 + alpha + ... + alpha^k tokens, for the cost
of r(k) decode steps. Plain decoding is E = r = 1, so speculation pays when max_k E(k) / r(k) > 1.

r(k) before any measurement: 1 + cost_per_token * k (a CUDA-graph verify step at the 9B shape and 64K context
costs 1.26 decode steps with its rollback at k = 8, about 0.03 per draft; on a CPU the drafts' positions cost
about 0.35 each). A small model's steps are bound by the host, not by its weights: with the bundled model on an
H100 a verify step costs ~1.7 decode steps whatever k (its own acceptance, rollback and outputs), so drafts that
are accepted a quarter of the time made decoding 10% slower under that prior. `StepCosts` therefore measures the
engine's own decode and verify steps and gives r(k) from them once it has enough samples.
"""
from __future__ import annotations

from collections.abc import Callable

# Cost of one draft position in a verify step, in decode steps (see the module docstring), by device type.
COST_PER_DRAFT = {"cuda": 0.03, "cpu": 0.35}


def linear_cost(per_draft: float, drafts: int) -> float:
    """r(k) before any measurement: a verify step with `drafts` drafts in decode steps, 1 + per_draft * drafts."""
    return 1.0 + per_draft * drafts


def expected_tokens(alpha: float, k: int) -> float:
    """E(k) = 1 + alpha + ... + alpha^k: tokens a verify step over k drafts emits on average."""
    return float(sum(alpha ** j for j in range(k + 1)))


class StepCosts:
    """Wall time of the engine's decode steps and of its verify steps (by tokens per row T), per batch bucket, as
    moving averages; `ratio(T)` is a verify step of T tokens per row in decode steps, in the bucket that ran last.

    A key's first `warmup` samples are skipped (a CUDA graph's compile and capture), and later ones clipped to
    4x the average (a stall of the host is not the step's cost). Until a bucket has `min_samples` decode and
    verify-T samples, `ratio` is the prior 1 + prior_per_draft * (T - 1).
    """

    def __init__(self, prior_per_draft: float, decay: float = 0.9, warmup: int = 2, min_samples: int = 3) -> None:
        if prior_per_draft < 0:
            raise ValueError(f"speculative cost per draft token must be >= 0, got {prior_per_draft}")
        self.prior, self.decay, self.warmup, self.min_samples = prior_per_draft, decay, warmup, min_samples
        self._avg: dict[tuple, float] = {}
        self._n: dict[tuple, int] = {}
        self.bucket = 0

    def _record(self, key: tuple, seconds: float) -> None:
        n = self._n.get(key, 0) + 1
        self._n[key] = n
        if n <= self.warmup:
            return
        avg = self._avg.get(key)
        if avg is None:
            self._avg[key] = seconds
        else:
            self._avg[key] = self.decay * avg + (1 - self.decay) * min(seconds, 4 * avg)

    def record_decode(self, bucket: int, seconds: float) -> None:
        self.bucket = bucket
        self._record(("decode", bucket), seconds)

    def record_verify(self, bucket: int, tokens: int, seconds: float) -> None:
        self.bucket = bucket
        self._record(("verify", bucket, tokens), seconds)

    def measured(self, tokens: int, bucket: int | None = None) -> bool:
        b = self.bucket if bucket is None else bucket
        need = self.warmup + self.min_samples
        return self._n.get(("decode", b), 0) >= need and self._n.get(("verify", b, tokens), 0) >= need

    def ratio(self, tokens: int, bucket: int | None = None) -> float:
        """A verify step of `tokens` per row over a decode step (>= 1 for tokens >= 1)."""
        b = self.bucket if bucket is None else bucket
        if tokens <= 1:
            return 1.0
        if not self.measured(tokens, b):
            return linear_cost(self.prior, tokens - 1)
        return max(1.0, self._avg[("verify", b, tokens)] / self._avg[("decode", b)])


class AdaptiveK:
    """k for the next verify step of one request (0: decode plainly this step).

    alpha is estimated from the request's own verify steps: accepted drafts are successes, a rejection (fewer
    accepted than drafted) one failure; both counts decay by `decay` per step (the text changes: a quoted span
    ends), starting from `prior` with the weight of `prior_weight` drafts. k maximizes E(k) / r(k) over 0..max_k;
    it is 0 unless that beats plain decoding by `margin`. While at 0, after `probe_after` plain tokens one step
    drafts k = 1, so a request whose text turns repetitive later gets drafts again (no probes where even accepted
    drafts could not pay for their cost).

    r(k) is `cost(k)` when given (the engine's measured `StepCosts`), else 1 + cost_per_token * k. With the
    linear cost k is deterministic: the same acceptance history gives the same k (seeded sampling stays
    reproducible; the engine gives measured costs only to requests without a seed of their own).
    """

    def __init__(self, max_k: int, cost_per_token: float = COST_PER_DRAFT["cuda"], prior: float = 0.6,
                 prior_weight: float = 2.0, decay: float = 0.9, margin: float = 1.05, probe_after: int = 16,
                 cost: Callable[[int], float] | None = None) -> None:
        if max_k < 0:
            raise ValueError(f"num_speculative_tokens must be >= 0, got {max_k}")
        if cost_per_token < 0:
            raise ValueError(f"speculative cost per draft token must be >= 0, got {cost_per_token}")
        if not 0.0 <= prior <= 1.0 or not 0.0 < decay <= 1.0:
            raise ValueError(f"AdaptiveK: prior must be in [0, 1] and decay in (0, 1], got {prior}, {decay}")
        self.max_k, self.cost, self.margin = max_k, cost_per_token, margin
        self.probe_after, self.decay = probe_after, decay
        self._cost = cost
        self._acc = prior * prior_weight          # decayed accepted drafts
        self._rej = (1.0 - prior) * prior_weight  # decayed rejections
        self._plain = 0
        self._can_pay = True
        self.k = self._best_k()

    def relative_cost(self, k: int) -> float:
        """r(k): a verify step with k drafts in decode steps."""
        if k <= 0:
            return 1.0
        return self._cost(k) if self._cost is not None else linear_cost(self.cost, k)

    @property
    def alpha(self) -> float:
        """The current estimate of a draft's acceptance probability."""
        return self._acc / max(self._acc + self._rej, 1e-9)

    def _best_k(self) -> int:
        a = min(self.alpha, 1.0 - 1e-9)
        r = [self.relative_cost(k) for k in range(self.max_k + 1)]
        # whether drafts could pay at all (every one accepted): if not, no probes either
        self._can_pay = any((k + 1) / r[k] >= self.margin for k in range(1, self.max_k + 1))
        value = [expected_tokens(a, k) / r[k] for k in range(self.max_k + 1)]
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
