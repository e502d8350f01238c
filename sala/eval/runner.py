"""Running the synthetic tasks against a model: greedy decoding, string-match scores, a table and JSON.

    from sala.eval.runner import run_tasks
    report = run_tasks("runs/sala-small/final", lengths=[4096, 8192], tasks=["niah_single"], num_samples=20)
"""
from __future__ import annotations

import logging
import os
import time
from typing import Callable

import torch

from sala.eval.scoring import SCORERS
from sala.eval.tasks import TASKS, TaskSample, generate
from sala.eval.teacher_forced import SINGLE_ANSWER_TASKS, teacher_forced_report, teacher_forced_sample
from sala.utils.bundled import bundled_model_dir
from sala.utils.lengths import parse_lengths  # noqa: F401  (re-exported: sala.eval.parse_lengths)
from sala.utils.progress import progress

logger = logging.getLogger(__name__)

# Functions returning a default model folder (or None); `--model` may be left out when one answers.
DEFAULT_MODEL_RESOLVERS: list[Callable[[], str | None]] = [
    lambda: os.environ.get("SALA_DEFAULT_MODEL"),
    lambda: str(d) if (d := bundled_model_dir()) is not None else None,
]


def default_model() -> str:
    """The model used when `--model` is not given: env SALA_DEFAULT_MODEL, else the bundled model."""
    for resolve in DEFAULT_MODEL_RESOLVERS:
        path = resolve()
        if path:
            return path
    raise ValueError("no model given: pass --model DIR (a folder saved by `sala train` or save_pretrained) "
                     "or set SALA_DEFAULT_MODEL")


