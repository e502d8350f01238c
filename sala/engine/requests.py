"""What flows in and out of the serving engine (`EngineCore`): requests, per-step outputs, admission errors.

A `Request` is a tokenized prompt with its sampling parameters; every `EngineCore.step()` returns one
`RequestOutput` per request that progressed (new tokens, text newly safe to show, finish state).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from sala.engine.sampling import SamplingParams


class RequestError(ValueError):
    """A request that can never be served (too long for the model length or the memory); the message has both
    numbers. HTTP status 400."""

    status = 400


class QueueFullError(RuntimeError):
    """The waiting queue is full; retry later. HTTP status 503."""

    status = 503


@dataclass
class Request:
    """One generation request: prompt token ids [T] and how to sample.

    logprobs: top-k log-probabilities per generated token (0 = only the chosen token's); None = none.
    prompt_logprobs: the same for every prompt token (the first prompt token has none), e.g. for `echo`.
    """

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    arrival_time: float = field(default_factory=time.monotonic)


@dataclass
class TokenLogprob:
    """Log-probability (natural log, of the model's distribution before sampling filters) of one token."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]      # top-k (token_id, logprob), most likely first


@dataclass
class RequestOutput:
    """What one engine step produced for one request.

    finish_reason: "stop" (stop string, stop token or EOS), "length" (max_new_tokens) or "abort".
    """

    request_id: str
    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[TokenLogprob] | None
    prompt_logprobs: list[TokenLogprob | None] | None   # only in the first output of the request
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int            # prompt tokens served from the prefix cache
    num_output_tokens: int            # so far
    # Speculative decoding counts so far (SpecStats.as_dict()); None when the engine does not speculate.
    speculative: dict | None = None
