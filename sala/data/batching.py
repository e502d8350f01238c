"""Turning packed windows into model inputs that keep documents apart.

Two layouts of the same micro-batch of B windows of T tokens:

- rows (dense baselines such as Llama): `input_ids` [B, T], `position_ids` [B, T] restarting at 0 at
  every document start; transformers then builds a block-diagonal causal mask from the position ids.
- flat (SALA): `input_ids` [1, B·T] and `cu_seqlens` int32 [N + 1], the boundaries of every document
  of every window (window ends are boundaries too); the model restarts positions per document.

In both, `labels` is -100 at each document start so that no token is predicted from another
document (transformers shifts labels inside the loss).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from sala.data.packed import Window

IGNORE_INDEX = -100


def positions_from_starts(doc_starts: np.ndarray, length: int) -> np.ndarray:
    """int64 [length]: offset of each position from the start of its document."""
    seg = np.zeros(length, dtype=np.int64)
    seg[doc_starts[doc_starts > 0]] = 1
    seg = np.cumsum(seg)
    starts = np.asarray(sorted(set(int(s) for s in doc_starts) | {0}), dtype=np.int64)
    return np.arange(length, dtype=np.int64) - starts[seg]


def collate_windows(windows: Sequence[Window], layout: str = "rows") -> dict[str, torch.Tensor]:
    """Model inputs for a micro-batch (see module docstring). `layout` is "rows" or "flat"."""
    if not windows:
        raise ValueError("collate_windows: empty micro-batch")
    T = len(windows[0].tokens)
    for w in windows:
        if len(w.tokens) != T:
            raise ValueError(f"collate_windows: windows have different lengths {len(w.tokens)} and {T}")
    ids = np.stack([w.tokens for w in windows])
    labels = ids.copy()
    pos = np.stack([positions_from_starts(w.doc_starts, T) for w in windows])
    labels[pos == 0] = IGNORE_INDEX
    out = {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels)}
    if layout == "rows":
        out["position_ids"] = torch.from_numpy(pos)
    elif layout == "flat":
        bounds = [0]
        for b, w in enumerate(windows):
            bounds.extend(int(b * T + s) for s in w.doc_starts if s > 0)
            bounds.append((b + 1) * T)
        out["input_ids"] = out["input_ids"].reshape(1, -1)
        out["labels"] = out["labels"].reshape(1, -1)
        out["position_ids"] = torch.from_numpy(pos.reshape(1, -1))
        out["cu_seqlens"] = torch.tensor(bounds, dtype=torch.int32)
    else:
        raise ValueError(f"collate_windows: layout must be 'rows' or 'flat', got {layout!r}")
    return out


def num_loss_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that contribute to the loss after the internal shift (labels[:, 1:] != -100)."""
    return int((batch["labels"][..., 1:] != IGNORE_INDEX).sum())