def resolve_device_dtype(device: str | None, dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """`--device` (default: CUDA when present) and `--dtype` ("auto": bf16 on CUDA, fp32 elsewhere), as the
    engine resolves them (`sala.engine.loading`)."""
    from sala.engine.loading import default_device, parse_dtype

    dev = torch.device(device) if device else default_device()
    return dev, parse_dtype(dtype, dev)


@torch.no_grad()
def greedy_answer(model: torch.nn.Module, ids: torch.Tensor, max_new_tokens: int, tok,
                  chunk_size: int | None = None, show_progress: bool = False) -> tuple[str, float]:
    """Prefill `ids` [1, T], then greedy decoding with the model's cache until '.', a newline, EOS or
    `max_new_tokens`. Works for SALA and transformers models. Returns (answer text, prefill seconds).
    `chunk_size`: prefill in pieces of this many tokens through the cache (the same logits as one call), with a
    progress bar of tokens done / total, tokens/s and ETA on stderr when `show_progress` (shown after 2 s)."""
    from sala.modeling import cache_keyword, output_cache

    key = cache_keyword(model)
    t0 = time.perf_counter()
    T = ids.shape[1]
    step = T if not chunk_size or chunk_size >= T else chunk_size
    past, out = None, None
    with progress(T, desc="prefill", unit="tok", enabled=show_progress, unit_scale=True) as bar:
        for s in range(0, T, step):
            extra = {key: past} if past is not None else {}
            out = model(input_ids=ids[:, s:s + step], use_cache=True, logits_to_keep=1, **extra)
            past = output_cache(out)
            bar.update(min(step, T - s))
    t_prefill = time.perf_counter() - t0
    new = []
    for _ in range(max_new_tokens):
        nxt = int(out.logits[0, -1].argmax())
        if nxt == tok.eos_id:
            break
        new.append(nxt)
        text = tok.decode(new)
        if "\n" in text or text.rstrip().endswith("."):
            break
        out = model(input_ids=torch.tensor([[nxt]], device=ids.device), use_cache=True, **{key: past})
        past = output_cache(out)
    return tok.decode(new), t_prefill


def clean_prediction(text: str) -> str:
    """The first line of a continuation (the answer), stripped."""
    text = text.strip()
    return text.split("\n", 1)[0].strip()


@torch.no_grad()
def predict(model: torch.nn.Module, tok, sample: TaskSample, device: torch.device) -> str:
    """Greedy continuation of `sample.input` (BOS prepended when the tokenizer's setting says so, as
    transformers' tokenizer does), at most `sample.max_new_tokens` tokens."""
    ids = torch.tensor([tok.encode(sample.input, add_bos=getattr(tok, "add_bos", True))], dtype=torch.long,
                       device=device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=sample.max_new_tokens,
                         do_sample=False, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id
                         if tok.pad_id is not None else tok.eos_id)
    return clean_prediction(tok.decode(out[0, ids.shape[1]:].tolist()))


def run_tasks(model_dir: str | None, lengths: list[int], tasks: list[str] | tuple[str, ...] = ("niah_single",),
              num_samples: int = 20, seed: int = 0, device: str | None = None, dtype: str = "auto",
              model: torch.nn.Module | None = None, tokenizer=None, teacher_forced: bool = False,
              log: Callable[[str], None] | None = None, show_progress: bool = False) -> dict:
    """Generate, run and score every task at every length. Returns a JSON-ready report with
    `results[task][str(length)] = {"score", "n", "mean_prompt_tokens", "examples", "misses", "by_depth"}`
    (misses: every sample below full marks, with gold, prediction and needle depth; by_depth: `depth_buckets`).
    teacher_forced: also score single-answer tasks with the gold answer fed in one forward pass, beside greedy
    decoding (`sala.eval.teacher_forced`; key "teacher_forced").
    Interrupted (KeyboardInterrupt), it returns what it finished: the report holds the (task, length) cells done,
    "partial": true and "interrupted_at": {"task", "length", "samples_done"}. show_progress: a bar of samples
    within each length on stderr."""
    from sala.engine.loading import load_model_dir
    from sala.modeling.tokenizer import load_tokenizer

    log = log or logger.info
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"unknown task {t!r}; choose from {', '.join(TASKS)}")
    if model is None:
        model_dir = model_dir or default_model()
        dev, tdtype = resolve_device_dtype(device, dtype)
        model = load_model_dir(model_dir, dtype=tdtype, device=dev)
    else:
        dev = next(model.parameters()).device
    model.eval()
    tok = tokenizer or load_tokenizer(model_dir)
    results: dict = {}
    t0 = time.time()
    report = {"model": str(model_dir), "tokenizer": tok.source, "lengths": lengths, "tasks": list(tasks),
              "num_samples": num_samples, "seed": seed, "results": results}
    where = {}
    try:
        for task in tasks:
            results[task] = {}
            for L in lengths:
                where = {"task": task, "length": L, "samples_done": 0}
                samples = list(generate(task, L, num_samples, tok.count, seed=seed))
                preds = []
                with progress(len(samples), desc=f"{task} {L} tokens", unit="sample", enabled=show_progress) as bar:
                    for s in samples:
                        preds.append(predict(model, tok, s, dev))
                        where["samples_done"] = len(preds)
                        bar.update(1)
                cell = _score_cell(task, samples, preds)
                if teacher_forced and task in SINGLE_ANSWER_TASKS:
                    per_sample = [SCORERS[task]([p], [s.outputs]) for s, p in zip(samples, preds)]
                    rows = [teacher_forced_sample(model, tok, s.input, s.outputs[0], dev) for s in samples]
                    cell["teacher_forced"] = teacher_forced_report(rows, [x >= 100.0 for x in per_sample])
                results[task][str(L)] = cell
                log(f"{task:16s} {L:>8d} tokens: {cell['score']:6.1f}  ({len(samples)} samples, "
                    f"{time.time() - t0:.0f}s)")
    except KeyboardInterrupt:
        done = [(t, int(L)) for t in results for L in results[t]]
        if (where.get("task"), where.get("length")) in done:   # stopped between two cells: name the next one
            todo = [(t, L) for t in tasks for L in lengths if (t, L) not in done]
            where = {"task": todo[0][0], "length": todo[0][1], "samples_done": 0} if todo else {}
        report.update(partial=True, interrupted_at=where, finished=[{"task": t, "length": L} for t, L in done],
                      tasks=[t for t in tasks if results.get(t)],
                      lengths=[L for L in lengths if all(str(L) in results[t] for t in results if results[t])]
                      if any(results.values()) else [])
        for t in [t for t in results if not results[t]]:
            del results[t]
    report["seconds"] = time.time() - t0
    return report


