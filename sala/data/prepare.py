"""`sala data prepare`: documents -> tokens -> a packed, memory-mapped dataset with a held-out split.

The held-out split is chosen per document (a seeded hash of the document's name), so no document is
in both splits. Synthetic RULER-style samples (`sala.data.synthetic`) can be mixed into the training
split as extra documents, to teach retrieval over long contexts.
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from sala.data.corpus import iter_source_documents
from sala.data.packed import PackedWriter, token_dtype
from sala.modeling.tokenizer import TextTokenizer, load_tokenizer
from sala.utils.errors import ResumeMismatchError, UsageError, check_writable_dir, disk_full_error, is_disk_full
from sala.utils.progress import progress

logger = logging.getLogger(__name__)


@dataclass
class SyntheticMix:
    """Synthetic retrieval documents mixed into the training split.

    `fraction` is their share of the training tokens; samples are spread evenly over `tasks` x
    `lengths` (prompt + answer lengths in tokens).
    """

    fraction: float = 0.0
    tasks: tuple[str, ...] = ("niah_single", "niah_multikey", "niah_multivalue", "vt")
    lengths: tuple[int, ...] = (512, 1024, 2048)
    seed: int = 1234


@dataclass
class PrepareReport:
    out_dir: str
    splits: dict = field(default_factory=dict)
    seconds: float = 0.0


def in_heldout(name: str, val_fraction: float, seed: int) -> bool:
    """Whether document `name` belongs to the held-out split (stable under reordering of the sources)."""
    h = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(h[:8], "little") / 2**64 < val_fraction


def prepare(out_dir: str, sources: list[str], tokenizer: TextTokenizer | str | None = None,
            val_fraction: float = 0.02, seed: int = 0, synthetic: SyntheticMix | None = None,
            max_docs: int | None = None, overwrite: bool = False,
            log: Callable[[str], None] | None = None, show_progress: bool = True) -> PrepareReport:
    """Tokenize `sources` (see `sala.data.corpus.iter_source_documents`) into a packed dataset at `out_dir`.

    Each document becomes `[BOS] + tokens + [EOS]`. Training documents (corpus and synthetic) are
    written in a seeded random order; the held-out split keeps the corpus order.

    meta.json records the options that define the dataset (`options`): a folder that already holds a dataset
    made with the same options is reused as it is; with other options the call refuses, listing them, unless
    `overwrite` (the old dataset is replaced only once the new one is complete). `max_docs`: None for all
    documents, else at least 1.
    """
    log = log or logger.info
    t0 = time.time()
    if not 0.0 <= val_fraction < 1.0:
        raise UsageError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if max_docs is not None and max_docs < 1:
        raise UsageError(f"--max-docs must be >= 1 (got {max_docs}); leave it out to use every document")
    out_path = Path(out_dir)
    if out_path.exists() and not out_path.is_dir():
        raise UsageError(f"{out_path} exists and is a file: the output of `data prepare` is a folder")
    check_writable_dir(out_path.parent if out_path.parent != Path("") else Path("."),
                       f"the folder of the output {out_path},")
    tok = tokenizer if isinstance(tokenizer, TextTokenizer) else load_tokenizer(tokenizer)
    if tok.bos_id is None or tok.eos_id is None:
        raise ValueError(f"tokenizer {tok.source!r} has no BOS or EOS token; packed documents need both")
    options = dataset_options(sources, tok, val_fraction, seed, synthetic, max_docs)
    existing = _existing_dataset(out_path, options, overwrite)
    if existing is not None:
        log(f"{out_path} already holds this dataset (same options): nothing to do; pass --overwrite to rebuild it")
        return existing
    if synthetic is not None and synthetic.fraction > 0:
        _check_synthetic_fits(tok, synthetic)
    docs: dict[str, list[tuple[str, str]]] = {"train": [], "val": []}
    with progress(desc="reading documents", unit="doc", enabled=show_progress) as bar:
        for source in sources:
            for name, text in iter_source_documents(source):
                split = "val" if in_heldout(f"{source}/{name}", val_fraction, seed) else "train"
                docs[split].append((f"{source}/{name}", text))
                bar.update(1)
                if max_docs is not None and sum(map(len, docs.values())) >= max_docs:
                    break
            if max_docs is not None and sum(map(len, docs.values())) >= max_docs:
                break
    if not docs["train"]:
        raise ValueError(f"no training documents found in sources {sources}")
    log(f"documents: {len(docs['train'])} train, {len(docs['val'])} held-out")

    encoded = {split: _encoded_documents(tok, [t for _, t in items], f"tokenizing {split}", show_progress)
               for split, items in docs.items()}
    n_train = sum(map(len, encoded["train"]))

    synth_docs: list[np.ndarray] = []
    synth_tokens = 0
    if synthetic is not None and synthetic.fraction > 0:
        if not 0 < synthetic.fraction < 1:
            raise ValueError(f"synthetic fraction must be in (0, 1), got {synthetic.fraction}")
        target = synthetic.fraction / (1 - synthetic.fraction) * n_train
        combos = [(t, L) for t in synthetic.tasks for L in synthetic.lengths]
        per_combo = max(1, round(target / sum(L for _, L in combos)))
        for ids in _synthetic_documents(tok, combos, per_combo, synthetic.seed, show_progress):
            synth_docs.append(ids)
            synth_tokens += len(ids)
        log(f"synthetic: {len(synth_docs)} documents, {synth_tokens} tokens "
            f"({100 * synth_tokens / (synth_tokens + n_train):.1f}% of training tokens)")

    train = encoded["train"] + synth_docs
    random.Random(seed).shuffle(train)
    writer = PackedWriter(out_dir, tok.vocab_size, tok.bos_id, tok.eos_id, overwrite=True)
    writing = Path(writer.tmp)
    try:
        with progress(len(train) + len(encoded["val"]), desc="writing", unit="doc", enabled=show_progress) as bar:
            for split, items in (("train", train), ("val", encoded["val"])):
                writing = Path(writer.tmp) / f"{split}.bin"
                for ids in items:
                    writer.add(split, ids)
                    bar.update(1)
        writing = Path(writer.tmp) / "tokenizer"
        tok.save(writing)
        writing = Path(writer.tmp) / "meta.json"
        meta = {"options": options, "tokenizer": tok.source, "tokenizer_fingerprint": tok.fingerprint(),
                "sources": list(sources),
                "val_fraction": val_fraction, "seed": seed,
                "synthetic": None if not synth_docs else {
                    "fraction": synthetic.fraction, "tasks": list(synthetic.tasks),
                    "lengths": list(synthetic.lengths), "seed": synthetic.seed,
                    "docs": len(synth_docs), "tokens": synth_tokens}}
        out = writer.close(meta)
    except BaseException as e:
        writer.abort()
        if isinstance(e, (OSError, ValueError, RuntimeError)) and is_disk_full(e):
            raise disk_full_error(writing, e) from None
        raise
    report = PrepareReport(str(out), {s: {"docs": len(v), "tokens": sum(map(len, v))}
                                      for s, v in (("train", train), ("val", encoded["val"]))},
                           time.time() - t0)
    log(f"wrote {out}: train {report.splits['train']['tokens']} tokens, val {report.splits['val']['tokens']} tokens "
        f"in {report.seconds:.1f}s")
    return report


def dataset_options(sources: list[str], tok: TextTokenizer, val_fraction: float, seed: int,
                    synthetic: SyntheticMix | None, max_docs: int | None) -> dict:
    """The options that define a prepared dataset (stored in meta.json as "options"; JSON-ready)."""
    synth = None
    if synthetic is not None and synthetic.fraction > 0:
        synth = {"fraction": synthetic.fraction, "tasks": list(synthetic.tasks), "lengths": list(synthetic.lengths),
                 "seed": synthetic.seed}
    return {"sources": [s if s in ("stdlib", "python-packages") or not os.path.exists(s.split(":")[0])
                        else os.path.abspath(s) for s in sources],
            "tokenizer_fingerprint": tok.fingerprint(), "val_fraction": val_fraction, "seed": seed,
            "synthetic": synth, "max_docs": max_docs}


def _existing_dataset(out: Path, options: dict, overwrite: bool) -> PrepareReport | None:
    """A report of the dataset already at `out` when it was made with `options`; None when `out` is free (missing,
    an empty folder) or `overwrite` replaces it. Raises when it holds something else."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    meta_file = out / "meta.json"
    if not meta_file.is_file():
        raise UsageError(f"{out} exists and is not a packed dataset (no meta.json): choose another output folder "
                         f"(a folder that `sala data prepare` did not write is never replaced)")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as e:
        if overwrite:
            return None
        raise UsageError(f"{meta_file} cannot be read ({e}): pass --overwrite to rebuild the dataset") from None
    saved = meta.get("options")
    if saved == json.loads(json.dumps(options)) and not overwrite:
        return PrepareReport(str(out), {k: dict(v) for k, v in meta.get("splits", {}).items()}, 0.0)
    if overwrite:
        return None
    if saved is None:
        raise ResumeMismatchError(f"{out} already holds a dataset whose options were not recorded: pass --overwrite "
                                  f"to rebuild it, or choose another output folder")
    diffs = [f"{k}: {saved.get(k)!r} -> {options.get(k)!r}" for k in sorted(set(saved) | set(options))
             if saved.get(k) != json.loads(json.dumps(options)).get(k)]
    raise ResumeMismatchError(f"{out} already holds a dataset made with other options ({'; '.join(diffs)}): pass "
                              f"--overwrite to rebuild it (the old one stays until the new one is complete), or "
                              f"choose another output folder")


