"""`sala bench spec`: speculative decoding, greedy, plain vs n-gram drafts (or a draft model) in one run.

Tasks (copy-heavy long context, prompts built from `sala.eval` pieces):
- `quote`: a document of pseudo-word paragraphs; the prompt asks to quote one paragraph, giving its first words;
- `vt`: RULER variable tracking (`sala.eval.tasks`, task "vt"): a chain of assignments hidden in filler.
For every sample both engines (`EngineCore`, one sequence, prefix cache off; each warmed up by one untimed request)
decode the same greedy tokens `--repeats` times; the output reports the median decode tokens/s (first token to
last) of those runs, the speed-up, whether the outputs are identical, and the acceptance rate and tokens per
verify step.

`--cost-preset` adds the cost side: on that preset shape with random weights, at `--cost-context` tokens, the
time of one verify step over `--cost-k` drafts (+ the last token) against one plain decode step, and of a verify
step followed by the rollback of half of its drafts (the lightning states in closed form), all as CUDA graphs.
"""
from __future__ import annotations

import logging
import random
import time

import torch

logger = logging.getLogger(__name__)


def add_arguments(p) -> None:
    from sala.utils.lengths import length_arg, lengths_arg

    p.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    p.add_argument("--tasks", default="quote,vt", help="comma separated: quote, vt")
    p.add_argument("--lengths", type=lengths_arg, default=None, help="prompt lengths, e.g. 16k,64k (default 16k)")
    p.add_argument("--num-samples", type=int, default=2, help="samples per task and length")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per sample and engine (the median counts)")
    p.add_argument("--speculative", default="ngram", help="ngram or draft:DIR")
    p.add_argument("--num-speculative-tokens", type=int, default=8)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cost-preset", default=None, help="also time verify vs decode at this preset's shape "
                   "(random weights), e.g. minicpm-sala-9b")
    p.add_argument("--cost-context", type=length_arg, default=65536)
    p.add_argument("--cost-k", type=int, default=8)
    p.add_argument("--out", default="bench_spec.json")


def quote_prompt(tok, length: int, rng: random.Random) -> str:
    """A document of about `length` tokens of pseudo-word paragraphs and a request to quote one of them."""
    from sala.data.words import pseudo_words

    paras: list[str] = []
    n = 0
    while n < length - 200:
        p = " ".join(pseudo_words(60, rng)).capitalize() + "."
        paras.append(p)
        n += len(tok.encode(p + "\n\n", add_bos=False))
    pick = paras[rng.randrange(len(paras))]
    head = " ".join(pick.split()[:6])
    return ("Document:\n\n" + "\n\n".join(paras) + f"\n\nQuote the paragraph of the document that begins with "
            f"\"{head}\", word for word.\nQuote: {head}")


def vt_prompt(tok, length: int, index: int, seed: int) -> str:
    from sala.eval.tasks import generate

    s = next(generate("vt", length, index + 1, lambda t: len(tok.encode(t, add_bos=True)), seed=seed, skip=index))
    return s.input


def _decode_run(core, ids: list[int], max_new: int, logprobs: int | None = None) -> dict:
    from sala.engine.requests import Request
    from sala.engine.sampling import SamplingParams

    core.add_request(Request(f"r{time.monotonic_ns()}", ids, SamplingParams(max_new_tokens=max_new),
                             logprobs=logprobs))
    toks: list[int] = []
    lps: list = []
    first = last = None
    spec = None
    while core.has_unfinished():
        outs = core.step()
        if core.device.type == "cuda":
            torch.cuda.synchronize(core.device)
        now = time.perf_counter()
        for o in outs:
            if o.new_token_ids:
                first = now if first is None else first
                last = now
            toks.extend(o.new_token_ids)
            lps.extend(o.new_logprobs or [])
            spec = o.speculative
    rate = (len(toks) - 1) / (last - first) if first is not None and last > first else None
    return {"tokens": toks, "decode_tokens_per_s": rate, "speculative": spec, "logprobs": lps}


