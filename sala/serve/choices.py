"""Engine RequestOutputs -> OpenAI choices, deltas, log-probabilities and usage.

One `Choice` accumulates the outputs of one engine request (one prompt x one of `n` samples). Log-probabilities
come in the shapes clients parse: the legacy completions object {tokens, token_logprobs, top_logprobs,
text_offset} (prompt tokens first with `echo`, the first prompt token without a log-probability), and the chat
object {"content": [{token, logprob, bytes, top_logprobs}]}.
"""
from __future__ import annotations

from dataclasses import dataclass, field


class TokenText:
    """Token id -> its text, cached: `__call__` shows special tokens (log-probability entries name them),
    `visible` is what the response text holds for it (special tokens skipped; text offsets count this)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._shown: dict[int, str] = {}
        self._visible: dict[int, str] = {}

    def _decode(self, token_id: int, skip_special: bool) -> str:
        if self.tokenizer is None:
            return "" if skip_special else f"<{token_id}>"
        return self.tokenizer.decode([token_id], skip_special_tokens=skip_special)

    def __call__(self, token_id: int) -> str:
        s = self._shown.get(token_id)
        if s is None:
            s = self._shown[token_id] = self._decode(token_id, False)
        return s

    def visible(self, token_id: int) -> str:
        s = self._visible.get(token_id)
        if s is None:
            s = self._visible[token_id] = self._decode(token_id, True)
        return s


@dataclass
class Choice:
    """The state of one choice. `discard_output`: max_tokens=0 (one token is generated and dropped, so that
    echo + logprobs of the prompt alone can be served)."""

    index: int
    prompt_index: int
    prompt_ids: list[int]
    prompt_text: str | None = None
    discard_output: bool = False
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list = field(default_factory=list)             # TokenLogprob per generated token
    prompt_logprobs: list | None = None                       # TokenLogprob | None per prompt token
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    finished: bool = False
    speculative: dict | None = None                           # the engine's SpecStats of this choice

    def add(self, out) -> tuple[str, list]:
        """Take one RequestOutput; returns (new text, new TokenLogprobs) to stream."""
        self.num_prompt_tokens = out.num_prompt_tokens
        self.num_cached_tokens = out.num_cached_tokens
        if getattr(out, "speculative", None) is not None:
            self.speculative = out.speculative
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = list(out.prompt_logprobs)
        if out.finished:
            self.finished = True
            self.finish_reason = "length" if self.discard_output else (out.finish_reason or "stop")
        if self.discard_output:
            return "", []
        self.token_ids.extend(out.new_token_ids)
        self.text += out.new_text
        new_lp = list(out.new_logprobs or [])
        self.logprobs.extend(new_lp)
        return out.new_text, new_lp

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids)


def usage(choices: list[Choice]) -> dict:
    """OpenAI usage: prompt tokens counted once per prompt (the first choice of each), completion tokens of all."""
    firsts: dict[int, Choice] = {}
    for c in choices:
        firsts.setdefault(c.prompt_index, c)
    prompt = sum(c.num_prompt_tokens for c in firsts.values())
    cached = sum(c.num_cached_tokens for c in firsts.values())
    completion = sum(c.num_output_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def speculative_stats(choices: list[Choice]) -> dict | None:
    """Speculative-decoding counts over all choices (draft and accepted tokens, verify steps, acceptance rate,
    tokens per verify step), or None when the engine does not speculate. An extra response field: OpenAI clients
    ignore it."""
    stats = [c.speculative for c in choices if c.speculative is not None]
    if not stats:
        return None
    drafted = sum(s["draft_tokens"] for s in stats)
    accepted = sum(s["accepted_tokens"] for s in stats)
    steps = sum(s["verify_steps"] for s in stats)
    return {"draft_tokens": drafted, "accepted_tokens": accepted, "verify_steps": steps,
            "acceptance_rate": accepted / drafted if drafted else 0.0,
            "mean_accepted_length": (accepted + steps) / steps if steps else 0.0}


def completion_logprobs(token_text: TokenText, entries: list, token_ids: list[int], start_offset: int = 0
                        ) -> dict:
    """The legacy completions logprobs object for tokens `token_ids` with TokenLogprob-or-None `entries`."""
    tokens, token_lps, tops, offsets = [], [], [], []
    offset = start_offset
    for tid, entry in zip(token_ids, entries):
        s = token_text(tid)
        tokens.append(s)
        offsets.append(offset)
        offset += len(token_text.visible(tid))
        if entry is None:
            token_lps.append(None)
            tops.append(None)
            continue
        token_lps.append(float(entry.logprob))
        top = {}
        for t, lp in entry.top:
            top.setdefault(token_text(t), float(lp))
        top.setdefault(s, float(entry.logprob))
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(token_text: TokenText, entries: list, top_n: int) -> dict:
    """The chat logprobs object {"content": [...]} for TokenLogprob `entries`."""
    content = []
    for e in entries:
        s = token_text(e.token_id)
        content.append({"token": s, "logprob": float(e.logprob), "bytes": list(s.encode("utf-8")),
                        "top_logprobs": [{"token": token_text(t), "logprob": float(lp),
                                          "bytes": list(token_text(t).encode("utf-8"))} for t, lp in e.top[:top_n]]})
    return {"content": content}
