"""OpenAI request fields -> token ids, limits checked, engine Requests and SamplingParams.

Text prompts are encoded with the model's BOS first (as `sala generate` does); token-id prompts are used as given.
Every problem is an APIError(400) naming the field and the numbers, raised before anything reaches the engine.
"""
from __future__ import annotations

from dataclasses import dataclass

from sala.serve.protocol import APIError


@dataclass
class PromptInput:
    """One prompt: its token ids and, when it came as text, the text (echo returns it verbatim)."""

    ids: list[int]
    text: str | None = None


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of a text prompt with the BOS token first (unless the text already starts with it)."""
    bos = getattr(tokenizer, "bos_id", None)
    ids = tokenizer.encode(text)
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    return ids


def completion_prompts(prompt, tokenizer, vocab_size: int) -> list[PromptInput]:
    """The prompts of a /v1/completions body: a string, a list of strings, token ids, or a list of token-id lists."""
    if isinstance(prompt, str) or isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        items = [prompt]
    else:
        items = list(prompt)
    if not items:
        raise APIError("prompt is empty: give a string, a list of strings, token ids or lists of token ids",
                       param="prompt")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            if tokenizer is None:
                raise APIError("this model has no tokenizer: send the prompt as token ids", param="prompt")
            out.append(PromptInput(encode_text(tokenizer, item), item))
        else:
            ids = [int(t) for t in item]
            if not ids:
                raise APIError(f"prompt {i} has no tokens", param="prompt")
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise APIError(f"prompt {i}: token id {bad[0]} is outside the vocabulary [0, {vocab_size})",
                               param="prompt")
            out.append(PromptInput(ids, None))
    return out


def check_length(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int, index: int | None = None
                 ) -> int:
    """The number of tokens to generate (max_tokens, or all that fit when None), after checking that prompt +
    output fit the model length; APIError(400) with both numbers otherwise."""
    which = "" if index is None else f" (prompt {index})"
    if num_prompt_tokens >= max_model_len:
        raise APIError(f"the prompt{which} has {num_prompt_tokens} tokens, more than this server's maximum context "
                       f"length of {max_model_len} tokens allows (prompt + at least 1 generated token)",
                       param="prompt", code="context_length_exceeded")
    if max_tokens is None:
        return max_model_len - num_prompt_tokens
    if num_prompt_tokens + max_tokens > max_model_len:
        raise APIError(f"this server's maximum context length is {max_model_len} tokens, but {num_prompt_tokens} "
                       f"prompt tokens{which} + max_tokens {max_tokens} = {num_prompt_tokens + max_tokens}",
                       param="max_tokens", code="context_length_exceeded")
    return max_tokens


def sampling_params(body, max_new_tokens: int, choice: int):
    """SamplingParams for one choice; seeds differ per choice (seed + choice) so that n > 1 samples differ."""
    from sala.engine.sampling import SamplingParams

    seed = None if body.seed is None else (body.seed + choice) % 2**63
    try:
        return SamplingParams(max_new_tokens=max(1, max_new_tokens), temperature=float(body.temperature),
                              top_k=max(0, int(body.top_k)), top_p=float(body.top_p), stop=list(body.stop or []),
                              stop_token_ids=list(body.stop_token_ids or []), ignore_eos=bool(body.ignore_eos),
                              seed=seed)
    except ValueError as e:
        raise APIError(str(e)) from None
