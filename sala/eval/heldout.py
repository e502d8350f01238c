"""Held-out language-modelling loss: mean next-token cross-entropy (nats/token) of models on the same
evenly spaced windows of a packed dataset's held-out split.

    from sala.eval.heldout import heldout_windows, heldout_loss
    windows = heldout_windows("train_data/stdlib-bpe8k-synth", num=24, seq_len=2048)   # int64 [24, 2048]
    loss = heldout_loss(lambda ids: model(input_ids=ids, use_cache=False).logits, windows)
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def windows_of(tokens, num: int, seq_len: int, where: str = "held-out split") -> torch.Tensor:
    """int64 [num', seq_len], num' = min(num, len(tokens) // seq_len) evenly spaced windows of a token array."""
    n = min(num, len(tokens) // seq_len)
    if n == 0:
        raise ValueError(f"{where} has {len(tokens)} tokens, fewer than seq_len={seq_len}")
    step = len(tokens) // n
    return torch.from_numpy(np.stack([np.asarray(tokens[i * step:i * step + seq_len], dtype=np.int64)
                                      for i in range(n)]))


def heldout_windows(data: str | Path, num: int, seq_len: int, split: str = "val") -> torch.Tensor:
    """Evenly spaced windows [num', seq_len] of split `split` of the packed dataset folder `data`."""
    from sala.data.packed import PackedTokens, read_meta

    meta = read_meta(data)
    if split not in meta["splits"]:
        raise ValueError(f"data {data}: no split {split!r} (it has {', '.join(meta['splits'])})")
    return windows_of(PackedTokens(data, split).tokens, num, seq_len, where=f"data {data}: split {split!r}")


@torch.no_grad()
def heldout_loss(logits_fn: LogitsFn, windows: torch.Tensor, batch: int = 4) -> float:
    """Mean next-token cross-entropy (nats) over windows [N, T] (logits_fn: ids [b, T] -> logits [b, T, V])."""
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        logits = logits_fn(windows[i:i + batch])[:, :-1].float()
        ids = windows[i:i + batch].to(logits.device)
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
        count += ids[:, 1:].numel()
    return total / count


def model_heldout_loss(model: torch.nn.Module, windows: torch.Tensor, batch: int = 4) -> float:
    """`heldout_loss` of a causal LM (a SALA or transformers model); refuses token ids beyond its vocabulary."""
    vocab = model.config.vocab_size
    top = int(windows.max()) if windows.numel() else 0
    if top >= vocab:
        raise ValueError(f"the data holds token id {top} but the model's vocabulary has {vocab} tokens: "
                         "tokenize the data with the model's tokenizer")
    dev = next(model.parameters()).device
    model.eval()
    return heldout_loss(lambda ids: model(input_ids=ids.to(dev), use_cache=False).logits, windows, batch)
