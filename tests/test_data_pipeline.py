"""Data pipeline: corpus readers, tokenizer, packed token files, windows, batching (CPU)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sala.data import (
    PackedDataset,
    PackedTokens,
    collate_windows,
    load_tokenizer,
    positions_from_starts,
    prepare,
    stdlib_corpus_files,
    window_starts,
)
from sala.data.corpus import iter_source_documents
from sala.data.packed import Window
from sala.modeling.tokenizer import shipped_tokenizer_path


def test_shipped_tokenizer_round_trip_and_size():
    path = shipped_tokenizer_path()
    assert path.stat().st_size < 1_000_000
    tok = load_tokenizer()
    assert 8000 <= tok.vocab_size <= 16384
    assert len({tok.bos_id, tok.eos_id, tok.pad_id}) == 3
    text = "def f(x):\n    return {'a': x * 2}  # ünïcode ✓\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text)  # BPE compresses code


def test_stdlib_corpus_is_present():
    files = stdlib_corpus_files()
    assert len(files) > 500
    assert all(f.suffix in (".py", ".txt", ".rst") for f in files)
    assert not any("site-packages" in str(f) for f in files)


def _docs(tmp_path, n=12):
    rng = np.random.default_rng(0)
    folder = tmp_path / "docs"
    folder.mkdir()
    texts = []
    for i in range(n):
        words = " ".join(f"w{int(x)}" for x in rng.integers(0, 50, size=int(rng.integers(20, 200))))
        texts.append(f"document {i}: {words}\n")
        (folder / f"doc{i:02d}.txt").write_text(texts[-1])
    return folder, texts


def test_prepare_round_trip(tmp_path, prepare_in):
    folder, texts = _docs(tmp_path)
    jsonl = tmp_path / "extra.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": f"json doc {i}"}) for i in range(3)) + "\n")
    out = tmp_path / "packed"
    prepare_in(tmp_path, "packed", [folder.name, jsonl.name], val_fraction=0.3, seed=3)
    tok = load_tokenizer(out / "tokenizer")
    got = []
    for split in ("train", "val"):
        pt = PackedTokens(out, split)
        assert pt.tokens.dtype == np.uint16
        for i in range(pt.num_docs):
            d = pt.document(i)
            assert d[0] == tok.bos_id and d[-1] == tok.eos_id
            got.append(tok.decode(d[1:-1].tolist()))
    # every document appears exactly once, in one split
    assert sorted(got) == sorted(texts + [f"json doc {i}" for i in range(3)])
    meta = json.loads((out / "meta.json").read_text())
    assert meta["splits"]["val"]["docs"] > 0 and meta["splits"]["train"]["docs"] > 0


def test_prepare_refuses_to_overwrite(tmp_path):
    folder, _ = _docs(tmp_path, 3)
    prepare(str(tmp_path / "p"), [str(folder)], log=lambda s: None)
    with pytest.raises(ValueError, match="other options .*seed: 0 -> 1.*--overwrite"):
        prepare(str(tmp_path / "p"), [str(folder)], seed=1, log=lambda s: None)


def test_bad_jsonl_names_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n{"txt": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        list(iter_source_documents(str(p)))


def test_aligned_windows_keep_short_documents_whole():
    offsets = np.array([0, 30, 50, 120, 130, 400, 420], dtype=np.int64)
    T = 64
    starts = window_starts(offsets, T, align_docs=True)
    # every document of <= T tokens lies completely inside some window (except in the final partial window)
    for a, b in zip(offsets[:-1], offsets[1:]):
        if b - a <= T and b <= offsets[-1] - T:
            assert any(s <= a and b <= s + T for s in starts), (a, b, starts)
    # every token is covered
    covered = np.zeros(offsets[-1], bool)
    for s in starts:
        covered[s:s + T] = True
    assert covered[: starts[-1] + T].all()
    plain = window_starts(offsets, T, align_docs=False)
    assert list(plain) == list(range(0, offsets[-1] - T + 1, T))


def test_dataset_order_is_seeded_and_epochs_differ(tmp_path):
    folder, _ = _docs(tmp_path, 30)
    prepare(str(tmp_path / "p"), [str(folder)], val_fraction=0.0, log=lambda s: None)
    a = PackedDataset(tmp_path / "p", "train", 32, seed=1)
    b = PackedDataset(tmp_path / "p", "train", 32, seed=1)
    n = len(a)
    assert n > 4
    first = [a.sample(k).tokens.tolist() for k in range(2 * n)]
    assert first == [b.sample(k).tokens.tolist() for k in range(2 * n)]
    assert sorted(map(tuple, first[:n])) == sorted(map(tuple, first[n:]))  # an epoch is a permutation
    assert first[:n] != first[n:]


def test_positions_and_labels_restart_per_document():
    w1 = Window(np.arange(10, 20), np.array([0, 4, 7]))
    w2 = Window(np.arange(30, 40), np.array([0]))
    assert positions_from_starts(w1.doc_starts, 10).tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 2]
    rows = collate_windows([w1, w2], "rows")
    assert rows["input_ids"].shape == (2, 10)
    assert rows["labels"][0].tolist() == [-100, 11, 12, 13, -100, 15, 16, -100, 18, 19]
    flat = collate_windows([w1, w2], "flat")
    assert flat["input_ids"].shape == (1, 20)
    assert flat["cu_seqlens"].tolist() == [0, 4, 7, 10, 20]
    assert flat["cu_seqlens"].dtype == torch.int32
    assert flat["labels"][0, 10].item() == -100  # the second window's first token is not predicted


def test_python_packages_source_reads_package_text(tmp_path):
    """`python-packages` walks the site-packages folders: *.py/*.md/*.rst/*.txt, sorted, caches skipped."""
    from sala.data.corpus import iter_python_packages_documents

    (tmp_path / "pkg" / "__pycache__").mkdir(parents=True)
    (tmp_path / "pkg" / "b.py").write_text("def f():\n    return 1\n" * 3)
    (tmp_path / "pkg" / "a.md").write_text("# Title\n\nSome documentation text.\n")
    (tmp_path / "pkg" / "__pycache__" / "b.py").write_text("stale cached text, never read" * 3)
    (tmp_path / "pkg" / "lib.so").write_bytes(b"\x00\x01binary")
    docs = list(iter_python_packages_documents([tmp_path]))
    assert [n for n, _ in docs] == ["pkg/a.md", "pkg/b.py"]
    assert docs[1][1].startswith("def f()")


def test_synthetic_documents_do_not_depend_on_worker_count(monkeypatch):
    """Parallel synthetic-sample generation gives the same documents, in the same order, as one process."""
    import importlib

    from sala.modeling.tokenizer import load_tokenizer

    P = importlib.import_module("sala.data.prepare")

    tok = load_tokenizer("sala")
    combos = [("niah_single", 200), ("vt", 300)]
    monkeypatch.setattr(P, "_cpus", lambda: 1)
    serial = [x.tolist() for x in P._synthetic_documents(tok, combos, 70, seed=5)]
    monkeypatch.setattr(P, "_cpus", lambda: 4)
    parallel = [x.tolist() for x in P._synthetic_documents(tok, combos, 70, seed=5)]
    assert len(serial) == 140 and serial == parallel
    assert all(ids[0] == tok.bos_id and ids[-1] == tok.eos_id and len(ids) <= 300 for ids in serial)
    # sample j's needle depth is its own seeded draw, whichever job makes it (a job draws only its samples')
    import random

    from sala.eval.tasks import generate

    depths = [random.Random(f"5/niah_single/200/{j}").random() for j in range(70)]
    expected = [[tok.bos_id] + tok.encode(x.training_text()) + [tok.eos_id]
                for x in generate("niah_single", 200 - P._DOC_SPECIAL_TOKENS, 70, tok.count, seed=5, depths=depths)]
    assert serial[:70] == expected


def test_corpus_encoding_in_workers_equals_one_batch(monkeypatch):
    """The corpus documents encoded by worker processes (shares of _SHARE_CHARS of text, ~1 MB; 16 KB here) are the
    tokenizer's own batch encoding, in order, with BOS and EOS, as arrays of the dataset's token dtype."""
    import importlib

    from sala.modeling.tokenizer import load_tokenizer

    P = importlib.import_module("sala.data.prepare")
    tok = load_tokenizer("sala")
    monkeypatch.setattr(P, "_SHARE_CHARS", 16 << 10)
    texts = [f"def f{i}(x):\n    return x * {i}  # doc {i}\n" * (1 + 300 * (i % 3 == 0)) for i in range(40)]
    texts[5] = ""   # an empty document is BOS + EOS
    monkeypatch.setattr(P, "_cpus", lambda: 3)
    parallel = P._encoded_documents(tok, texts)
    monkeypatch.setattr(P, "_cpus", lambda: 1)
    serial = P._encoded_documents(tok, texts)
    expected = [[tok.bos_id] + ids + [tok.eos_id] for ids in tok.encode_batch(texts)]
    assert sum(len(t) for t in texts) > 3 * P._SHARE_CHARS   # several shares
    assert [x.tolist() for x in parallel] == [x.tolist() for x in serial] == expected
    assert {x.dtype for x in parallel} == {P.token_dtype(tok.vocab_size)}
    assert parallel[5].tolist() == [tok.bos_id, tok.eos_id]


def test_prepare_refuses_synthetic_lengths_too_short_for_a_task_before_any_work(tmp_path, prepare_in):
    """A multi-key needle prompt does not fit 128 tokens: prepare says which task and length, before tokenizing
    the corpus and before any worker starts, and writes nothing."""
    from sala.data.prepare import SyntheticMix

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("some text " * 50)
    with pytest.raises(ValueError, match=r"niah_multikey at 128 tokens.*prompt alone needs") as err:
        prepare_in(tmp_path, "packed", ["docs"], tokenizer="sala",
                   synthetic=SyntheticMix(fraction=0.5, tasks=("niah_single", "niah_multikey"), lengths=(128, 512)))
    assert "niah_single" not in str(err.value) and "512" not in str(err.value)
    assert not (tmp_path / "packed").exists()
