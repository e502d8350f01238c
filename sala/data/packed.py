"""Memory-mapped packed token files and the fixed-length training windows read from them.

On disk, a packed dataset is a folder:

- `meta.json`: format, token dtype, vocabulary size, tokenizer, BOS/EOS ids, token and document
  counts per split, the sources it was made from;
- `{split}.bin`: all tokens of the split back to back (uint16 when the vocabulary fits, else uint32);
- `{split}.docs.npy`: int64 [num_docs + 1] document start offsets into `{split}.bin` (last = total).

Each document is stored as `[BOS] + tokens + [EOS]`.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

FORMAT = "sala-packed-v1"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in 16 bits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


class PackedWriter:
    """Writes the splits of one packed dataset into a temporary folder, renamed into place by `close()`.

    Usage: `w = PackedWriter(out, vocab_size, ...); w.add("train", ids); ...; w.close(extra_meta)`.
    """

    def __init__(self, out_dir: str | os.PathLike, vocab_size: int, bos_id: int | None, eos_id: int | None,
                 overwrite: bool = False):
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not overwrite:
            raise FileExistsError(f"{self.out_dir} already exists (pass overwrite=True / --overwrite)")
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=".tmp-" + self.out_dir.name + "-", dir=self.out_dir.parent))
        self.vocab_size = vocab_size
        self.dtype = token_dtype(vocab_size)
        self.bos_id, self.eos_id = bos_id, eos_id
        self._files: dict[str, object] = {}
        self._offsets: dict[str, list[int]] = {}

    def add(self, split: str, ids: Iterable[int]) -> int:
        """Append one document (already including BOS/EOS if wanted) to `split`; returns its length."""
        arr = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64)
        if arr.size == 0:
            return 0
        if arr.min() < 0 or arr.max() >= self.vocab_size:
            raise ValueError(f"token id out of range [0, {self.vocab_size}): min {arr.min()}, max {arr.max()}")
        if split not in self._files:
            self._files[split] = open(self.tmp / f"{split}.bin", "wb")
            self._offsets[split] = [0]
        arr.astype(self.dtype).tofile(self._files[split])
        self._offsets[split].append(self._offsets[split][-1] + int(arr.size))
        return int(arr.size)

    def close(self, extra_meta: dict | None = None) -> Path:
        """Finish all splits, write meta.json and move the folder into place atomically."""
        splits = {}
        for split, f in self._files.items():
            f.close()
            offs = np.asarray(self._offsets[split], dtype=np.int64)
            np.save(self.tmp / f"{split}.docs.npy", offs)
            splits[split] = {"tokens": int(offs[-1]), "docs": int(len(offs) - 1)}
        meta = {"format": FORMAT, "dtype": self.dtype.name, "vocab_size": self.vocab_size,
                "bos_id": self.bos_id, "eos_id": self.eos_id, "splits": splits}
        meta.update(extra_meta or {})
        (self.tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        os.chmod(self.tmp, 0o755)  # mkdtemp makes it private
        if self.out_dir.exists():
            shutil.rmtree(self.out_dir)
        os.replace(self.tmp, self.out_dir)
        return self.out_dir

    def abort(self) -> None:
        for f in self._files.values():
            f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def read_meta(path: str | os.PathLike) -> dict:
    """meta.json of a packed dataset folder, with a clear error when the folder is not one."""
    p = Path(path) / "meta.json"
    if not p.is_file():
        raise FileNotFoundError(f"{path} is not a packed dataset (no meta.json; make one with `sala data prepare`)")
    meta = json.loads(p.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown packed format {meta.get('format')!r} (expected {FORMAT!r})")
    return meta


class PackedTokens:
    """Read-only memory map of one split: `tokens` (uint16/uint32 [N]) and `doc_offsets` (int64 [D + 1])."""

    def __init__(self, path: str | os.PathLike, split: str = "train"):
        self.path = Path(path)
        self.meta = read_meta(path)
        if split not in self.meta["splits"]:
            raise ValueError(f"{path}: no split {split!r} (has {sorted(self.meta['splits'])})")
        self.split = split
        n = self.meta["splits"][split]["tokens"]
        self.tokens = np.memmap(self.path / f"{split}.bin", dtype=np.dtype(self.meta["dtype"]), mode="r", shape=(n,))
        self.doc_offsets = np.load(self.path / f"{split}.docs.npy")

    @property
    def num_tokens(self) -> int:
        return int(self.doc_offsets[-1])

    @property
    def num_docs(self) -> int:
        return int(len(self.doc_offsets) - 1)

    def document(self, i: int) -> np.ndarray:
        """Tokens of document `i` (int64)."""
        return np.asarray(self.tokens[self.doc_offsets[i]:self.doc_offsets[i + 1]], dtype=np.int64)


@dataclass
class Window:
    """One training sequence: `tokens` int64 [T]; `doc_starts` sorted positions in [0, T) where a
    document (or a piece of one) begins, always including 0."""

    tokens: np.ndarray
    doc_starts: np.ndarray


def window_starts(doc_offsets: np.ndarray, seq_len: int, align_docs: bool) -> np.ndarray:
    """Start offsets of the fixed-length windows cut from a split.

    Without `align_docs`, windows tile the token stream: 0, T, 2T, ... With `align_docs`, a document
    that would straddle a window's end is moved whole into the next window (its head still fills the
    current window's tail as context-free filler), so every document of at most T tokens appears
    complete in some window; longer documents are cut into T-token pieces.
    """
    total = int(doc_offsets[-1])
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    if not align_docs:
        return np.arange(0, total - seq_len + 1, seq_len, dtype=np.int64)
    starts = []
    pos = 0
    while pos + seq_len <= total:
        starts.append(pos)
        end = pos + seq_len
        # last document start inside (pos, end]
        j = int(np.searchsorted(doc_offsets, end, side="right")) - 1
        d = int(doc_offsets[j])
        if d == end or d <= pos:
            pos = end  # boundary coincides, or one long document covers the whole window
        else:
            pos = d  # document d straddles the end: start the next window with it
    return np.asarray(starts, dtype=np.int64)


class PackedDataset:
    """Fixed-length windows of a packed split, in a seeded shuffled order that repeats per epoch.

    `sample(k)` returns the k-th window of the endless stream epoch 0, epoch 1, ...; the trainer's data
    position is just k, which makes resuming exact. On several ranks, rank r reads k = step·world + r.
    """

    def __init__(self, path: str | os.PathLike, split: str = "train", seq_len: int = 2048,
                 align_docs: bool = True, shuffle: bool = True, seed: int = 0):
        self.data = PackedTokens(path, split)
        self.seq_len = int(seq_len)
        self.starts = window_starts(self.data.doc_offsets, self.seq_len, align_docs)
        if len(self.starts) == 0:
            raise ValueError(f"{path} split {split!r} has {self.data.num_tokens} tokens: fewer than one window "
                             f"of seq_len={seq_len}")
        self.shuffle, self.seed = shuffle, seed
        self._perm_epoch, self._perm = -1, None

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def meta(self) -> dict:
        return self.data.meta

    def window(self, i: int) -> Window:
        """Window number `i` in file order."""
        s = int(self.starts[i])
        T = self.seq_len
        toks = np.asarray(self.data.tokens[s:s + T], dtype=np.int64)
        offs = self.data.doc_offsets
        lo = int(np.searchsorted(offs, s, side="right"))
        hi = int(np.searchsorted(offs, s + T, side="left"))
        inner = offs[lo:hi] - s
        doc_starts = np.concatenate([[0], inner]).astype(np.int64)
        return Window(toks, doc_starts)

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            n = len(self.starts)
            if self.shuffle:
                self._perm = np.random.default_rng([self.seed, epoch]).permutation(n)
            else:
                self._perm = np.arange(n)
            self._perm_epoch = epoch
        return self._perm

    def sample(self, k: int) -> Window:
        """The k-th window of the endless shuffled stream."""
        n = len(self.starts)
        return self.window(int(self._order(k // n)[k % n]))
