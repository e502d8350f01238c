"""Token windows for conversion: training batches and held-out windows from a packed dataset folder
(`sala data prepare` output: meta.json, train.bin, val.bin), or from a synthetic random stream."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class TokenSource:
    """Windows of `seq_len` token ids cut at random (training) or evenly spaced (held-out) offsets.

    `path=None` gives uniformly random tokens (tests and dry runs only: nothing to learn but the teacher).
    """

    def __init__(self, path: str | Path | None, vocab_size: int, seed: int = 0) -> None:
        self.vocab_size = vocab_size
        self.rng = np.random.default_rng(seed)
        self.path = Path(path) if path is not None else None
        self.tokenizer_dir: Path | None = None
        if self.path is None:
            self.train = self.val = None
            return
        from sala.data.packed import PackedTokens, read_meta

        meta = read_meta(self.path)
        if meta.get("vocab_size", 0) > vocab_size:
            raise ValueError(f"data {self.path}: its tokenizer has {meta['vocab_size']} tokens but the teacher's "
                             f"vocabulary has only {vocab_size}; tokenize the data with the teacher's tokenizer")
        self.train = PackedTokens(self.path, "train")
        self.val = PackedTokens(self.path, "val") if "val" in meta["splits"] else self.train
        if (self.path / "tokenizer").is_dir():
            self.tokenizer_dir = self.path / "tokenizer"

    def _stream(self, split: str):
        return self.train.tokens if split == "train" else self.val.tokens   # type: ignore[union-attr]

    def train_batch(self, batch: int, seq_len: int, doc_start_share: float = 0.0) -> torch.Tensor:
        """int64 [batch, seq_len] from random offsets of the training split.

        `doc_start_share` in [0, 1]: that share of the rows (rounded) starts at a random document start instead, so
        a document no longer than `seq_len` (a synthetic retrieval sample) is seen whole, question and answer included.
        """
        if not 0.0 <= doc_start_share <= 1.0:
            raise ValueError(f"doc_start_share must be in [0, 1], got {doc_start_share}")
        if self.train is None:
            return torch.from_numpy(self.rng.integers(0, self.vocab_size, (batch, seq_len)))
        toks = self._stream("train")
        if len(toks) < seq_len + 1:
            raise ValueError(f"data {self.path}: training split has {len(toks)} tokens, fewer than seq_len={seq_len}")
        starts = self.rng.integers(0, len(toks) - seq_len, batch)
        n_doc = int(round(doc_start_share * batch))
        if n_doc:
            offs = self.train.doc_offsets[:-1]   # type: ignore[union-attr]
            offs = offs[offs <= len(toks) - seq_len]
            if len(offs):
                starts[:n_doc] = offs[self.rng.integers(0, len(offs), n_doc)]
        return torch.from_numpy(np.stack([np.asarray(toks[s:s + seq_len], dtype=np.int64) for s in starts]))

    def heldout(self, num: int, seq_len: int) -> torch.Tensor:
        """int64 [num', seq_len], num' <= num evenly spaced windows of the held-out split (deterministic)."""
        if self.val is None:
            g = np.random.default_rng(12345)
            return torch.from_numpy(g.integers(0, self.vocab_size, (num, seq_len)))
        from sala.eval.heldout import windows_of

        return windows_of(self._stream("val"), num, seq_len, where=f"data {self.path}: held-out split")
