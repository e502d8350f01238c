"""Synthetic RULER-style tasks: generation, lengths, determinism, scoring, JSONL (CPU)."""
from __future__ import annotations

import pytest
import torch

from sala.data import load_tokenizer
from sala.eval import TASKS, generate, read_jsonl, string_match_all, string_match_part, write_jsonl
from sala.eval.runner import clean_prediction, parse_lengths


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.mark.parametrize("task", TASKS)
def test_samples_fit_length_and_contain_answers(tok, task):
    L = 1500
    samples = list(generate(task, L, 3, tok.count, seed=5))
    assert len(samples) == 3
    for s in samples:
        n = tok.count(s.input)
        assert n == s.num_tokens
        assert n + s.max_new_tokens <= L
        assert n > 0.8 * (L - s.max_new_tokens)  # the haystack really fills the budget
        if task in ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery"):
            for v in s.outputs:
                assert f"is: {v}." in s.input  # the needle is in the haystack
            assert s.meta["keys"][0] in s.input.rsplit("\n", 1)[-1]  # and its key in the question
        if task == "vt":
            assert f"VAR {s.outputs[0]} = {s.meta['value']}." in s.input
            for a, b in zip(s.outputs[:-1], s.outputs[1:]):
                assert f"VAR {b} = VAR {a}." in s.input
        if task == "cwe":
            body = s.input.split("\n")[1]
            words = [w for w in body.split() if not w.endswith(".")]
            counts = {w: words.count(w) for w in set(words)}
            top = sorted(counts, key=counts.get, reverse=True)[:10]
            assert set(top) == set(s.outputs)
        # the reference answer scores 100, the empty answer 0
        assert string_match_all([s.answer], [s.outputs]) == 100.0
        assert string_match_all([""], [s.outputs]) == 0.0