def _timed(core, ids: list[int], max_new: int, repeats: int) -> dict:
    """`repeats` runs of one request: the first run's result with the median of the runs' decode tokens/s (and
    their spread), so one stall of the host does not decide a short output's speed, and every run's tokens. (With
    measured step costs a speculative run's k, so its verify sizes and in bf16 its rounding, can differ between
    runs.)"""
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")
    runs = [_decode_run(core, ids, max_new) for _ in range(repeats)]
    rates = sorted(r["decode_tokens_per_s"] for r in runs if r["decode_tokens_per_s"])
    out = dict(runs[0])
    out["decode_tokens_per_s"] = rates[len(rates) // 2] if rates else None
    out["decode_tokens_per_s_runs"] = [r["decode_tokens_per_s"] for r in runs]
    out["tokens_runs"] = [r["tokens"] for r in runs]
    return out


def divergence(core, ids: list[int], max_new: int, plain: list[int], other: list[int]) -> dict | None:
    """Where two greedy outputs first differ, and how close plain decoding's choice was there: plain's two best
    log-probabilities at that position (an untimed plain run with logprobs) and the other output's token's.
    A gap at the rounding level of the logits' dtype is a near-tie that any change of summation order can flip
    (the verify step's GEMMs run over k + 1 rows, the decode step's over one); a large gap would be a bug."""
    i = next((j for j, (a, b) in enumerate(zip(plain, other)) if a != b), None)
    if i is None:
        if len(plain) == len(other):
            return None
        i = min(len(plain), len(other))
    lp = _decode_run(core, ids, i + 1, logprobs=2)["logprobs"]
    if len(lp) <= i:
        return {"position": i}
    top = lp[i].top
    mine = other[i] if i < len(other) else None
    return {"position": i, "plain_token": plain[i] if i < len(plain) else None, "other_token": mine,
            "plain_top2_logprobs": [x[1] for x in top[:2]],
            "top2_gap": top[0][1] - top[1][1] if len(top) > 1 else None,
            "other_token_is_plain_second": len(top) > 1 and top[1][0] == mine}


def _cost(preset: str, context: int, k: int, device, dtype, seed: int) -> dict:
    """A verify step over k drafts + 1 (and with its rollback to half the drafts) vs one plain decode step at
    `context` tokens (one sequence), both as the engine runs them (CUDA graphs on the GPU)."""
    from sala.bench.common import bench_ms
    from sala.engine.decode_graph import GraphedDecodeStep
    from sala.engine.forward import DecodeStep, ModelRunner
    from sala.engine.loading import default_device, parse_dtype, random_model
    from sala.engine.speculative import VerifyStep
    from sala.engine.static_cache import StaticCache
    from sala.modeling.configuration_sala import SalaConfig

    dev = torch.device(device) if device else default_device()
    dt = parse_dtype(dtype, dev)
    cfg = SalaConfig.from_preset(preset)
    runner = ModelRunner(random_model(cfg, dev, dt, seed))
    cache = StaticCache(cfg, 1, context + k + 64, dt, dev)
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, cfg.vocab_size, (context,), generator=g).to(dev)
    for s in range(0, context, 16384):
        runner.prefill_chunk(prompt[s:s + 16384], cache, 0)
    snap = cache.states.clone()

    def reset() -> None:
        cache.states.copy_(snap)
        cache.lengths[0] = context
        cache.seqlens.fill_(context)

    step = GraphedDecodeStep(DecodeStep(runner, cache))
    verify = GraphedDecodeStep(VerifyStep(runner, cache, k + 1))
    verify.ids.copy_(torch.randint(3, cfg.vocab_size, (1, k + 1), generator=g))
    verify.keep.fill_(1 + k // 2)

    def verify_rollback() -> None:
        verify()
        verify.rollback()

    # every call starts from the prefilled state (the reset runs outside the timing)
    d = bench_ms(step, setup=reset)
    v = bench_ms(verify, setup=reset)
    vr = bench_ms(verify_rollback, setup=reset)
    return {"preset": preset, "context": context, "k": k, "decode_step_ms": d, "verify_step_ms": v,
            "verify_ratio": v / d, "verify_rollback_ms": vr, "verify_rollback_ratio": vr / d,
            "decode_mode": step.mode, "verify_mode": verify.mode}


def run(args) -> dict:
    from sala.bench.common import run_metadata, write_json
    from sala.engine.scheduler import EngineCore
    from sala.utils.bundled import bundled_model_dir

    payload: dict = {"meta": run_metadata(), "setup": {k: v for k, v in vars(args).items()
                                                       if k != "func" and not callable(v)}}
    lengths = args.lengths or [16384]
    src = args.model or bundled_model_dir()
    if src is None:
        raise FileNotFoundError("no model given and no bundled model: pass --model DIR")
    tasks = [t for t in args.tasks.split(",") if t]
    bad = [t for t in tasks if t not in ("quote", "vt")]
    if bad:
        raise ValueError(f"--tasks: unknown {bad}; choose from quote, vt")
    kw = {"device": args.device, "dtype": args.dtype, "max_num_seqs": 1, "enable_prefix_cache": False,
              "max_model_len": -(-(max(lengths) + args.max_new_tokens + 64) // 64) * 64}
    plain = EngineCore.from_pretrained(str(src), **kw)
    spec = EngineCore(plain.model, plain.tokenizer, **{k: v for k, v in kw.items() if k not in ("device", "dtype")},
                      speculative=args.speculative, num_speculative_tokens=args.num_speculative_tokens)
    tok = plain.tokenizer
    # untimed: a first request through each engine compiles the kernels and captures the decode graph and the
    # verify graphs (one per tokens-per-row size it meets), which the timed runs would otherwise pay
    warm = tok.encode(quote_prompt(tok, min(lengths), random.Random(f"{args.seed}/warm-up")), add_bos=True)
    for core in (plain, spec):
        _decode_run(core, warm[-(kw["max_model_len"] - args.max_new_tokens):], args.max_new_tokens)
    rows = []
    for task in tasks:
        for length in lengths:
            for i in range(args.num_samples):
                rng = random.Random(f"{args.seed}/{task}/{length}/{i}")
                text = quote_prompt(tok, length, rng) if task == "quote" else vt_prompt(tok, length, i, args.seed)
                ids = tok.encode(text, add_bos=True)[-(kw["max_model_len"] - args.max_new_tokens):]
                a = _timed(plain, ids, args.max_new_tokens, args.repeats)
                b = _timed(spec, ids, args.max_new_tokens, args.repeats)
                row = {"task": task, "length": length, "index": i, "prompt_tokens": len(ids),
                       "output_tokens": len(a["tokens"]),
                       # every speculative run gave plain decoding's tokens
                       "identical": all(t == a["tokens"] for t in b["tokens_runs"]),
                       "identical_runs": sum(t == a["tokens"] for t in b["tokens_runs"]),
                       "plain_tokens_per_s": a["decode_tokens_per_s"], "spec_tokens_per_s": b["decode_tokens_per_s"],
                       "plain_tokens_per_s_runs": a["decode_tokens_per_s_runs"],
                       "spec_tokens_per_s_runs": b["decode_tokens_per_s_runs"],
                       "speedup": (b["decode_tokens_per_s"] / a["decode_tokens_per_s"]
                                   if a["decode_tokens_per_s"] and b["decode_tokens_per_s"] else None),
                       "speculative": b["speculative"]}
                if not row["identical"]:
                    other = next(t for t in b["tokens_runs"] if t != a["tokens"])
                    row["divergence"] = divergence(plain, ids, args.max_new_tokens, a["tokens"], other)
                logger.info("spec bench %s", row)
                rows.append(row)
    payload["results"] = rows
    sp = [r["speedup"] for r in rows if r["speedup"]]
    payload["summary"] = {"all_identical": all(r["identical"] for r in rows),
                          "min_speedup": min(sp) if sp else None,
                          "mean_speedup": sum(sp) / len(sp) if sp else None,
                          "engine": {k: v for k, v in spec.stats().items() if k.startswith("spec_")}}
    if args.cost_preset:
        del plain, spec
        payload["cost"] = _cost(args.cost_preset, args.cost_context, args.cost_k, args.device, args.dtype, args.seed)
    write_json(args.out, payload)
    return payload
