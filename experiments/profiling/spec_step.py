"""Where a speculative decoding step's time goes with the bundled model, against a plain decode step.

`sala bench spec` finds that with the bundled (tiny) model a verify step costs ~2.8 decode steps on the GPU, while
at the 9B shape it costs 1.12: the tiny model's steps are bound by the host and by small kernels, not by the
weights. This script decodes one quote prompt plainly and with n-gram drafts through `EngineCore`, and times the
parts of every step, synchronising the GPU around each part (a part's time includes its own GPU work; `accept tokens`
runs inside `sample` for plain decoding):

- plain: the graph replay (`decode graph`), sampling (`sample`: argmax + the host copy), `advance`, the rest;
- speculative: `drafts` (n-gram lookup), `grow` (pages), the verify graph, `accept` (compare with the target's
  tokens: their argmax runs in the verify step), `rollback` (the lightning states in closed form), `advance`, the
  outputs (`accept tokens`: a verify step's tokens, one request; `accept token`: one token), the rest.

    python experiments/profiling/spec_step.py --length 64k --out spec_step.json

Needs a CUDA GPU for meaningful numbers (runs on the CPU too).
"""
from __future__ import annotations

import argparse
import collections
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from sala.bench.common import run_metadata, write_json  # noqa: E402


class PartTimer:
    """Accumulates synchronised wall time per named part of a step."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.ms: dict[str, list[float]] = collections.defaultdict(list)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def wrap(self, name, fn):
        def timed(*a, **kw):
            self.sync()
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            self.sync()
            self.ms[name].append((time.perf_counter() - t0) * 1e3)
            return out
        return timed


def profile(core, ids: list[int], max_new: int, timer: PartTimer) -> dict:
    import sala.engine.scheduler as sched
    from sala.engine.decode_graph import GraphedDecodeStep
    from sala.engine.forward import DecodeStep
    from sala.engine.requests import Request
    from sala.engine.sampling import SamplingParams

    timer.ms.clear()
    saved = {}

    def patch(owner, attr, name):
        saved[(owner, attr)] = getattr(owner, attr)
        setattr(owner, attr, timer.wrap(name, getattr(owner, attr)))

    orig_call = GraphedDecodeStep.__call__

    def graphed_call(self):
        name = "decode graph" if isinstance(self.step, DecodeStep) else "verify graph"
        return timer.wrap(name, orig_call)(self)

    GraphedDecodeStep.__call__ = graphed_call
    patch(GraphedDecodeStep, "rollback", "rollback")
    patch(sched, "accept_drafts", "accept")
    patch(sched, "accept_greedy", "accept")
    for attr, name in (("_drafts", "drafts"), ("_grow_for_step", "grow"), ("_advance", "advance"),
                       ("_sample", "sample"), ("_accept", "accept token"), ("_accept_tokens", "accept tokens")):
        patch(core, attr, name)
    try:
        core.add_request(Request(f"p{time.monotonic_ns()}", ids, SamplingParams(max_new_tokens=max_new)))
        steps: list[float] = []
        decoding = False
        n_tokens = 0
        while core.has_unfinished():
            timer.sync()
            t0 = time.perf_counter()
            outs = core.step()
            timer.sync()
            dt = (time.perf_counter() - t0) * 1e3
            if decoding:
                steps.append(dt)
            new = sum(len(o.new_token_ids) for o in outs)
            n_tokens += new
            decoding = decoding or new > 0          # steps after the first token are decode/verify steps
    finally:
        GraphedDecodeStep.__call__ = orig_call
        for (owner, attr), fn in saved.items():
            if owner is core:
                delattr(core, attr)
            else:
                setattr(owner, attr, fn)
    parts = {k: {"total_ms": round(sum(v), 3), "calls": len(v), "median_ms": round(statistics.median(v), 4)}
             for k, v in timer.ms.items()}
    total = sum(steps)
    return {"steps": len(steps), "tokens": n_tokens, "step_total_ms": round(total, 3),
            "ms_per_token": round(total / max(n_tokens - 1, 1), 4),
            "step_median_ms": round(statistics.median(steps), 4) if steps else None,
            "parts": parts}


def main(argv: list[str] | None = None) -> int:
    from sala.bench.spec import _decode_run, quote_prompt
    from sala.engine.scheduler import EngineCore
    from sala.utils.bundled import bundled_model_dir
    from sala.utils.lengths import length_arg

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=length_arg, default=65536)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--num-speculative-tokens", type=int, default=8)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="spec_step.json")
    args = ap.parse_args(argv)
    kw = {"device": args.device, "dtype": args.dtype, "max_num_seqs": 1, "enable_prefix_cache": False,
          "max_model_len": -(-(args.length + args.max_new_tokens + 64) // 64) * 64}
    plain = EngineCore.from_pretrained(str(bundled_model_dir()), **kw)
    spec = EngineCore(plain.model, plain.tokenizer, **{k: v for k, v in kw.items() if k not in ("device", "dtype")},
                      speculative="ngram", num_speculative_tokens=args.num_speculative_tokens)
    tok = plain.tokenizer
    ids = tok.encode(quote_prompt(tok, args.length, random.Random(f"{args.seed}/quote/0")), add_bos=True)
    ids = ids[-(kw["max_model_len"] - args.max_new_tokens):]
    for core in (plain, spec):                       # untimed: kernels compiled, graphs captured
        _decode_run(core, ids, args.max_new_tokens)
    timer = PartTimer(plain.device)
    out = {"meta": run_metadata(), "setup": vars(args), "prompt_tokens": len(ids)}
    for name, core in (("plain", plain), ("speculative", spec)):
        out[name] = profile(core, ids, args.max_new_tokens, timer)
        print(name, out[name])
    # unsynchronised, as the bench times them
    for name, core in (("plain", plain), ("speculative", spec)):
        r = _decode_run(core, ids, args.max_new_tokens)
        out[name]["unsynced_tokens_per_s"] = r["decode_tokens_per_s"]
    out["speedup_unsynced"] = out["speculative"]["unsynced_tokens_per_s"] / out["plain"]["unsynced_tokens_per_s"]
    print("speed-up", out["speedup_unsynced"])
    write_json(args.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
