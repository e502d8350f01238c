"""Draft proposers: n-gram prompt lookup (no extra model) and a small draft model with the same tokenizer."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import torch

logger = logging.getLogger(__name__)


class Drafter(Protocol):
    """Proposes up to k next tokens after `context` (prompt + output so far, the last token included; a list or
    a 1-D int64 CPU tensor)."""

    def propose(self, context: list[int] | torch.Tensor, k: int) -> list[int]: ...


class NgramDrafter:
    """Prompt lookup: find the most recent earlier occurrence of the context's last n tokens (n from max_n down
    to min_n) in the context itself and propose the (up to) k tokens that followed it. Copy-heavy work (quoting,
    extracting, answering from a document) repeats spans of the prompt, so these drafts are often right."""

    def __init__(self, max_n: int = 4, min_n: int = 1) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"ngram drafts: need 1 <= min_n <= max_n, got min_n {min_n}, max_n {max_n}")
        self.max_n, self.min_n = max_n, min_n

    def propose(self, context: list[int] | torch.Tensor, k: int) -> list[int]:
        L = len(context)
        if k < 1 or L < 2:
            return []
        t = context if isinstance(context, torch.Tensor) else torch.tensor(context, dtype=torch.long)
        for n in range(min(self.max_n, L - 1), self.min_n - 1, -1):
            tail = t[L - n:]
            # Windows starting at 0 .. L-n-1 (the tail itself excluded); the match must be followed by a token.
            win = t[:L - 1].unfold(0, n, 1) if L - 1 >= n else None
            if win is None or win.shape[0] == 0:
                continue
            hits = torch.nonzero((win == tail).all(dim=1))[:, 0]
            if hits.numel():
                start = int(hits[-1]) + n            # the most recent match
                return t[start:start + k].tolist()
        return []


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