def _score_cell(task: str, samples: list[TaskSample], preds: list[str]) -> dict:
    """The report of one (task, length): score, examples, misses with depths, score by depth."""
    score = SCORERS[task](preds, [s.outputs for s in samples])
    per_sample = [SCORERS[task]([p], [s.outputs]) for s, p in zip(samples, preds)]
    return {
        "score": score, "n": len(samples),
        "mean_prompt_tokens": sum(s.num_tokens for s in samples) / len(samples),
        "examples": [{"gold": s.outputs, "pred": p, "depth": s.depth} for s, p in zip(samples[:5], preds[:5])],
        # every sample that did not score full marks, with its needle depth (where retrieval fails)
        "misses": [{"gold": s.outputs, "pred": p, "depth": s.depth}
                   for s, p, x in zip(samples, preds, per_sample) if x < 100.0],
        "by_depth": depth_buckets([s.depth for s in samples], per_sample),
    }


DEPTH_BUCKETS = 5


def depth_buckets(depths: list[float | None], scores: list[float], buckets: int = DEPTH_BUCKETS) -> dict:
    """Mean score and count per needle-depth bucket: {"0.0-0.2": {"score", "n"}, ...} over [0, 1] in `buckets`
    equal parts (depth 1.0 in the last); samples without a depth (tasks with no needle position) are left out."""
    out: dict = {}
    for i in range(buckets):
        lo, hi = i / buckets, (i + 1) / buckets
        xs = [x for d, x in zip(depths, scores)
              if d is not None and lo <= d and (d < hi or (i == buckets - 1 and d <= hi))]
        if xs:
            out[f"{lo:.1f}-{hi:.1f}"] = {"score": sum(xs) / len(xs), "n": len(xs)}
    return out


def format_depth_table(report: dict, task: str) -> str:
    """Markdown table of one task's score by needle depth (rows) and length (columns); '' without depths."""
    lengths = [L for L in report["lengths"] if report["results"][task][str(L)].get("by_depth")]
    if not lengths:
        return ""
    rows = sorted({b for L in lengths for b in report["results"][task][str(L)]["by_depth"]})
    head = f"| {task}: depth | " + " | ".join(_fmt_len(L) for L in lengths) + " |"
    sep = "|---|" + "---|" * len(lengths)
    body = []
    for b in rows:
        cells = [report["results"][task][str(L)]["by_depth"].get(b) for L in lengths]
        body.append(f"| {b} | " + " | ".join(f"{c['score']:.1f} ({c['n']})" if c else "—" for c in cells) + " |")
    return "\n".join([head, sep] + body)


def format_teacher_forced_table(report: dict, task: str) -> str:
    """Markdown table of one task's greedy and teacher-forced scores (%) by length; '' when none was run."""
    lengths = [L for L in report["lengths"] if (report["results"][task][str(L)].get("teacher_forced") or {}).get("n")]
    if not lengths:
        return ""
    cell = {L: report["results"][task][str(L)]["teacher_forced"] for L in lengths}
    rows = [("greedy decoding, exact", "greedy_exact"), ("teacher-forced, exact", "exact"),
            ("teacher-forced, first token", "first_token"), ("teacher-forced, answer tokens", "token_accuracy")]
    head = f"| {task} | " + " | ".join(_fmt_len(L) for L in lengths) + " |"
    body = [f"| {name} | " + " | ".join(f"{cell[L][key]:.1f}" for L in lengths) + " |" for name, key in rows]
    body.append("| samples where the two differ | " + " | ".join(str(len(cell[L]["disagree"])) for L in lengths) + " |")
    return "\n".join([head, "|---|" + "---|" * len(lengths)] + body)


def format_table(report: dict) -> str:
    """Markdown table: one row per task, one column per length."""
    lengths = report["lengths"]
    head = "| task | " + " | ".join(_fmt_len(L) for L in lengths) + " |"
    sep = "|---|" + "---|" * len(lengths)
    rows = [f"| {t} | " + " | ".join(f"{report['results'][t][str(L)]['score']:.1f}" for L in lengths) + " |"
            for t in report["tasks"]]
    return "\n".join([head, sep] + rows)


def _fmt_len(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)
