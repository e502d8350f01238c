"""Token sampling: greedy, temperature, top-k, top-p; stop strings and stop ids.

All functions take logits [B, V] (fp32) and work on any device without host syncs, except where noted.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop.

    temperature 0 means greedy (argmax); top_k 0 and top_p 1.0 disable those filters.
    stop: strings that end the generation (not included in the output text); stop_token_ids: ids that end it
    (the model's EOS ids are added unless ignore_eos). max_new_tokens bounds the generated tokens.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")
        self.stop_token_ids = [int(t) for t in self.stop_token_ids]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties at the k-th value kept), others -inf. [B, V] -> [B, V]."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability reaches p (at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs          # mass of the strictly more likely tokens
    drop_sorted = before >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sampling_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The sampling distribution [B, V] fp32 of logits [B, V] under params (temperature > 0): temperature, then
    top-k, then top-p."""
    x = logits.float() / params.temperature
    x = filter_top_k(x, params.top_k)
    x = filter_top_p(x, params.top_p)
    return torch.softmax(x, dim=-1)


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
                ) -> torch.Tensor:
    """Next token ids [B] (int64, on logits.device) from logits [B, V]."""
    if params.greedy:
        return torch.argmax(logits, dim=-1)
    return torch.multinomial(sampling_probs(logits, params), 1, generator=generator)[:, 0]


class StopMatcher:
    """Streams text of one sequence while watching for stop strings.

    `feed(text)` takes the full decoded text so far and returns (new text safe to emit, stopped). Text that
    could still be the start of a stop string is held back; when a stop string appears, the text before it
    is released and generation should end. `text` is the final output (stop string excluded).
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = list(stops)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.emitted = 0
        self.text = ""
        self.stopped = False

    def feed(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        # Search from where a stop string could start that was not fully visible before.
        start = max(0, self.emitted - self.hold)
        cut = min((i for i in (text.find(s, start) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text = text[:cut]
            self.stopped = True
            out = text[self.emitted:cut]
            self.emitted = cut
            return out, True
        safe = len(text)
        if text.endswith("\ufffd"):       # an incomplete multi-byte character: wait for the rest
            safe = text.rstrip("\ufffd").__len__()
        if self.stops:
            # hold back a tail that is a prefix of some stop string
            for n in range(min(self.hold, safe), 0, -1):
                tail = text[safe - n:safe]
                if any(s.startswith(tail) for s in self.stops):
                    safe -= n
                    break
        safe = max(safe, self.emitted)
        out = text[self.emitted:safe]
        self.emitted = safe
        self.text = text
        return out, False

    def flush(self, text: str) -> str:
        """At the end (no stop string met): everything not yet emitted."""
        if self.stopped:
            return ""
        out = text[self.emitted:]
        self.emitted = len(text)
        self.text = text
        return out
