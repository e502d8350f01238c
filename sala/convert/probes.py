"""Cheap teacher-forced measurements for layer selection: general ability (held-out LM loss) and recall.

Recall is the teacher-forced accuracy on the answer tokens of retrieval prompts: RULER-style needle,
multi-key needle and variable tracking (`sala.eval.tasks`) when a tokenizer is available, else a
token-level associative-recall task (random key/value token pairs, then queries).
"""
from __future__ import annotations

import random

import torch

from sala.eval.heldout import LogitsFn  # int64 [B, T] -> fp32 logits [B, T, V]

RECALL_TASKS = ("niah_single", "niah_multikey", "vt")


class RecallProbe:
    """A fixed set of (ids [T], answer positions) whose answers the model must copy from its context."""

    def __init__(self, items: list[tuple[torch.Tensor, torch.Tensor]], kind: str) -> None:
        self.items, self.kind = items, kind

    @classmethod
    def from_tokenizer(cls, tokenizer, length: int, per_task: int, seed: int = 7) -> "RecallProbe":
        from sala.eval.tasks import generate

        items = []
        for task in RECALL_TASKS:
            for s in generate(task, length, per_task, tokenizer.count, seed=seed):
                prompt = tokenizer.encode(s.input, add_bos=True)
                answer = tokenizer.encode(s.answer)
                ids = torch.tensor(prompt + answer)
                items.append((ids, torch.arange(len(prompt), len(prompt) + len(answer))))
        return cls(items, "ruler:" + ",".join(RECALL_TASKS))

    @classmethod
    def associative(cls, vocab_size: int, length: int, num: int, seed: int = 7) -> "RecallProbe":
        """Key/value token pairs, then half of the keys queried again: the value after each query is the answer."""
        rng = random.Random(seed)
        lo = min(3, vocab_size // 4)
        half = (vocab_size - lo) // 2
        items = []
        for _ in range(num):
            pairs = max(2, length // 3)
            keys = rng.sample(range(lo, lo + half), min(pairs, half))
            values = [rng.randrange(lo + half, vocab_size) for _ in keys]
            ctx = [t for kv in zip(keys, values) for t in kv]
            q = rng.sample(range(len(keys)), max(1, (length - len(ctx)) // 2))
            ids = ctx + [t for j in q for t in (keys[j], values[j])]
            ids = ids[:length]
            pos = [len(ctx) + 2 * n + 1 for n in range(len(q)) if len(ctx) + 2 * n + 1 < len(ids)]
            items.append((torch.tensor(ids), torch.tensor(pos)))
        return cls(items, "associative-recall")

    @torch.no_grad()
    def accuracy(self, logits_fn: LogitsFn) -> float:
        """Fraction of answer tokens predicted (argmax) from the preceding context."""
        hits, total = 0, 0
        for ids, pos in self.items:
            if len(pos) == 0:
                continue
            logits = logits_fn(ids[None])[0]
            pred = logits[(pos - 1).to(logits.device)].argmax(-1).cpu()
            hits += int((pred == ids[pos]).sum())
            total += len(pos)
        return hits / max(total, 1)
