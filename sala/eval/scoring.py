"""RULER's string-match scores (case-insensitive containment of the gold strings in the prediction)."""
from __future__ import annotations

from typing import Sequence


def string_match_all(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean over samples of the fraction of gold strings contained in the prediction, times 100
    (RULER's metric for needle, variable-tracking and word-extraction tasks)."""
    _check(predictions, references)
    if not predictions:
        return 0.0
    total = 0.0
    for pred, refs in zip(predictions, references):
        p = pred.lower()
        total += sum(r.lower() in p for r in refs) / len(refs)
    return 100.0 * total / len(predictions)


def string_match_part(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean over samples of 1 if any gold string is contained in the prediction, times 100 (QA tasks)."""
    _check(predictions, references)
    if not predictions:
        return 0.0
    hits = sum(max(r.lower() in pred.lower() for r in refs) for pred, refs in zip(predictions, references))
    return 100.0 * hits / len(predictions)


def _check(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    for i, refs in enumerate(references):
        if len(refs) == 0:
            raise ValueError(f"reference list {i} is empty")


SCORERS = {"niah_single": string_match_all, "niah_multikey": string_match_all, "niah_multivalue": string_match_all,
           "vt": string_match_all, "cwe": string_match_all, "niah_multiquery": string_match_all}
