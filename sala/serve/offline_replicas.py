"""Offline batches over engine replicas: `sala generate --input prompts.jsonl --output results.jsonl --replicas N`.

The prompts not yet in the output (ids already written are skipped, as `sala.engine.llm.run_jsonl` does) are cut
into chunks and handed to N Ray actors, each an `LLM` (EngineCore + continuous batching) on its own GPU (or CPU
cores). Each actor keeps two chunks queued so it never idles between them. Results are appended in input order
as soon as every earlier chunk is written, each line whole and flushed, so an interrupted run keeps what it
wrote and a re-run continues from there.
"""
from __future__ import annotations

import json
import logging
import os
from collections import deque
from pathlib import Path

from sala.engine.llm import _done_ids, _params_for, _progress, read_jsonl_prompts
from sala.engine.sampling import SamplingParams

logger = logging.getLogger(__name__)


class BatchWorker:
    """One replica for offline batches (a Ray actor): an LLM on this actor's device."""

    def __init__(self, source: str, engine_kwargs: dict, cpu_threads: int = 0) -> None:
        import torch

        from sala.engine.llm import LLM

        if cpu_threads > 0 and not torch.cuda.is_available():
            torch.set_num_threads(cpu_threads)
        self.llm = LLM(source, **engine_kwargs)

    def pid(self) -> int:
        return os.getpid()

    def generate(self, prompts: list, params: list[SamplingParams], add_bos: bool) -> list:
        return self.llm.generate(prompts, params, progress=False, add_bos=add_bos)


def result_record(row: dict, res) -> dict:
    """The output line of one prompt (the same fields as `run_jsonl` writes)."""
    return {"id": row["id"], "prompt": row["prompt"], "text": res.text, "token_ids": res.token_ids,
            "finish_reason": res.finish_reason, "prompt_tokens": res.prompt_tokens,
            "completion_tokens": len(res.token_ids), "cached_tokens": res.num_cached_tokens}


def run_jsonl_replicas(source: str, input_path, output_path, base: SamplingParams | None = None, *,
                       replicas: int = 2, engine_kwargs: dict | None = None, replica_cpus: float = 1.0,
                       replica_gpus: float | None = None, chunk_size: int = 16, add_bos: bool = True,
                       progress: bool = True) -> int:
    """Generate every prompt of input_path not already in output_path over `replicas` Ray actors; append
    results in input order. Returns the number of results written by this call. Starts a local Ray when none
    is initialized (`ray.init()` joins RAY_ADDRESS's cluster when that is set)."""
    import ray

    if replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {replicas}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
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
    if replica_gpus is None:
        import torch

        replica_gpus = 1.0 if torch.cuda.is_available() else 0.0
    if not ray.is_initialized():
        ray.init(include_dashboard=False, logging_level="warning")
    threads = max(1, int(replica_cpus)) if replica_gpus == 0 else 0
    # small inputs still reach every replica: at least two chunks per replica when there are enough prompts
    chunk_size = max(1, min(chunk_size, -(-len(todo) // (2 * replicas))))
    actor = ray.remote(BatchWorker).options(num_cpus=replica_cpus, num_gpus=replica_gpus)
    workers = [actor.remote(str(source), dict(engine_kwargs or {}), threads) for _ in range(replicas)]
    chunks = deque(range(0, len(todo), chunk_size))
    pending: dict = {}                                   # ObjectRef -> (worker, chunk start)
    finished: dict[int, list] = {}                       # chunk start -> results
    next_start, written = 0, 0
    bar = _progress(len(todo)) if progress else None
    outp.parent.mkdir(parents=True, exist_ok=True)

    def submit(w) -> None:
        if chunks:
            s = chunks.popleft()
            e = min(s + chunk_size, len(todo))
            ref = w.generate.remote([r["prompt"] for r in todo[s:e]], params[s:e], add_bos)
            pending[ref] = (w, s)

    try:
        for w in workers:
            submit(w)
            submit(w)
        with open(outp, "a", encoding="utf-8") as f:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                w, s = pending.pop(ready[0])
                finished[s] = ray.get(ready[0])
                if bar is not None:
                    bar.update(len(finished[s]))
                submit(w)
                while next_start in finished:           # input order, each line whole, as soon as possible
                    for j, res in enumerate(finished.pop(next_start)):
                        f.write(json.dumps(result_record(todo[next_start + j], res), ensure_ascii=False) + "\n")
                        written += 1
                    f.flush()
                    next_start = min(next_start + chunk_size, len(todo))
    finally:
        if bar is not None:
            bar.close()
        for w in workers:           # killing an actor ends its running and queued tasks (force-cancel is not
            ray.kill(w)             # supported for actor tasks)
    return written


def generate_replicas_command(args) -> int:
    """`sala generate --input ... --output ... --replicas N` (the command's other options apply)."""
    import importlib.util

    if args.input is None or args.output is None:
        raise ValueError("--replicas goes with --input and --output (JSONL prompts in, JSONL results out)")
    if importlib.util.find_spec("ray") is None:
        raise RuntimeError("--replicas needs the ray extra: pip install 'sala-lm[ray]'")
    if args.preset and not args.random_weights:
        raise ValueError(f"preset {args.preset!r} ships no weights: add --random-weights, or pass --model DIR")
    if args.device:
        raise ValueError("--device does not go with --replicas: each replica uses its own GPU (or the CPU)")
    from sala.utils.bundled import BUNDLED_MODEL_DIR, bundled_model_dir

    source = args.preset or args.model or bundled_model_dir()
    if source is None:
        raise FileNotFoundError(f"no model given and no bundled model at {BUNDLED_MODEL_DIR}: pass --model DIR")
    base = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, stop=list(args.stop), stop_token_ids=list(args.stop_token_id),
                          ignore_eos=args.ignore_eos, seed=args.seed)
    kw = {"dtype": None if args.dtype == "auto" else args.dtype, "use_cuda_graph": not args.no_cuda_graph}
    if args.chunk_size:
        kw["chunk_size"] = args.chunk_size
    if args.preset:
        kw["seed"] = args.seed or 0
    n = run_jsonl_replicas(str(source), args.input, args.output, base, replicas=args.replicas, engine_kwargs=kw,
                           replica_cpus=args.replica_cpus, replica_gpus=args.replica_gpus,
                           add_bos=not args.no_bos)
    logger.info("wrote %d results to %s", n, args.output)
    return 0
