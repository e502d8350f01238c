"""Teacher-forced answer accuracy of single-answer tasks, beside greedy decoding on the same prompts.

Fed the prompt and the gold answer in one forward pass (no cache), does the model predict each of the answer's
tokens? With exact arithmetic, a greedy answer starts with the gold number iff every teacher-forced token is right
(each greedy step sees the gold prefix so far), so the two scores of one prompt set differ only where the cached
decoding path (prefill, then one token at a time through the KV cache and the lightning state) computes other
logits than the full forward. Where both are low, the model does not know the answer; where the teacher-forced score
is higher, decoding loses answers the model has.
"""
from __future__ import annotations

import torch

# tasks whose answer is one gold string that follows the prompt after a space (the sample's `answer`)
SINGLE_ANSWER_TASKS = ("niah_single", "niah_multikey", "niah_multiquery")


@torch.no_grad()
def teacher_forced_sample(model: torch.nn.Module, tok, prompt: str, gold: str, device: torch.device) -> dict | None:
    """Per-token argmax of the model over the gold answer " GOLD" fed after `prompt` (BOS prepended).

    Returns {"tokens": answer tokens, "correct": how many the model predicts, "first": the first one right,
    "exact": all right, "pred": the argmax tokens decoded}, or None when the prompt's tokens are not a prefix of the
    tokens of prompt + answer (the answer's first token would merge with the prompt's last)."""
    prompt_ids = tok.encode(prompt, add_bos=True)
    full = tok.encode(prompt + " " + gold, add_bos=True)
    n = len(full) - len(prompt_ids)
    if n <= 0 or full[:len(prompt_ids)] != prompt_ids:
        return None
    ids = torch.tensor([full], dtype=torch.long, device=device)
    logits = model(input_ids=ids, use_cache=False, logits_to_keep=n + 1).logits[0, :n]   # positions P-1 .. P+n-2
    pred = logits.argmax(-1).tolist()
    hits = [int(p == g) for p, g in zip(pred, full[len(prompt_ids):])]
    return {"tokens": n, "correct": sum(hits), "first": bool(hits[0]), "exact": all(hits), "pred": tok.decode(pred)}


def teacher_forced_report(rows: list[dict | None], greedy_correct: list[bool]) -> dict:
    """Scores (%) over the samples `teacher_forced_sample` could score, beside greedy decoding's per-sample result.

    exact: every answer token right; first_token; token_accuracy: over all answer tokens; greedy_exact: greedy
    decoding's score on the same samples; disagree: indices of the samples where the two differ (a decoding mismatch,
    unless the greedy answer matched the gold string somewhere other than at its start)."""
    pairs = [(r, g) for r, g in zip(rows, greedy_correct) if r is not None]
    index = [i for i, r in enumerate(rows) if r is not None]
    n = len(pairs)
    if n == 0:
        return {"n": 0, "skipped": len(rows)}
    pct = 100.0 / n
    return {"n": n, "skipped": len(rows) - n,
            "exact": pct * sum(r["exact"] for r, _ in pairs),
            "first_token": pct * sum(r["first"] for r, _ in pairs),
            "token_accuracy": 100.0 * sum(r["correct"] for r, _ in pairs) / sum(r["tokens"] for r, _ in pairs),
            "greedy_exact": pct * sum(bool(g) for _, g in pairs),
            "disagree": [i for i, (r, g) in zip(index, pairs) if r["exact"] != bool(g)]}
