"""Offline batches through the serving scheduler: many prompts in, results out, with a progress bar.

    llm = LLM("path/to/model", max_num_seqs=16)           # or a SalaForCausalLM, or a preset name
    for r in llm.generate(["prompt a", "prompt b"], SamplingParams(max_new_tokens=64)):
        print(r.text)

`run_jsonl` is `sala generate --input prompts.jsonl --output results.jsonl`: one JSON object per input line
({"prompt": text or token ids, optional "id" and sampling fields}), one result per line in input order,
appended as results complete so an interrupted run keeps what it finished, and a re-run skips ids written.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from sala.engine.requests import Request, TokenLogprob
from sala.engine.sampling import SamplingParams
from sala.engine.scheduler import EngineCore

logger = logging.getLogger(__name__)


@dataclass
class LLMResult:
    """One prompt's output. finish_reason: "stop" (stop string, stop token or EOS) or "length"."""

    request_id: str
    prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)
    text: str | None = None
    finish_reason: str | None = None
    num_cached_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    ttft_s: float = 0.0            # submission -> first token (queueing included)
    total_s: float = 0.0


class LLM:
    """A `EngineCore` behind a batch API (see the module docstring)."""

    def __init__(self, model_or_path, tokenizer=None, **engine_kwargs) -> None:
        if isinstance(model_or_path, EngineCore):
            self.engine = model_or_path
        elif isinstance(model_or_path, (str, os.PathLike)):
            load = {k: engine_kwargs.pop(k) for k in ("device", "dtype", "seed") if k in engine_kwargs}
            self.engine = EngineCore.from_pretrained(str(model_or_path), **load, **engine_kwargs)
            if tokenizer is not None:
                self.engine.tokenizer = tokenizer
        else:
            self.engine = EngineCore(model_or_path, tokenizer, **engine_kwargs)
        self.tokenizer = self.engine.tokenizer
        self._n = 0

    def encode(self, prompt: str | list[int], add_bos: bool = True) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompts as token ids")
            return self.tokenizer.encode(prompt, add_bos=add_bos)
        return [int(t) for t in prompt]

    def generate(self, prompts: list[str | list[int]] | str, params: SamplingParams | list[SamplingParams] | None
                 = None, *, progress: bool = True, add_bos: bool = True, logprobs: int | None = None,
                 prompt_logprobs: int | None = None, on_result=None) -> list[LLMResult]:
        """Generate for every prompt (text or token ids) with one SamplingParams or one per prompt; results in
        prompt order. `on_result(index, result)` is called as each finishes. Errors (RequestError) are raised
        before anything runs."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or SamplingParams()
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(plist)} SamplingParams for {len(prompts)} prompts")
        reqs = []
        for i, (p, sp) in enumerate(zip(prompts, plist)):
            self._n += 1
            reqs.append(Request(f"llm-{self._n}", self.encode(p, add_bos), sp, logprobs, prompt_logprobs))
        for r in reqs:
            self.engine.check_request(r)
        results = [LLMResult(r.request_id, len(r.prompt_ids), logprobs=[] if logprobs is not None else None)
                   for r in reqs]
        index = {r.request_id: i for i, r in enumerate(reqs)}
        texts = [""] * len(reqs)
        pending = list(range(len(reqs)))
        bar = _progress(len(reqs)) if progress else None
        core = self.engine
        t0 = time.perf_counter()
        left = len(reqs)
        try:
            while left:
                # Keep the waiting queue at most full; the scheduler admits into free slots.
                while pending and len(core.waiting) < max(1, core.max_waiting):
                    core.add_request(reqs[pending.pop(0)])
                for out in core.step():
                    i = index.get(out.request_id)
                    if i is None:
                        continue
                    r = results[i]
                    if out.new_token_ids and not r.token_ids:
                        r.ttft_s = time.perf_counter() - t0
                    r.token_ids.extend(out.new_token_ids)
                    texts[i] += out.new_text
                    if out.new_logprobs and r.logprobs is not None:
                        r.logprobs.extend(out.new_logprobs)
                    if out.prompt_logprobs is not None:
                        r.prompt_logprobs = out.prompt_logprobs
                    r.num_cached_tokens = out.num_cached_tokens
                    if out.finished:
                        r.finish_reason = out.finish_reason
                        r.total_s = time.perf_counter() - t0
                        r.text = texts[i] if self.tokenizer is not None else None
                        left -= 1
                        if bar is not None:
                            bar.update(1)
                        if on_result is not None:
                            on_result(i, r)
        except BaseException:
            for r in reqs:
                core.abort(r.request_id)
            core.step()
            raise
        finally:
            if bar is not None:
                bar.close()
        return results


class _NoBar:
    def update(self, n: int) -> None: ...

    def close(self) -> None: ...


def _progress(total: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, unit="prompt", file=sys.stderr, dynamic_ncols=True)


# ---------------------------------------------------------------------- JSONL
_PARAM_NAMES = {f.name for f in fields(SamplingParams)}
_ALIASES = {"max_tokens": "max_new_tokens"}


def read_jsonl_prompts(path: Path) -> list[dict]:
    """Input lines as dicts with "id" (given, or the line's index among the prompts) and "prompt"."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or "prompt" not in obj:
                raise ValueError(f"{path}:{n}: each line must be a JSON object with a \"prompt\"")
            p = obj["prompt"]
            if not (isinstance(p, str) or (isinstance(p, list) and all(isinstance(t, int) for t in p))):
                raise ValueError(f"{path}:{n}: \"prompt\" must be a string or a list of token ids")
            obj.setdefault("id", len(rows))
            rows.append(obj)
    ids = [str(r["id"]) for r in rows]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"{path}: id {dup!r} appears more than once")
    return rows


