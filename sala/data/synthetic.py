"""RULER-style synthetic long-context tasks, generated offline from a seed.

Tasks (names as in RULER where one exists):

| task | haystack | question | gold outputs |
|---|---|---|---|
| `niah_single` | repeated filler sentences, one needle "magic number for KEY is: N" | the number of KEY | [N] |
| `niah_multikey` | filler, 4 needles with different keys | the number of one key | [N] |
| `niah_multivalue` | filler, 4 needles with the same key | all numbers of the key | [N1..N4] |
| `vt` | filler, a chain VAR A = 12345, VAR B = VAR A, ... | every variable holding 12345 | [A, B, ...] |
| `cwe` | numbered list: 10 words x30, the rest x3 | the 10 most common words | [w1..w10] |
| `niah_multiquery` | filler, K needles (K = 2..16 by length) | K-1 answered questions, then the last key's | [N] |

`niah_multiquery` is the training-dense form of `niah_single` (not a RULER task): each of its K questions is a
retrieval over the haystack, so a document of it teaches retrieval K times where `niah_single` teaches it once.

The prompt length is measured in tokens of the tokenizer that will read it: the haystack is grown
(binary search) until prompt + answer budget reaches the target length. Each sample's `input` ends
with an answer prefix; the model continues it, and `sala.eval.scoring` matches the gold strings.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

from sala.data.words import magic_number, needle_key, pseudo_words, variable_name

FILLER = "The river is calm. The hills are quiet. The day goes on. We walk along and back again."

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "vt", "cwe", "niah_multiquery")

# tokens kept free for the answer (RULER budgets the generation inside the length) and decoded at eval
MAX_NEW_TOKENS = {"niah_single": 24, "niah_multikey": 24, "niah_multivalue": 64, "vt": 40, "cwe": 96,
                  "niah_multiquery": 24}


@dataclass
class TaskSample:
    """One prompt with its gold answers. `input` ends with the answer prefix; `answer` is the reference
    continuation (used when the sample is training data)."""

    task: str
    index: int
    length: int                 # target length in tokens (prompt + answer budget)
    input: str
    outputs: list[str]
    answer: str
    max_new_tokens: int
    num_tokens: int = 0         # prompt tokens actually produced
    depth: float | None = None  # relative position of the (first) needle, 0 = start
    meta: dict = field(default_factory=dict)

    def training_text(self) -> str:
        """Prompt followed by the reference answer: a training document."""
        return self.input + self.answer

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @staticmethod
    def from_json(line: str) -> "TaskSample":
        return TaskSample(**json.loads(line))


def _fit(build: Callable[[int], str], budget: int, count: Callable[[str], int],
         hint: int | None) -> tuple[str, int, int]:
    """Largest n with count(build(n)) <= budget (binary search). Returns (text, n, tokens)."""
    def ok(n: int) -> tuple[bool, str, int]:
        text = build(n)
        c = count(text)
        return c <= budget, text, c

    good, text0, c0 = ok(0)
    if not good:
        raise ValueError(f"the task's prompt alone needs {c0} tokens, more than the budget of {budget}")
    lo, best = 0, (text0, 0, c0)
    hi = None
    step = 1
    if hint:
        # samples of one length differ only slightly: search near the previous sample's answer
        step = max(1, hint // 100)
        g, t, c = ok(hint)
        if g:
            lo, best = hint, (t, hint, c)
        else:
            hi = hint
            g, t, c = ok(max(0, hint - step))
            if g:
                lo, best = max(0, hint - step), (t, max(0, hint - step), c)
            else:
                lo, step = 0, 1
    if hi is None:
        while True:
            cand = lo + step
            g, t, c = ok(cand)
            if not g:
                hi = cand
                break
            lo, best = cand, (t, cand, c)
            step *= 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        g, t, c = ok(mid)
        if g:
            lo, best = mid, (t, mid, c)
        else:
            hi = mid
    return best


def _insert(sentences: list[str], items: list[str], depths: list[float]) -> list[str]:
    """Insert `items` into `sentences` at relative `depths` (kept in order)."""
    out = list(sentences)
    for item, d in sorted(zip(items, depths), key=lambda p: p[1], reverse=True):
        out.insert(round(d * len(sentences)), item)
    return out


NIAH_HEADER = ("Some special magic numbers are hidden in the text below. Remember them, because you will "
               "be asked about them afterwards.\n")


def _distinct(rng: random.Random, n: int, draw: Callable[[random.Random], str]) -> list[str]:
    """n different values of draw(rng), in drawing order."""
    out: list[str] = []
    while len(out) < n:
        x = draw(rng)
        if x not in out:
            out.append(x)
    return out


def _needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def _number_question(key: str) -> str:
    """The single-number question about `key`, ending with its answer prefix."""
    return (f"What is the special magic number for {key} in the text above? "
            f"The special magic number for {key} in the text above is:")


def _needle_haystack(needles: list[str], depths: list[float], tail: str) -> Callable[[int], str]:
    """build(n): the header, n filler sentences with the needles at their depths, then `tail`."""
    def build(n: int) -> str:
        return NIAH_HEADER + " ".join(_insert([FILLER] * n, needles, depths)) + "\n" + tail
    return build


def _niah(task: str, rng: random.Random, depth: float) -> tuple[Callable[[int], str], list[str], str, dict]:
    nkeys = {"niah_single": 1, "niah_multikey": 4, "niah_multivalue": 1}[task]
    keys = _distinct(rng, nkeys, needle_key)
    if task == "niah_multivalue":
        values = [magic_number(rng) for _ in range(4)]
        needles = [_needle(keys[0], v) for v in values]
        depths = [depth] + [rng.random() for _ in range(3)]
        outputs = values
        question = (f"What are all the special magic numbers for {keys[0]} in the text above? "
                    f"The special magic numbers for {keys[0]} in the text above are:")
        answer = " " + ", ".join(values) + "."
    else:
        values = [magic_number(rng) for _ in keys]
        needles = [_needle(k, v) for k, v in zip(keys, values)]
        depths = [depth] + [rng.random() for _ in keys[1:]]
        outputs = [values[0]]
        question = _number_question(keys[0])
        answer = f" {values[0]}."
    return _needle_haystack(needles, depths, question), outputs, answer, {"keys": keys}


def multiquery_keys(length: int) -> int:
    """Needles (and questions) of a `niah_multiquery` sample of `length` tokens: one per 256, 2 to 16."""
    return max(2, min(16, length // 256))


def _niah_multiquery(rng: random.Random, depth: float,
                     length: int) -> tuple[Callable[[int], str], list[str], str, dict]:
    keys = _distinct(rng, multiquery_keys(length), needle_key)
    values = [magic_number(rng) for _ in keys]
    needles = [_needle(k, v) for k, v in zip(keys, values)]
    depths = [depth] + [rng.random() for _ in keys[1:]]
    asked = list(range(1, len(keys)))
    rng.shuffle(asked)        # the needle at `depth` (key 0) is asked last, unanswered
    answered = "".join(f"{_number_question(keys[i])} {values[i]}.\n" for i in asked)
    return (_needle_haystack(needles, depths, answered + _number_question(keys[0])), [values[0]],
            f" {values[0]}.", {"keys": keys})


def _vt(rng: random.Random, depth: float, hops: int = 4) -> tuple[Callable[[int], str], list[str], str, dict]:
    names = _distinct(rng, hops + 1, variable_name)
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, hops + 1)]
    depths = sorted([depth] + [depth + (1 - depth) * rng.random() for _ in range(hops)])
    header = "Remember the variable assignments in the text below and follow them.\n"
    question = (f"\nQuestion: Find all variables that are assigned the value {value} in the text above. "
                f"Answer: Following the chain of assignments in the text above, {hops + 1} variables are "
                f"assigned the value {value}, they are:")

    def build(n: int) -> str:
        body = [FILLER] * n
        out = list(body)
        for item, d in sorted(zip(chain, depths), key=lambda p: p[1], reverse=True):
            out.insert(round(d * n), item)
        return header + " ".join(out) + question

    return build, names, " " + " ".join(names) + ".", {"value": value}


def _cwe(rng: random.Random, length: int, num_common: int = 10, freq_common: int = 30,
         freq_rare: int = 3) -> tuple[Callable[[int], str], list[str], str, dict]:
    pool = pseudo_words(num_common + max(64, length // 6), rng)  # each rare word costs > 6 tokens (x3)
    common, rare_pool = pool[:num_common], pool[num_common:]
    order_seed = rng.random()
    header = ("Below is a numbered list of words. Some of them appear much more often than the others. "
              "Memorize the words that appear most often.\n")
    question = (f"\nQuestion: What are the {num_common} most common words in the list above? "
                f"Answer: The {num_common} words that appear most often in the list are:")

    def build(n: int) -> str:
        if n > len(rare_pool):
            raise ValueError(f"cwe: more than {len(rare_pool)} rare words needed")
        words = common * freq_common + rare_pool[:n] * freq_rare
        random.Random(order_seed).shuffle(words)
        return header + " ".join(f"{i + 1}. {w}" for i, w in enumerate(words)) + question

    return build, list(common), " " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(common)) + ".", {}


def generate(task: str, length: int, num_samples: int, count_tokens: Callable[[str], int], seed: int = 0,
             depths: list[float] | Callable[[int], float] | None = None, max_new_tokens: int | None = None,
             skip: int = 0) -> Iterator[TaskSample]:
    """Yield samples `skip` .. `num_samples - 1` of `task` whose prompt plus answer budget fits `length` tokens.

    `count_tokens` measures a text in the evaluated model's tokens. Needle depths default to
    `num_samples` evenly spaced points in [0, 1] (RULER draws from 40 such points); pass `depths`
    to choose: a list (cycled), or a function of the sample index. Samples depend only on (seed, task,
    length, index).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    if length < 64:
        raise ValueError(f"task length must be at least 64 tokens, got {length}")
    mnt = MAX_NEW_TOKENS[task] if max_new_tokens is None else max_new_tokens
    if depths is None:
        depths = [i / max(1, num_samples - 1) for i in range(num_samples)]
    hint = None
    for i in range(skip, num_samples):
        rng = random.Random(f"{seed}/{task}/{length}/{i}")
        depth = depths(i) if callable(depths) else depths[i % len(depths)]
        if task == "niah_multiquery":
            build, outputs, answer, meta = _niah_multiquery(rng, depth, length)
        elif task.startswith("niah"):
            build, outputs, answer, meta = _niah(task, rng, depth)
        elif task == "vt":
            build, outputs, answer, meta = _vt(rng, depth)
        else:
            # RULER repeats each common word 30 times; short prompts cannot hold that many, so the
            # repetition shrinks until the common words fill at most half of the budget.
            for freq in (30, 20, 10, 6, 4):
                build, outputs, answer, meta = _cwe(random.Random(f"{seed}/{task}/{length}/{i}"), length,
                                                    freq_common=freq)
                if count_tokens(build(0)) <= (length - mnt) // 2:
                    break
            meta = {"freq_common": freq}
            depth = None
        text, hint, ntok = _fit(build, length - mnt, count_tokens, hint)
        yield TaskSample(task=task, index=i, length=length, input=text, outputs=outputs, answer=answer,
                         max_new_tokens=mnt, num_tokens=ntok, depth=depth, meta=meta)


def write_jsonl(samples: list[TaskSample] | Iterator[TaskSample], path: str) -> int:
    """Write samples as JSON lines; returns how many."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for s in samples:
            f.write(s.to_json() + "\n")
            n += 1
    return n


def read_jsonl(path: str) -> list[TaskSample]:
    with open(path, encoding="utf-8") as f:
        return [TaskSample.from_json(line) for line in f if line.strip()]
