"""Adaptive number of draft tokens per request: back off when drafts are rejected, probe up again."""
from __future__ import annotations


class AdaptiveK:
    """k for the next verify step of one request.

    After every `window` verify steps, k halves when the window's acceptance rate (accepted / drafted) is below
    `low` (down to 0: plain decoding), and doubles (up to max_k) when it is at least `high`. At k = 0 the request
    decodes plainly for `probe_after` tokens, then tries k = 1 again, so a request whose text turns repetitive
    later still gets drafts. A verify step costs about one decode step plus the drafts' extra positions, so low
    acceptance is the only way speculation can be slower than plain decoding; backing off bounds it.
    """

    def __init__(self, max_k: int, window: int = 4, low: float = 0.3, high: float = 0.7,
                 probe_after: int = 16) -> None:
        if max_k < 0:
            raise ValueError(f"num_speculative_tokens must be >= 0, got {max_k}")
        self.max_k, self.window, self.low, self.high, self.probe_after = max_k, window, low, high, probe_after
        self.k = max_k
        self._steps = self._drafted = self._accepted = 0
        self._plain = 0

    def next_k(self) -> int:
        """k to use now (0: decode plainly this step)."""
        if self.k == 0 and self.max_k > 0:
            self._plain += 1
            if self._plain > self.probe_after:
                self.k, self._plain = 1, 0
        return self.k

    def update(self, drafted: int, accepted: int) -> None:
        """Record one verify step's outcome."""
        if drafted <= 0:
            return
        self._steps += 1
        self._drafted += drafted
        self._accepted += accepted
        if self._steps < self.window:
            return
        rate = self._accepted / max(self._drafted, 1)
        if rate < self.low:
            self.k //= 2
        elif rate >= self.high:
            self.k = min(self.max_k, max(1, self.k * 2))
        self._steps = self._drafted = self._accepted = 0