def _params_for(row: dict, base: SamplingParams, where: str) -> SamplingParams:
    kw = asdict(base)
    for k, v in row.items():
        k = _ALIASES.get(k, k)
        if k in _PARAM_NAMES:
            kw[k] = v
    try:
        return SamplingParams(**kw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None


def _done_ids(path: Path) -> set[str]:
    """Ids already in an output file; a torn last line (interrupted write) is cut off, atomically."""
    if not path.exists():
        return set()
    raw = path.read_bytes()
    keep = raw if raw.endswith(b"\n") or not raw else raw[:raw.rfind(b"\n") + 1]
    done = set()
    for line in keep.decode("utf-8").splitlines():
        if line.strip():
            done.add(str(json.loads(line)["id"]))
    if keep != raw:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(keep)
        os.replace(tmp, path)
    return done


def run_jsonl(llm: LLM, input_path: str | os.PathLike, output_path: str | os.PathLike,
              base: SamplingParams | None = None, *, add_bos: bool = True, progress: bool = True) -> int:
    """Generate every prompt of input_path not already in output_path; append results in input order.
    Returns the number of results written by this call."""
    inp, outp = Path(input_path), Path(output_path)
    if not inp.is_file():
        raise FileNotFoundError(f"--input {inp}: no such file")
    if inp.resolve() == outp.resolve():
        raise ValueError("--output must not be the --input file")
    rows = read_jsonl_prompts(inp)
    done = _done_ids(outp)
    todo = [r for r in rows if str(r["id"]) not in done]
    if not todo:
        return 0
    base = base or SamplingParams()
    params = [_params_for(r, base, f"{inp} id {r['id']!r}") for r in todo]
    outp.parent.mkdir(parents=True, exist_ok=True)
    finished: dict[int, LLMResult] = {}
    next_i = 0
    written = 0
    with open(outp, "a", encoding="utf-8") as f:
        def on_result(i: int, r: LLMResult) -> None:
            nonlocal next_i, written
            finished[i] = r
            while next_i in finished:        # write in input order, each line whole, as soon as possible
                row, res = todo[next_i], finished.pop(next_i)
                rec = {"id": row["id"], "prompt": row["prompt"], "text": res.text, "token_ids": res.token_ids,
                       "finish_reason": res.finish_reason, "prompt_tokens": res.prompt_tokens,
                       "completion_tokens": len(res.token_ids), "cached_tokens": res.num_cached_tokens}
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                f.flush()
                next_i += 1
                written += 1

        llm.generate([r["prompt"] for r in todo], params, progress=progress, add_bos=add_bos, on_result=on_result)
    return written


def model_source(preset: str | None, model: str | None, random_weights: bool) -> str:
    """What `sala generate` loads: a preset (with --random-weights), a model folder, or the bundled model."""
    if preset and not random_weights:
        raise ValueError(f"preset {preset!r} ships no weights: add --random-weights, or pass --model DIR")
    if random_weights and not preset:
        raise ValueError("--random-weights goes with --preset, not with --model")
    from sala.utils.bundled import BUNDLED_MODEL_DIR, bundled_model_dir

    source = preset or model or bundled_model_dir()
    if source is None:
        raise FileNotFoundError(f"no model given and no bundled model at {BUNDLED_MODEL_DIR}: pass --model DIR")
    return str(source)


def generate_command(args) -> int:
    """`sala generate --input prompts.jsonl --output results.jsonl` (the command's other options apply)."""
    if args.input is None or args.output is None:
        raise ValueError("--input and --output go together (JSONL prompts in, JSONL results out)")
    source = model_source(args.preset, args.model, args.random_weights)
    base = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, stop=list(args.stop), stop_token_ids=list(args.stop_token_id),
                          ignore_eos=args.ignore_eos, seed=args.seed)
    kw = {"device": args.device, "dtype": None if args.dtype == "auto" else args.dtype,
              "use_cuda_graph": not args.no_cuda_graph}
    if args.chunk_size:
        kw["chunk_size"] = args.chunk_size
    if getattr(args, "speculative", None):
        kw["speculative"] = args.speculative
        kw["num_speculative_tokens"] = args.num_speculative_tokens
    if args.preset:
        kw["seed"] = args.seed or 0
    llm = LLM(str(source), **kw)
    n = run_jsonl(llm, args.input, args.output, base, add_bos=not args.no_bos)
    logger.info("wrote %d results to %s", n, args.output)
    return 0