@pytest.mark.parametrize("length", [300, 1500, 5000])
def test_multiquery_answers_every_other_key_from_its_needle(tok, length):
    """niah_multiquery: K needles, K-1 questions answered with their own needle's number, the last one open."""
    import re

    from sala.eval.tasks import multiquery_keys

    s = next(generate("niah_multiquery", length, 1, tok.count, seed=9))
    keys = s.meta["keys"]
    assert len(keys) == multiquery_keys(length) == max(2, min(16, length // 256))
    needles = dict(re.findall(r"magic numbers for (\S+) is: (\d+)\.", s.input))
    assert set(needles) == set(keys) and needles[keys[0]] == s.outputs[0]
    answered = re.findall(r"number for (\S+) in the text above is: (\d+)\.", s.input)
    assert sorted(k for k, _ in answered) == sorted(keys[1:])
    assert all(needles[k] == v for k, v in answered)
    assert s.input.endswith(f"number for {keys[0]} in the text above is:")
    # the questions come after the haystack
    assert s.input.rindex("\n") > max(s.input.index(f"is: {v}.") for v in needles.values())


def test_generation_is_deterministic_and_seeded(tok):
    a = [s.input for s in generate("niah_multikey", 600, 3, tok.count, seed=1)]
    b = [s.input for s in generate("niah_multikey", 600, 3, tok.count, seed=1)]
    c = [s.input for s in generate("niah_multikey", 600, 3, tok.count, seed=2)]
    assert a == b and a != c


def test_needle_depth_follows_request(tok):
    shallow, deep = generate("niah_single", 2000, 2, tok.count, depths=[0.0, 1.0])
    v0, v1 = shallow.outputs[0], deep.outputs[0]
    assert shallow.input.index(v0) < len(shallow.input) * 0.2
    assert deep.input.index(v1) > len(deep.input) * 0.8


def test_scoring():
    refs = [["123", "456"], ["abc"]]
    assert string_match_all(["x 123 456", "ABC"], refs) == 100.0
    assert string_match_all(["x 123", "nope"], refs) == 25.0
    assert string_match_part(["x 123", "nope"], refs) == 50.0
    with pytest.raises(ValueError, match="2 predictions but 1"):
        string_match_all(["a", "b"], [["a"]])


def test_jsonl_round_trip(tmp_path, tok):
    samples = list(generate("vt", 400, 2, tok.count))
    path = tmp_path / "vt.jsonl"
    assert write_jsonl(samples, str(path)) == 2
    assert read_jsonl(str(path)) == samples


def test_parse_lengths_and_cleaning():
    assert parse_lengths("1k,4K, 16k,2048,1m") == [1024, 4096, 16384, 2048, 1024 ** 2]
    with pytest.raises(ValueError, match="not a number"):
        parse_lengths("4x")
    assert clean_prediction("  1234567.\nmore text") == "1234567."


def test_too_short_length_is_a_clear_error(tok):
    with pytest.raises(ValueError, match="budget"):
        list(generate("niah_single", 80, 1, tok.count))


def test_depth_buckets_and_depth_table():
    from sala.eval.runner import depth_buckets, format_depth_table

    b = depth_buckets([0.0, 0.1, 0.5, 1.0, None], [100.0, 0.0, 100.0, 50.0, 0.0])
    assert b == {"0.0-0.2": {"score": 50.0, "n": 2}, "0.4-0.6": {"score": 100.0, "n": 1},
                 "0.8-1.0": {"score": 50.0, "n": 1}}   # depth 1.0 in the last bucket, no depth: left out
    assert depth_buckets([None, None], [100.0, 0.0]) == {}
    report = {"lengths": [1024, 4096], "tasks": ["niah_single", "vt"],
              "results": {"niah_single": {"1024": {"by_depth": b},
                                          "4096": {"by_depth": {"0.0-0.2": {"score": 0.0, "n": 3}}}},
                          "vt": {"1024": {"by_depth": {}}, "4096": {"by_depth": {}}}}}
    table = format_depth_table(report, "niah_single").splitlines()
    assert table[0] == "| niah_single: depth | 1K | 4K |"
    assert table[2:] == ["| 0.0-0.2 | 50.0 (2) | 0.0 (3) |", "| 0.4-0.6 | 100.0 (1) | — |",
                         "| 0.8-1.0 | 50.0 (1) | — |"]
    assert format_depth_table(report, "vt") == ""


def test_cli_niah_prints_the_depth_table_and_writes_misses(tmp_path, capsys):
    import json

    from sala.cli import main

    out = tmp_path / "niah.json"
    assert main(["eval", "niah", "--lengths", "700", "--num-samples", "4", "--by-depth", "--dtype", "fp32",
                 "--device", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| niah_single: depth | 700 |" in printed
    r = json.loads(out.read_text())["results"]["niah_single"]["700"]
    assert sum(c["n"] for c in r["by_depth"].values()) == r["n"] == 4
    assert len(r["misses"]) == round(r["n"] * (1 - r["score"] / 100))
    mean = sum(c["score"] * c["n"] for c in r["by_depth"].values()) / r["n"]
    assert abs(mean - r["score"]) < 1e-9


class _ScriptedLM(torch.nn.Module):
    """A stand-in causal LM whose argmax at every position is the next token of `script` (its gold continuation),
    except at the positions in `wrong`; records the logits_to_keep it was asked for."""

    def __init__(self, script: list[int], wrong: set[int], vocab: int) -> None:
        super().__init__()
        self.script, self.wrong, self.vocab, self.kept = script, wrong, vocab, []

    def forward(self, input_ids, use_cache=False, logits_to_keep=0):
        from types import SimpleNamespace

        T = input_ids.shape[1]
        assert input_ids[0].tolist() == self.script[:T]
        logits = torch.zeros(1, T, self.vocab)
        for t in range(T):
            nxt = self.script[t + 1] if t + 1 < len(self.script) else 0
            logits[0, t, (nxt + 1) % self.vocab if t in self.wrong else nxt] = 1.0
        self.kept.append(logits_to_keep)
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


def test_teacher_forced_sample_counts_the_answer_tokens_the_model_predicts(tok):
    """Fed prompt + " GOLD", the answer tokens' argmaxes are compared with the gold tokens: all right, the first
    wrong, a later one wrong; a prompt whose last token would merge with the answer is not scored (None)."""
    from sala.eval.teacher_forced import teacher_forced_report, teacher_forced_sample

    prompt, gold = "The special magic number for apple is:", "4231595"
    p = tok.encode(prompt, add_bos=True)
    full = tok.encode(prompt + " " + gold, add_bos=True)
    n = len(full) - len(p)
    assert n >= 2 and full[:len(p)] == p
    cpu = torch.device("cpu")
    right = teacher_forced_sample(_ScriptedLM(full, set(), tok.vocab_size), tok, prompt, gold, cpu)
    assert right == {"tokens": n, "correct": n, "first": True, "exact": True, "pred": " " + gold}
    first = teacher_forced_sample(_ScriptedLM(full, {len(p) - 1}, tok.vocab_size), tok, prompt, gold, cpu)
    assert (first["correct"], first["first"], first["exact"]) == (n - 1, False, False)
    model = _ScriptedLM(full, {len(full) - 2}, tok.vocab_size)
    last = teacher_forced_sample(model, tok, prompt, gold, cpu)
    assert (last["correct"], last["first"], last["exact"]) == (n - 1, True, False) and model.kept == [n + 1]

    class Merging:   # a tokenizer whose tokens of prompt + answer do not start with the prompt's (one merged token)
        def encode(self, text, add_bos=False):
            return [1] + [ord(c) for c in (text.replace(": 7", "%") if text.endswith(" 7") else text)]
    assert teacher_forced_sample(model, Merging(), "is:", "7", cpu) is None
    rep = teacher_forced_report([right, None, first, last], [True, True, True, False])
    assert rep["n"] == 3 and rep["skipped"] == 1
    assert rep["exact"] == pytest.approx(100 / 3) and rep["first_token"] == pytest.approx(200 / 3)
    assert rep["token_accuracy"] == pytest.approx(100 * (3 * n - 2) / (3 * n))
    assert rep["greedy_exact"] == pytest.approx(200 / 3) and rep["disagree"] == [2]   # original sample indices
    assert teacher_forced_report([None], [True]) == {"n": 0, "skipped": 1}


def test_cli_niah_teacher_forced_agrees_with_greedy_decoding_on_the_cpu(tmp_path, capsys):
    """`sala eval niah --teacher-forced`: with the reference ops in fp32 the cached decoding path computes the full
    forward's logits, so each prompt's greedy answer is exactly right iff its teacher-forced tokens all are."""
    import json

    from sala.cli import main

    out = tmp_path / "niah.json"
    assert main(["eval", "niah", "--lengths", "600", "--num-samples", "3", "--teacher-forced", "--dtype", "fp32",
                 "--device", "cpu", "--out", str(out)]) == 0
    assert "| teacher-forced, exact |" in capsys.readouterr().out
    r = json.loads(out.read_text())["results"]["niah_single"]["600"]
    tf = r["teacher_forced"]
    assert tf["n"] == 3 and tf["disagree"] == [] and tf["exact"] == tf["greedy_exact"] == pytest.approx(r["score"])
    assert 0 <= tf["token_accuracy"] <= 100 and tf["first_token"] >= tf["exact"]