_DOC_SPECIAL_TOKENS = 2   # BOS + EOS around every synthetic document, outside generate()'s budget


def _check_synthetic_fits(tok: TextTokenizer, synthetic: SyntheticMix) -> None:
    """Fail before any work when a (task, length) of the mix cannot hold its task's prompt: one sample each."""
    from sala.data.synthetic import generate

    too_short = []
    for task in synthetic.tasks:
        for length in sorted(set(synthetic.lengths)):
            try:
                next(iter(generate(task, length - _DOC_SPECIAL_TOKENS, 1, tok.count, seed=synthetic.seed)))
            except ValueError as e:
                too_short.append(f"{task} at {length} tokens ({e})")
    if too_short:
        raise ValueError("synthetic samples too short for their task: " + "; ".join(too_short)
                         + ". Use longer sample lengths or drop the task.")


_WORKER_TOKENIZER: TextTokenizer | None = None   # set before forking the worker processes


def _document(tok: TextTokenizer, ids: list[int]) -> np.ndarray:
    """[BOS] + ids + [EOS] as one array of the dataset's token dtype (arrays, not lists of Python ints, travel back
    from the workers: unpickling ~100M ints was a serial cost of its own)."""
    out = np.empty(len(ids) + 2, dtype=token_dtype(tok.vocab_size))
    out[0], out[-1] = tok.bos_id, tok.eos_id
    out[1:-1] = ids
    return out


