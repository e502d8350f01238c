"""lm-evaluation-harness's `local-completions` model against a live `sala serve` scores the same as the same model
run in process (lm-eval's own tasks and scoring both times; only the model backend differs).

Offline: the tasks are local JSONL files (dataset_path: json), the tokenizer is the bundled model's folder.
"""
from __future__ import annotations

import os

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.model import TemplateLM  # noqa: E402  (after pytest.importorskip)

from tests.serve.live import MODEL_DIR, serving  # noqa: E402  (after pytest.importorskip)

DATA_DIR = os.path.join(os.path.dirname(__file__), "data")
TASKS = ["sala_serve_mc", "sala_serve_gen"]


class InProcessSala(TemplateLM):
    """The bundled model through its own forward (whole sequence, no cache), tokenized as lm-eval's
    local-completions tokenizes (the same transformers tokenizer, no special tokens)."""

    def __init__(self, model, tokenizer) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    def tok_encode(self, string: str, **kwargs) -> list[int]:
        return self.tokenizer(string, add_special_tokens=False).input_ids

    @torch.no_grad()
    def _logprobs(self, ids: list[int]) -> torch.Tensor:
        return torch.log_softmax(self.model(torch.tensor([ids])).logits[0].float(), -1)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        out = []
        for _, ctx, cont in requests:
            lp = self._logprobs(ctx + cont)[len(ctx) - 1:-1]
            target = torch.tensor(cont)
            chosen = lp.gather(-1, target[:, None])[:, 0]
            out.append((float(chosen.sum()), bool((lp.argmax(-1) == target).all())))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError

    def generate_until(self, requests, disable_tqdm: bool = False):
        out = []
        for req in requests:
            context, kw = req.args
            until = list(kw.get("until") or [])
            ids = self.tok_encode(context)
            gen: list[int] = []
            for _ in range(int(kw.get("max_gen_toks", 16))):
                tok = int(self._logprobs(ids + gen)[-1].argmax())
                if tok == self.eot_token_id:
                    break
                gen.append(tok)
            text = self.tokenizer.decode(gen, skip_special_tokens=True)
            cut = min([i for i in (text.find(s) for s in until if s) if i >= 0], default=len(text))
            out.append(text[:cut])
        return out


def _scores(results: dict) -> dict:
    return {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and "stderr" not in k}
            for task, metrics in results["results"].items()}


def test_lm_eval_local_completions_matches_in_process(monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    from sala.engine.loading import load_model_dir

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(DATA_DIR)                  # the task YAMLs name their JSONL files relative to here
    tasks = TaskManager(include_path=DATA_DIR, include_defaults=False)

    def evaluate(model, **kw) -> dict:
        return simple_evaluate(model=model, tasks=TASKS, task_manager=tasks, bootstrap_iters=0, log_samples=True,
                               **kw)

    with serving(max_num_seqs=8) as server:
        served = evaluate("local-completions", model_args={
            "model": "sala-test", "base_url": f"{server.url}/v1/completions", "tokenizer_backend": "huggingface",
            "tokenizer": MODEL_DIR, "tokenized_requests": True, "num_concurrent": 4, "max_retries": 1,
            "max_length": 1024})
        stats = server.app.state.engine.stats()

    model = load_model_dir(MODEL_DIR, device=torch.device("cpu"), dtype=torch.float32)
    local = evaluate(InProcessSala(model, AutoTokenizer.from_pretrained(MODEL_DIR)))

    # every request's answer: log-likelihoods within float tolerance (cached decode vs whole forward), the same
    # greedy flags and generated texts
    for task in TASKS:
        a, b = served["samples"][task], local["samples"][task]
        assert len(a) == len(b) > 0
        for sa, sb in zip(sorted(a, key=lambda s: s["doc_id"]), sorted(b, key=lambda s: s["doc_id"])):
            for ra, rb in zip(sa["resps"], sb["resps"]):
                if isinstance(rb[0], tuple):
                    assert ra[0][0] == pytest.approx(rb[0][0], abs=1e-3) and ra[0][1] == rb[0][1], (task, sa["doc_id"])
                else:
                    assert ra == rb, (task, sa["doc_id"])
    s_served, s_local = _scores(served), _scores(local)
    assert set(s_served) == set(TASKS)
    for task in TASKS:
        assert s_served[task].keys() == s_local[task].keys()
        for metric, value in s_local[task].items():
            assert s_served[task][metric] == pytest.approx(value, abs=1e-6), (task, metric)
    # the served run really generated and scored: 8 questions x 3 choices + 6 generations
    assert stats["generation_tokens_total"] >= 8 * 3 + 6
