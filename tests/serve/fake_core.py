"""A stand-in EngineCore with the contract's interface: the model's full forward over each whole sequence, one
token per running request per step (no cache). Used only to test the HTTP layer where the real engine is not
the subject (and as an independent reference)."""
from __future__ import annotations

import torch

from sala.engine.requests import QueueFullError, RequestError, RequestOutput, TokenLogprob
from sala.engine.sampling import StopMatcher, sample_next


class _Seq:
    def __init__(self, req, tokenizer):
        self.req = req
        self.ids = list(req.prompt_ids)
        self.out: list[int] = []
        self.matcher = StopMatcher(req.params.stop)
        self.first = True
        self.gen = None
        if req.params.seed is not None:
            self.gen = torch.Generator()
            self.gen.manual_seed(req.params.seed)


class FakeEngineCore:
    def __init__(self, model, tokenizer, *, max_num_seqs: int = 4, max_model_len: int = 4096,
                 max_waiting: int = 64) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = model.config
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_waiting = max_waiting
        self.running: list[_Seq] = []
        self.waiting: list[_Seq] = []
        self.totals = {"prompt": 0, "gen": 0}

    def add_request(self, req) -> None:
        if len(req.prompt_ids) + req.params.max_new_tokens > self.max_model_len:
            raise RequestError(f"prompt {len(req.prompt_ids)} + max_new_tokens {req.params.max_new_tokens} > "
                               f"max_model_len {self.max_model_len}")
        if len(self.waiting) >= self.max_waiting:
            raise QueueFullError(f"waiting queue full ({self.max_waiting})")
        self.waiting.append(_Seq(req, self.tokenizer))

    def abort(self, request_id: str) -> None:
        self.running = [s for s in self.running if s.req.request_id != request_id]
        self.waiting = [s for s in self.waiting if s.req.request_id != request_id]

    def has_unfinished(self) -> bool:
        return bool(self.running or self.waiting)

    def stats(self) -> dict:
        return {"running": len(self.running), "waiting": len(self.waiting),
                "prompt_tokens_total": self.totals["prompt"], "generation_tokens_total": self.totals["gen"],
                "cache_pages_used": 0, "cache_pages_total": 0, "prefix_cache_queries": 0, "prefix_cache_hits": 0}

    @staticmethod
    def _lp(logp: torch.Tensor, tid: int, k: int) -> TokenLogprob:
        top = torch.topk(logp, k) if k else None
        return TokenLogprob(tid, float(logp[tid]), [] if top is None else
                            [(int(i), float(v)) for v, i in zip(top.values, top.indices)])

    @torch.no_grad()
    def step(self) -> list[RequestOutput]:
        while self.waiting and len(self.running) < self.max_num_seqs:
            s = self.waiting.pop(0)
            self.totals["prompt"] += len(s.ids)
            self.running.append(s)
        outs = []
        for s in list(self.running):
            p = s.req.params
            logits = self.model(torch.tensor([s.ids])).logits[0].float()
            logp = torch.log_softmax(logits, -1)
            prompt_lp = None
            if s.first and s.req.prompt_logprobs is not None:
                prompt_lp = [None] + [self._lp(logp[i], s.ids[i + 1], s.req.prompt_logprobs)
                                      for i in range(len(s.ids) - 1)]
            tid = int(sample_next(logits[-1:], p, s.gen)[0])
            s.ids.append(tid)
            s.out.append(tid)
            self.totals["gen"] += 1
            new_lp = [self._lp(logp[-1], tid, s.req.logprobs)] if s.req.logprobs is not None else None
            text, stopped = s.matcher.feed(self.tokenizer.decode(s.out))
            reason = None
            eos = {self.tokenizer.eos_id} if not p.ignore_eos else set()
            if stopped or tid in eos | set(p.stop_token_ids):
                reason = "stop"
            elif len(s.out) >= p.max_new_tokens:
                reason = "length"
                text += s.matcher.flush(self.tokenizer.decode(s.out))
            if reason:
                self.running.remove(s)
            outs.append(RequestOutput(s.req.request_id, [tid], text, new_lp, prompt_lp, reason is not None, reason,
                                      len(s.req.prompt_ids), 0, len(s.out)))
            s.first = False
        return outs