def _encode_part(texts: list[str]) -> list[np.ndarray]:
    """One worker's share of the corpus documents, encoded one by one (the workers are the parallelism)."""
    tok = _WORKER_TOKENIZER
    return [_document(tok, tok.encode(t)) for t in texts]


def _in_workers(func: Callable, jobs: list, tok: TextTokenizer, desc: str = "", show_progress: bool = False) -> list:
    """[func(job) for job in jobs], in forked worker processes that share `tok` when there are several jobs and
    CPUs (in order; the same result as serially), else in this process. A progress bar counts finished jobs."""
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tok
    workers = min(len(jobs), _cpus())
    out = []
    try:
        with progress(len(jobs), desc=desc, unit="part", enabled=show_progress) as bar:
            if workers > 1 and "fork" in multiprocessing.get_all_start_methods():
                with multiprocessing.get_context("fork").Pool(workers) as pool:
                    for part in pool.imap(func, jobs, chunksize=1):
                        out.append(part)
                        bar.update(1)
                return out
            for j in jobs:
                out.append(func(j))
                bar.update(1)
            return out
    finally:
        _WORKER_TOKENIZER = None


def _cpus() -> int:
    """CPUs this process may run on (its affinity mask where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


_SHARE_CHARS = 1 << 20   # text per worker job of the corpus encoding (~1 MB)


def _encoded_documents(tok: TextTokenizer, texts: list[str], desc: str = "tokenizing",
                       show_progress: bool = False) -> list[np.ndarray]:
    """Every text as a [BOS] + tokens + [EOS] array, in order: the tokenizers backend encodes a batch on all CPUs
    itself, but turning its results into ids is serial Python, so worker processes take shares of ~1 MB of text
    (_SHARE_CHARS)."""
    if tok.backend != "tokenizers" or _cpus() == 1 or len(texts) < 2:
        return [_document(tok, ids) for i in range(0, len(texts), 2048)
                for ids in tok.encode_batch(texts[i:i + 2048])]
    jobs, part, size = [], [], 0
    for t in texts:
        part.append(t)
        size += len(t)
        if size >= _SHARE_CHARS:
            jobs.append(part)
            part, size = [], 0
    if part:
        jobs.append(part)
    return [doc for docs in _in_workers(_encode_part, jobs, tok, desc, show_progress) for doc in docs]


def _synthetic_part(job: tuple[str, int, int, int, int, int]) -> list[np.ndarray]:
    """Token ids of samples [lo, hi) of one (task, length) combination of n samples (one worker's share)."""
    from sala.data.synthetic import generate

    task, length, n, seed, lo, hi = job
    tok = _WORKER_TOKENIZER
    def depth(j: int) -> float:
        """Sample j's needle depth, drawn only for the samples this job makes (a list of all n per job would make
        building a large mix quadratic in the number of samples)."""
        return random.Random(f"{seed}/{task}/{length}/{j}").random()

    out = []
    # the document adds BOS + answer + EOS to the prompt; generate() keeps the answer budget free
    for s in generate(task, length - _DOC_SPECIAL_TOKENS, hi, tok.count, seed=seed, depths=depth, skip=lo):
        out.append(_document(tok, tok.encode(s.training_text())))
    return out


def _synthetic_documents(tok: TextTokenizer, combos: list[tuple[str, int]], per_combo: int,
                         seed: int, show_progress: bool = False) -> list[np.ndarray]:
    """`per_combo` samples of every (task, length), in combination order; generated in parallel worker
    processes (fork, where available) when there are many. The result does not depend on the worker count."""
    step = 64
    jobs = [(t, L, per_combo, seed, lo, min(per_combo, lo + step))
            for t, L in combos for lo in range(0, per_combo, step)]
    return [ids for part in _in_workers(_synthetic_part, jobs, tok, "synthetic samples", show_progress)
            for ids in part]
