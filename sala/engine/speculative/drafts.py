"""Draft proposers: n-gram prompt lookup (no extra model) and a small draft model with the same tokenizer."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import torch

logger = logging.getLogger(__name__)


class DraftState(Protocol):
    """One request's drafting state: `tokens` (prompt + output it has been told), told the tokens it generates
    (`extend`), proposes up to k next tokens after them (`propose`)."""

    tokens: list[int]

    def extend(self, ids: list[int]) -> None: ...

    def propose(self, k: int) -> list[int]: ...


class Drafter(Protocol):
    """Proposes up to k next tokens after `context` (prompt + output so far, the last token included; a list or
    a 1-D int64 CPU tensor); `start(prompt)` gives a request's incremental `DraftState`."""

    def propose(self, context: list[int] | torch.Tensor, k: int) -> list[int]: ...

    def start(self, prompt: list[int]) -> DraftState: ...


class NgramIndex:
    """Incremental prompt lookup over one growing context: for every n-gram (min_n <= n <= max_n) that is followed
    by a token, the position after its most recent occurrence. `propose(k)` matches the context's last n tokens
    (n from max_n down) and returns the k tokens after the most recent earlier occurrence, the copy continuing
    over its own drafts where it reaches the context's end (a repeating tail is drafted k tokens ahead): O(max_n)
    per proposal and per new token, so drafting at 1M tokens of context costs what it costs at 1K."""

    def __init__(self, max_n: int, min_n: int, tokens: list[int] | torch.Tensor = ()) -> None:
        self.max_n, self.min_n = max_n, min_n
        self.tokens: list[int] = []
        self.after: dict[tuple[int, ...], int] = {}
        self.extend(tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens))

    def extend(self, ids: list[int]) -> None:
        """Append ids and index every n-gram they give a follower: for each n, those starting at
        max(0, old - n) .. L - n - 1 (L, old: lengths after and before), in order, so that a later occurrence
        overwrites an earlier one. In bulk (C loops): a 64K-token prompt is indexed in tens of milliseconds."""
        t, old = self.tokens, len(self.tokens)
        t.extend(ids)
        L = len(t)
        for n in range(self.min_n, self.max_n + 1):
            s0 = max(0, old - n)
            grams = zip(*(t[s0 + j:L - n + j] for j in range(n)))
            self.after.update(zip(grams, range(s0 + n, L)))

    def propose(self, k: int) -> list[int]:
        t, L = self.tokens, len(self.tokens)
        if k < 1 or L < 2:
            return []
        for n in range(min(self.max_n, L - 1), self.min_n - 1, -1):
            pos = self.after.get(tuple(t[L - n:]))
            if pos is not None:
                if pos + k <= L:
                    return t[pos:pos + k]
                # The copy runs into the context's end: it goes on over its own drafts (an overlapping copy), so
                # a repeating tail (period L - pos) is drafted k tokens ahead, not just up to the end.
                period = L - pos
                return [t[pos + i % period] for i in range(k)]
        return []


class ContextDraftState:
    """A drafter that reads the whole context each time (a draft model): the request's tokens, kept growing."""

    def __init__(self, drafter: Drafter, prompt: list[int]) -> None:
        self.drafter = drafter
        self.tokens = list(prompt)

    def extend(self, ids: list[int]) -> None:
        self.tokens.extend(ids)

    def propose(self, k: int) -> list[int]:
        return self.drafter.propose(self.tokens, k)


class NgramDrafter:
    """Prompt lookup: find the most recent earlier occurrence of the context's last n tokens (n from max_n down
    to min_n) in the context itself and propose the (up to) k tokens that followed it. Copy-heavy work (quoting,
    extracting, answering from a document) repeats spans of the prompt, so these drafts are often right. A
    request keeps an `NgramIndex` (`start`), updated with each new token."""

    def __init__(self, max_n: int = 4, min_n: int = 1) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"ngram drafts: need 1 <= min_n <= max_n, got min_n {min_n}, max_n {max_n}")
        self.max_n, self.min_n = max_n, min_n

    def start(self, prompt: list[int]) -> NgramIndex:
        return NgramIndex(self.max_n, self.min_n, prompt)

    def propose(self, context: list[int] | torch.Tensor, k: int) -> list[int]:
        return NgramIndex(self.max_n, self.min_n, context).propose(k)


class ModelDrafter:
    """Greedy drafts from a causal LM with the target's tokenizer (a `sala` model directory or any
    transformers causal LM). The simplest exact version: every proposal runs the draft model over the whole
    context without a cache, so its cost grows with the context (fine for short contexts and tests; a cached
    draft would keep one cache per request and roll it back like the target's)."""

    def __init__(self, model: torch.nn.Module, vocab_size: int | None = None) -> None:
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.vocab_size = vocab_size

    @classmethod
    def from_dir(cls, path: str | Path, device: torch.device | str, dtype: torch.dtype | None = None,
                 target_vocab: int | None = None) -> ModelDrafter:
        p = Path(path)
        if not p.is_dir():
            raise FileNotFoundError(f"draft model: {str(p)!r} is not a directory")
        try:
            from sala.engine.loading import load_model_dir

            model = load_model_dir(str(p), device=torch.device(device), dtype=dtype)
        except Exception as e:  # noqa: BLE001 - not a sala checkpoint: any transformers causal LM
            logger.info("draft model %s is not a sala checkpoint (%s); loading it with transformers", p, e)
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(str(p), torch_dtype=dtype).to(device)
        vocab = getattr(model.config, "vocab_size", None)
        if target_vocab is not None and vocab is not None and vocab > target_vocab:
            raise ValueError(f"draft model {p}: its vocabulary ({vocab}) is larger than the target's "
                             f"({target_vocab}); it must share the target's tokenizer")
        return cls(model, vocab)

    def start(self, prompt: list[int]) -> ContextDraftState:
        return ContextDraftState(self, prompt)

    @torch.no_grad()
    def propose(self, context: list[int] | torch.Tensor, k: int) -> list[int]:
        ids = torch.as_tensor(context, dtype=torch.long).reshape(1, -1).to(self.device)
        out: list[int] = []
        for _ in range(k):
            logits = self.model(input_ids=ids).logits[0, -1]
            tok = int(torch.argmax(logits))
            out.append(tok)
            ids = torch.cat([ids, ids.new_tensor([[tok]])], dim=1)
        return out


def make_drafter(spec: str, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                 target_vocab: int | None = None) -> Drafter:
    """`ngram` (or `ngram:MAX_N`) -> NgramDrafter; `draft:DIR` -> ModelDrafter from that directory."""
    if spec == "ngram" or spec.startswith("ngram:"):
        max_n = int(spec.split(":", 1)[1]) if ":" in spec else 4
        return NgramDrafter(max_n=max_n)
    if spec.startswith("draft:") and len(spec) > len("draft:"):
        return ModelDrafter.from_dir(spec[len("draft:"):], device, dtype, target_vocab)
    raise ValueError(f"speculative: expected 'ngram', 'ngram:MAX_N' or 'draft:DIR', got {spec!r}")
