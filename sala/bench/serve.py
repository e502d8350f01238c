"""`sala bench serve`: load against an OpenAI-compatible server, over HTTP with streamed responses.

The server is a running one (`--url`) or started in this process on a free loopback port (`--model DIR|PRESET`,
random weights for presets; the load generator then runs in a child process, as a real client would). Scenarios:
  load          requests with prompt / output lengths drawn from fixed values or uniform ranges, at a fixed
                concurrency or arriving as a Poisson process at `--rate` requests/s;
  document      one document of N tokens, then Q questions about it one after another (prefix-cache reuse);
  interference  streams decoding alone, then the same while one long prompt prefills (inter-token latency).
Prompts are random token ids (no tokenizer needed) and EOS is ignored, so every request generates exactly its
output length. Reported: request throughput, output tokens/s, TTFT and inter-token latency p50/p90/p99, the
prefix-cache hit rate (from /metrics), as JSON (run metadata, command, shapes) and an optional plot.
In process, `--sequential-baseline K` first times K requests one after another through `SalaEngine.generate` on
the same weights (the static-batch engine), `--compare-no-cache` reruns `document` with the cache off, `load` then
times the engine's decode step alone against the memory-bandwidth floor (`measure_decode_step`), and `--offline`
runs the load's requests on a fresh engine without HTTP (`offline_throughput`).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import random
import re
import statistics
import time
from dataclasses import asdict, dataclass, field

logger = logging.getLogger(__name__)

# Peak HBM bandwidth (bytes/s) by device name, for the decode floor (override with bandwidth_gbs).
PEAK_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12, "B200": 8.0e12}


@dataclass
class RequestRecord:
    """One request as the client saw it (seconds from its send)."""

    prompt_tokens: int
    max_tokens: int
    output_tokens: int = 0
    cached_tokens: int = 0
    ttft_s: float | None = None
    latency_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    tokens: list[str] | None = None        # the generated tokens' texts (document scenario: compare runs)
    text: str = ""
    error: str | None = None
    start_s: float = 0.0                    # since the scenario's start


def parse_range(spec: str | int) -> tuple[int, int]:
    """'4096' -> (4096, 4096); '1024:4096' -> uniform in [1024, 4096]; k/K, m/M suffixes allowed."""
    from sala.utils.lengths import parse_length

    parts = str(spec).split(":")
    if len(parts) == 1:
        n = parse_length(parts[0])
        return n, n
    if len(parts) != 2:
        raise ValueError(f"a length is N or LO:HI, got {spec!r}")
    lo, hi = parse_length(parts[0]), parse_length(parts[1])
    if not 1 <= lo <= hi:
        raise ValueError(f"a length range needs 1 <= LO <= HI, got {spec!r}")
    return lo, hi


def percentiles(values: list[float]) -> dict:
    """p50 / p90 / p99 / mean (None when there are no values), in the values' unit."""
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None, "count": 0}
    xs = sorted(values)

    def q(p: float) -> float:
        k = (len(xs) - 1) * p
        lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)

    return {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "mean": statistics.fmean(xs), "count": len(xs)}


class Client:
    """Streams /v1/completions requests with token-id prompts and records timings."""

    def __init__(self, url: str, model: str | None, api_key: str | None = None, timeout: float = 3600.0) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        self.model = model
        self.http = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=timeout,
                                      limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))

    async def close(self) -> None:
        await self.http.aclose()

    async def served_model(self) -> str:
        r = await self.http.get("/v1/models")
        r.raise_for_status()
        return r.json()["data"][0]["id"]

    async def metrics(self) -> dict[str, float]:
        """The sala_* samples of /metrics without labels (name -> value)."""
        r = await self.http.get("/metrics")
        out = {}
        for line in r.text.splitlines():
            m = re.match(r"^(sala_[a-z_]+) ([0-9.eE+-]+)$", line)
            if m:
                out[m.group(1)] = float(m.group(2))
        return out

    async def complete(self, prompt_ids: list[int], max_tokens: int, t0: float, keep_tokens: bool = False,
                       on_first_token=None) -> RequestRecord:
        """One streamed request; `keep_tokens` keeps the generated tokens' texts (to compare runs);
        `on_first_token()` is called when the first token arrives."""
        rec = RequestRecord(prompt_tokens=len(prompt_ids), max_tokens=max_tokens)
        # logprobs 0 (the chosen token's only): every generated token arrives as its own entry, also those
        # whose text is not yet printable, so that inter-token gaps are per token
        body = {"model": self.model, "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}, "logprobs": 0}
        tokens: list[str] = []
        start = time.perf_counter()
        rec.start_s = start - t0
        last = None
        try:
            async with self.http.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    rec.error = f"HTTP {r.status_code}: {(await r.aread()).decode()[:300]}"
                    return rec
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        rec.error = chunk["error"].get("message")
                        break
                    if chunk.get("usage"):
                        rec.output_tokens = chunk["usage"]["completion_tokens"]
                        rec.cached_tokens = chunk["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0)
                    for c in chunk.get("choices", []):
                        if not c.get("text") and not c.get("logprobs"):
                            continue
                        now = time.perf_counter()
                        n = max(1, len((c.get("logprobs") or {}).get("tokens") or []))
                        if last is None:
                            rec.ttft_s = now - start
                            n -= 1
                            if on_first_token is not None:
                                on_first_token()
                        if n:                    # tokens that arrived together share the gap
                            rec.itl_s.extend([(now - (last if last is not None else now)) / n] * n)
                        last = now
                        rec.text += c.get("text") or ""
                        if c.get("logprobs"):
                            tokens.extend(c["logprobs"].get("tokens") or [])
        except Exception as e:  # noqa: BLE001 - a load generator reports failures, it does not stop on them
            rec.error = f"{type(e).__name__}: {e}"
        rec.latency_s = time.perf_counter() - start
        if keep_tokens:
            rec.tokens = tokens
        return rec


def _random_prompt(rng: random.Random, n: int, vocab: int) -> list[int]:
    # Ids from 3 up: 0-2 are the pad / bos / eos of this project's tokenizers.
    return [rng.randrange(3, vocab) for _ in range(n)]


def summarize(records: list[RequestRecord], wall_s: float) -> dict:
    ok = [r for r in records if r.error is None]
    out_tokens = sum(r.output_tokens for r in ok)
    return {
        "requests": len(records), "failed": len(records) - len(ok), "wall_s": wall_s,
        "request_throughput_per_s": len(ok) / wall_s if wall_s > 0 else None,
        "output_tokens_per_s": out_tokens / wall_s if wall_s > 0 else None,
        "output_tokens": out_tokens, "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "cached_prompt_tokens": sum(r.cached_tokens for r in ok),
        "ttft_s": percentiles([r.ttft_s for r in ok if r.ttft_s is not None]),
        "itl_s": percentiles([x for r in ok for x in r.itl_s]),
        "latency_s": percentiles([r.latency_s for r in ok if r.latency_s is not None]),
        "errors": sorted({r.error for r in records if r.error})[:5],
    }


def load_requests(rng: random.Random, num_requests: int, prompt_len: tuple[int, int], output_len: tuple[int, int],
                  vocab: int) -> list[tuple[list[int], int]]:
    """(prompt token ids, output tokens) of the load scenario's requests, lengths uniform in their ranges (the
    same requests for the HTTP run and the in-process `offline` run of one seed)."""
    shapes = [(rng.randint(*prompt_len), rng.randint(*output_len)) for _ in range(num_requests)]
    return [(_random_prompt(rng, p, vocab), o) for p, o in shapes]


async def run_load(client: Client, *, num_requests: int, prompt_len: tuple[int, int], output_len: tuple[int, int],
                   vocab: int, concurrency: int | None = None, rate: float | None = None, seed: int = 0) -> dict:
    """`num_requests` requests at a fixed concurrency, or Poisson arrivals at `rate` requests/s."""
    rng = random.Random(seed)
    reqs = load_requests(rng, num_requests, prompt_len, output_len, vocab)
    t0 = time.perf_counter()
    if rate:
        async def delayed(i: int, at: float):
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - t0)))
            return await client.complete(*reqs[i], t0)

        at, tasks = 0.0, []
        for i in range(num_requests):
            tasks.append(asyncio.create_task(delayed(i, at)))
            at += rng.expovariate(rate)
        records = await asyncio.gather(*tasks)
    else:
        limit = asyncio.Semaphore(concurrency or num_requests)

        async def bounded(i: int):
            async with limit:
                return await client.complete(*reqs[i], t0)

        records = await asyncio.gather(*[bounded(i) for i in range(num_requests)])
    wall = time.perf_counter() - t0
    out = summarize(list(records), wall)
    out["per_request"] = [{k: v for k, v in asdict(r).items() if k not in ("itl_s", "tokens", "text")}
                          for r in records]
    return out


async def run_document(client: Client, *, doc_len: int, questions: int, question_len: int, output_len: int,
                       vocab: int, seed: int = 0) -> dict:
    """One document, then `questions` questions about it one after another: TTFT of each turn, follow-ups'
    TTFT relative to the first, cached prompt tokens, and the answers (token texts) to compare across runs."""
    rng = random.Random(seed)
    doc = _random_prompt(rng, doc_len, vocab)
    qs = [_random_prompt(rng, question_len, vocab) for _ in range(questions)]
    t0 = time.perf_counter()
    turns = []
    for q in qs:
        turns.append(await client.complete(doc + q, output_len, t0, keep_tokens=True))
    wall = time.perf_counter() - t0
    out = summarize(turns, wall)
    first = turns[0].ttft_s
    out["turns"] = [{"ttft_s": r.ttft_s, "latency_s": r.latency_s, "prompt_tokens": r.prompt_tokens,
                     "cached_tokens": r.cached_tokens, "output_tokens": r.output_tokens, "error": r.error,
                     "ttft_ratio_to_first": (r.ttft_s / first) if first and r.ttft_s else None} for r in turns]
    out["followup_ttft_ratio_max"] = max((t["ttft_ratio_to_first"] for t in out["turns"][1:]
                                          if t["ttft_ratio_to_first"] is not None), default=None)
    out["answers"] = [r.tokens for r in turns]
    return out


async def run_interference(client: Client, *, streams: int, stream_prompt_len: int, stream_output_len: int,
                           long_prompt_len: int, vocab: int, seed: int = 0) -> dict:
    """Inter-token latency of `streams` decoding streams alone, then while one `long_prompt_len` prompt
    prefills (submitted once every stream has its first token); the ratio of the two p99s. A short untimed phase
    first (the streams' shapes' first steps). The streams' outputs should outlast the long prefill: only the gaps
    while it runs count (`itl_during_prefill_s`)."""
    rng = random.Random(seed)

    async def phase(with_long: bool, output_len: int = stream_output_len) -> dict:
        prompts = [_random_prompt(rng, stream_prompt_len, vocab) for _ in range(streams)]
        t0 = time.perf_counter()
        started = [0]
        all_started = asyncio.Event()

        def first_token() -> None:
            started[0] += 1
            if started[0] == streams:
                all_started.set()

        tasks = [asyncio.create_task(client.complete(p, output_len, t0, on_first_token=first_token))
                 for p in prompts]
        long_rec = None
        if with_long:
            waiter = asyncio.create_task(all_started.wait())
            await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)   # (or a stream failed)
            waiter.cancel()
            before = await _prefilled_tokens(client)
            long_task = asyncio.create_task(client.complete(_random_prompt(rng, long_prompt_len, vocab), 1, t0))
        records = await asyncio.gather(*tasks)
        if with_long:
            # the long prompt's tokens prefilled while the streams ran, read as they end (a step or two late;
            # about 0: it waited, e.g. for pool pages, and the phase measured nothing)
            after = await _prefilled_tokens(client)
            progress = after - before if after is not None and before is not None else None
            long_rec = await long_task
        res = summarize(list(records), time.perf_counter() - t0)
        if long_rec is not None:
            res["long_prompt"] = {"prompt_tokens": long_rec.prompt_tokens, "ttft_s": long_rec.ttft_s,
                                  "start_s": long_rec.start_s, "error": long_rec.error,
                                  "prefilled_while_streams_ran": progress}
            res["valid"] = progress is None or progress >= min(long_prompt_len, 4096)
            if not res["valid"]:
                logger.warning("interference: the long prompt prefilled only %d tokens while the streams decoded "
                               "(it waited): this phase does not measure interference", progress)
            # only the gaps while the long prompt was being prefilled matter for the target
            lo = long_rec.start_s
            hi = lo + (long_rec.ttft_s or 0.0)
            during = []
            for r in records:
                t = r.start_s + (r.ttft_s or 0.0)
                for gap in r.itl_s:
                    t += gap
                    if lo <= t <= hi:
                        during.append(gap)
            res["itl_during_prefill_s"] = percentiles(during)
        return res

    await phase(False, output_len=min(stream_output_len, 32))     # untimed
    alone = await phase(False)
    loaded = await phase(True)
    p99_alone = alone["itl_s"]["p99"]
    p99_loaded = (loaded.get("itl_during_prefill_s") or {}).get("p99") or loaded["itl_s"]["p99"]
    return {"alone": alone, "with_long_prefill": loaded,
            "itl_p99_ratio": (p99_loaded / p99_alone) if p99_alone and p99_loaded else None,
            "valid": loaded.get("valid", True)}


async def _prefilled_tokens(client: Client) -> float | None:
    """The server's prompt tokens computed so far (`sala_prefill_tokens_total`), or None without that metric."""
    try:
        return (await client.metrics()).get("sala_prefill_tokens_total")
    except Exception:  # noqa: BLE001 - another server: no such metric
        return None


def decode_floor(core, batch: int, context: int, bandwidth: float | None) -> dict:
    """Memory-bandwidth floor of one decode step at `batch` sequences of `context` tokens: weights + the caches
    and states of those sequences read once (bytes of the engine's own cache per row, scaled to `context`)."""
    import torch

    weights = sum(p.numel() * p.element_size() for p in core.model.parameters())
    mem = core.cache.memory_bytes()
    # the K/V of `context` tokens (pool pages) + each row's compressed keys (scaled to `context`) and states
    kv_token = mem["sparse_kv"] / ((core.pool.num_pages + 1) * core.pool.page_size)
    comp_token = mem["compressed_keys"] / (core.max_num_seqs * max(1, core.cache.capacity))
    states_row = mem["lightning_states"] / core.max_num_seqs
    read = weights + batch * ((kv_token + comp_token) * context + states_row)
    if bandwidth is None and torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        bandwidth = next((bw for key, bw in PEAK_BANDWIDTH.items() if key in name), None)
    out = {"weight_bytes": weights, "cache_bytes_read": read - weights, "bandwidth_bytes_per_s": bandwidth}
    if bandwidth:
        out["floor_step_s"] = read / bandwidth
        out["floor_tokens_per_s"] = batch / out["floor_step_s"]
    return out


def measure_decode_step(core, batch: int, context: int, steps: int = 20, warmup: int = 3) -> float:
    """Median seconds of one pure decode step (no prefill, no sampling) of an idle EngineCore with `batch`
    sequences of `context` cached tokens: the engine's own step for the smallest bucket holding `batch` rows
    (`core._decode_step`: a CUDA graph on the GPU, whose first call compiles and second captures, hence the
    `warmup` untimed calls), rows [0, batch) at `context` tokens and the bucket's other rows empty, as the
    engine runs it. The K/V contents are whatever the cache holds (the step's time does not depend on them);
    the step advances seqlens by one, so they are reset before every call. Afterwards every row is empty again
    (lengths, seqlens, states zero) and the engine serves as before."""
    import torch

    if core.has_unfinished() or len(core.free_rows) != core.max_num_seqs:
        raise RuntimeError("measure_decode_step needs an idle engine (every slot free)")
    if not 1 <= batch <= core.max_num_seqs:
        raise ValueError(f"decode batch must be in [1, {core.max_num_seqs}] (max_num_seqs), got {batch}")
    cache = core.cache
    if not 1 <= context < cache.capacity:
        raise ValueError(f"decode context must be in [1, {cache.capacity - 1}] tokens (the step writes one token "
                         f"after them into rows of {cache.capacity}), got {context}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    from sala.bench.common import bench_ms

    step = core._decode_step(core.bucket_for(batch))
    start = torch.zeros_like(cache.seqlens)
    start[:batch] = context
    need = batch * -(-(context + 1) // core.pool.page_size)
    if core.prefix_cache is not None:
        core.prefix_cache.reclaim(need)
    for row in range(batch):                     # the rows' pages (the step writes one token after `context`)
        cache.grow_row(row, context + 1)
    cache.lengths[:batch] = [context] * batch
    step.ids.zero_()
    try:
        with torch.no_grad():
            ms = bench_ms(step, warmup=warmup, rep=steps, setup=lambda: cache.seqlens.copy_(start))
    finally:
        cache.reset()
    return ms / 1e3


def decode_report(core, batch: int, context: int, bandwidth: float | None, itl_p50_s: float | None = None,
                  steps: int = 20) -> dict:
    """The decode floor (`decode_floor`) with the measured pure decode step (`measure_decode_step`):
    decode_step_s (s), decode_tokens_per_s (batch / step), fraction_of_floor (floor step / measured step); and,
    given the load's median inter-token latency (s), the same figures from it (itl_p50_*: those steps also run
    prefill chunks and sampling, so they do not measure decode alone)."""
    out = {"batch": batch, "context": context, **decode_floor(core, batch, context, bandwidth)}
    step_s = measure_decode_step(core, batch, context, steps=steps)
    out.update(decode_step_s=step_s, decode_tokens_per_s=batch / step_s,
               decode_step_mode=core._decode_step(core.bucket_for(batch)).mode)
    floor_tps = out.get("floor_tokens_per_s")
    if floor_tps:
        out["fraction_of_floor"] = out["decode_tokens_per_s"] / floor_tps
    if itl_p50_s:
        out["itl_p50_s"] = itl_p50_s
        out["itl_p50_tokens_per_s"] = batch / itl_p50_s
        if floor_tps:
            out["itl_p50_fraction_of_floor"] = out["itl_p50_tokens_per_s"] / floor_tps
    return out


def offline_throughput(core, requests: list[tuple[list[int], int]], warmup: int = 0, vocab: int = 512,
                       seed: int = 0) -> dict:
    """`requests` ((prompt ids, output tokens) each, EOS ignored, greedy) submitted at once to `core` and run with
    `run_until_done()` in this thread: no HTTP, no server thread. `warmup` untimed requests of 64 prompt and 8
    output tokens (fewer where the model length is shorter) at once first (kernels, decode graphs). Returns
    wall_s (s, device synchronized), output_tokens and output_tokens_per_s (tokens/s)."""
    import torch

    from sala.engine.requests import Request
    from sala.engine.sampling import SamplingParams

    rng = random.Random(seed + 7)
    out_len = min(8, core.max_model_len - 1)                   # the HTTP warm-up's shape, where it fits
    for i in range(warmup):
        core.add_request(Request(f"warmup-{i}", _random_prompt(rng, min(64, core.max_model_len - out_len), vocab),
                                 SamplingParams(max_new_tokens=out_len, ignore_eos=True)))
    core.run_until_done()
    for i, (prompt, out_len) in enumerate(requests):
        core.add_request(Request(f"offline-{i}", prompt, SamplingParams(max_new_tokens=out_len, ignore_eos=True)))
    sync = torch.cuda.synchronize if core.device.type == "cuda" else (lambda *a: None)
    sync(core.device)
    t0 = time.perf_counter()
    outs = core.run_until_done()
    sync(core.device)
    wall = time.perf_counter() - t0
    tokens = sum(len(o.new_token_ids) for o in outs)
    return {"requests": len(requests), "wall_s": wall, "output_tokens": tokens,
            "output_tokens_per_s": tokens / wall if wall > 0 else None}


def sequential_baseline(model, tokenizer, *, requests: int, prompt_len: int, output_len: int, vocab: int,
                        seed: int = 0) -> dict:
    """`requests` prompts one after another through SalaEngine.generate (the static-batch engine)."""
    import torch

    from sala.engine import SalaEngine, SamplingParams

    rng = random.Random(seed + 1)
    engine = SalaEngine(model, tokenizer)
    params = SamplingParams(max_new_tokens=output_len, ignore_eos=True)
    engine.generate([_random_prompt(rng, min(prompt_len, 256), vocab)], SamplingParams(max_new_tokens=2))  # warm
    tokens, t0 = 0, time.perf_counter()
    for _ in range(requests):
        res = engine.generate([_random_prompt(rng, prompt_len, vocab)], params)
        tokens += len(res[0].token_ids)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    engine.cache = None
    return {"requests": requests, "prompt_len": prompt_len, "output_len": output_len, "wall_s": wall,
            "output_tokens": tokens, "output_tokens_per_s": tokens / wall if wall > 0 else None}


@contextlib.contextmanager
def in_process_server(core, name: str, *, engine_process: bool = False, engine_kwargs: dict | None = None):
    """A BackgroundServer over `core` (its engine thread in this process), or with `engine_process` over an
    EngineCore that a child process builds from the model `name` and `engine_kwargs` (`sala serve
    --engine-process`)."""
    from sala.serve.server import BackgroundServer, create_app

    if engine_process:
        app = create_app(name, served_model_name=name, engine_process=True, engine_kwargs=engine_kwargs)
    else:
        app = create_app(name, served_model_name=name, core=core)
    with BackgroundServer(app) as server:
        server.app = app
        yield server


def build_model(spec: str, device: str | None, dtype: str | None, seed: int = 0):
    """(model, tokenizer or None) from a model folder or a preset (random weights)."""
    from pathlib import Path

    import torch

    from sala.engine.loading import default_device, load_model_dir, load_tokenizer_dir, parse_dtype, random_model
    from sala.modeling.configuration_sala import SalaConfig

    dev = torch.device(device) if device else default_device()
    dt = parse_dtype(dtype, dev)
    if Path(spec).is_dir():
        return load_model_dir(spec, device=dev, dtype=dt), load_tokenizer_dir(spec)
    return random_model(SalaConfig.from_preset(spec), dev, dt, seed), None


def plot(payload: dict, path: str) -> str | None:
    """TTFT and inter-token latency distributions (load), TTFT per turn (document); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plot")
        return None
    res = payload["results"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    if payload["scenario"] == "document":
        ttfts = [t["ttft_s"] or 0.0 for t in res["turns"]]
        axes[0].bar(range(len(ttfts)), ttfts)
        axes[0].set_xlabel("turn (0 = first question)")
        axes[0].set_ylabel("TTFT (s)")
        axes[0].set_yscale("log")
        axes[1].bar(range(len(ttfts)), [t["cached_tokens"] for t in res["turns"]])
        axes[1].set_xlabel("turn")
        axes[1].set_ylabel("cached prompt tokens")
    else:
        block = res if payload["scenario"] == "load" else res["with_long_prefill"]
        per = block.get("per_request") or []
        axes[0].hist([r["ttft_s"] for r in per if r.get("ttft_s") is not None], bins=30)
        axes[0].set_xlabel("TTFT (s)")
        axes[1].set_xlabel("inter-token latency percentile")
        for name, b in ([("load", res)] if payload["scenario"] == "load"
                        else [("alone", res["alone"]), ("with long prefill", res["with_long_prefill"])]):
            q = b["itl_s"]
            axes[1].plot(["p50", "p90", "p99"], [q["p50"], q["p90"], q["p99"]], marker="o", label=name)
        axes[1].set_ylabel("seconds")
        axes[1].legend()
    fig.suptitle(f"sala bench serve: {payload['scenario']} ({payload['meta'].get('device', '')})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------- command
def add_arguments(p) -> None:
    """The flags of `sala bench serve`."""
    from sala.utils.lengths import length_arg

    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    src.add_argument("--model", help="serve this model folder or preset (random weights) in this process")
    p.add_argument("--scenario", choices=["load", "document", "interference"], default="load")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=None, help="load: requests in flight (default: all)")
    p.add_argument("--rate", type=float, default=None, help="load: Poisson arrivals, requests/s (instead of "
                   "--concurrency)")
    p.add_argument("--prompt-len", default="512", help="load: prompt tokens, N or LO:HI (uniform)")
    p.add_argument("--output-len", default="128", help="output tokens, N or LO:HI (uniform; document and "
                   "interference: N)")
    p.add_argument("--doc-len", type=length_arg, default=4096, help="document: tokens of the document")
    p.add_argument("--questions", type=int, default=5, help="document: questions asked one after another")
    p.add_argument("--question-len", type=int, default=32, help="document: tokens per question")
    p.add_argument("--streams", type=int, default=8, help="interference: decoding streams")
    p.add_argument("--long-prompt", type=length_arg, default=65536, help="interference: the long prompt's tokens")
    p.add_argument("--vocab", type=int, default=None, help="token ids drawn below this (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default=None)
    p.add_argument("--warmup-requests", type=int, default=None,
                   help="untimed concurrent short requests first (default: the scenario's batch size)")
    p.add_argument("--out", default="bench_serve.json", help="JSON output path")
    p.add_argument("--plot", default=None, help="PNG path (default: the JSON path with .png; 'none' for none)")
    g = p.add_argument_group("in process (--model)")
    g.add_argument("--max-num-seqs", type=int, default=32)
    g.add_argument("--max-model-len", type=length_arg, default=None)
    g.add_argument("--kv-cache-tokens", type=length_arg, default=None,
                   help="tokens of the shared K/V page pool (default: the engine's; interference: the long prompt's "
                        "and the streams' pages)")
    g.add_argument("--memory-fraction", type=float, default=0.9)
    g.add_argument("--chunk-size", type=int, default=None, help="prefill chunk (tokens)")
    g.add_argument("--no-prefix-cache", action="store_true")
    g.add_argument("--device", default=None)
    g.add_argument("--dtype", default=None)
    g.add_argument("--sequential-baseline", type=int, default=0, metavar="K",
                   help="first time K requests one after another through SalaEngine.generate (same weights)")
    g.add_argument("--speculative", default=None, metavar="ngram|draft:DIR", help="speculative decoding")
    g.add_argument("--num-speculative-tokens", type=int, default=4)
    g.add_argument("--compare-no-cache", action="store_true",
                   help="document: rerun with the prefix cache off and compare the answers")
    g.add_argument("--bandwidth-gbs", type=float, default=None,
                   help="load: peak memory bandwidth (GB/s) for the decode floor (default: by device name)")
    g.add_argument("--decode-batch", type=int, default=None,
                   help="load: sequences of the pure decode-step measurement (default: the scenario's batch)")
    g.add_argument("--decode-context", type=length_arg, default=None,
                   help="load: cached tokens per sequence of the pure decode-step measurement (default: the longest "
                        "prompt + output - 1, the longest context a decode step of the scenario sees)")
    g.add_argument("--decode-steps", type=int, default=20, help="load: timed decode steps (the median is reported)")
    g.add_argument("--engine-process", action="store_true",
                   help="the server's engine loop in a child process of its own (sala serve --engine-process) "
                        "instead of a thread of this one")
    g.add_argument("--offline", action="store_true",
                   help="load: also run the same requests at once on a fresh engine in this thread without HTTP "
                        "(run_until_done) and report its output tokens/s")


def _longest_request(args) -> int:
    """Prompt + output tokens of the scenario's longest request, and room for the decode measurement's context
    (the default --max-model-len)."""
    out = parse_range(args.output_len)[1]
    if args.scenario == "document":
        return args.doc_len + args.question_len + out
    if args.scenario == "interference":
        return max(args.long_prompt + 1, parse_range(args.prompt_len)[1] + out)
    return max(parse_range(args.prompt_len)[1] + out, (getattr(args, "decode_context", None) or 0) + 1)


def _decode_shape(args) -> tuple[int, int]:
    """(batch, context) of the load scenario's pure decode-step measurement."""
    batch = args.decode_batch or min(args.concurrency or args.num_requests, args.max_num_seqs)
    context = args.decode_context or parse_range(args.prompt_len)[1] + parse_range(args.output_len)[1] - 1
    return batch, context


def _batch_size(args) -> int:
    """Sequences the scenario runs at once (the warm-up's concurrency)."""
    if args.scenario == "load":
        n = args.concurrency or args.num_requests
    elif args.scenario == "interference":
        n = args.streams + 1
    else:
        n = 1
    return min(n, args.max_num_seqs) if args.model else n


def _engine_kwargs(args, prefix_cache: bool) -> dict:
    from sala.engine.scheduler import kv_cache_tokens_for

    kw = dict(max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len or _longest_request(args),
              memory_fraction=args.memory_fraction, enable_prefix_cache=prefix_cache,
              max_waiting=max(256, args.num_requests))
    if args.chunk_size:
        kw["chunk_size"] = args.chunk_size
    if getattr(args, "kv_cache_tokens", None):
        kw["kv_cache_tokens"] = args.kv_cache_tokens
    elif args.scenario == "interference":    # the long prompt's pages and every stream's, not max_num_seqs x 1M
        per = -(-(parse_range(args.prompt_len)[1] + parse_range(args.output_len)[1]) // 64) * 64
        kw["kv_cache_tokens"] = kv_cache_tokens_for(-(-(args.long_prompt + 1) // 64) * 64
                                                    + max(args.streams, args.warmup_requests or 0) * per, 64)
    if getattr(args, "speculative", None):
        kw["speculative"] = args.speculative
        kw["num_speculative_tokens"] = args.num_speculative_tokens
    return {k: v for k, v in kw.items() if v is not None}


async def _scenario(client: Client, args, vocab: int) -> dict:
    if args.scenario == "load":
        return await run_load(client, num_requests=args.num_requests, prompt_len=parse_range(args.prompt_len),
                              output_len=parse_range(args.output_len), vocab=vocab,
                              concurrency=args.concurrency, rate=args.rate, seed=args.seed)
    out_len = parse_range(args.output_len)[1]
    if args.scenario == "document":
        return await run_document(client, doc_len=args.doc_len, questions=args.questions,
                                  question_len=args.question_len, output_len=out_len, vocab=vocab, seed=args.seed)
    return await run_interference(client, streams=args.streams, stream_prompt_len=parse_range(args.prompt_len)[1],
                                  stream_output_len=out_len, long_prompt_len=args.long_prompt, vocab=vocab,
                                  seed=args.seed)


async def _measure(url: str, args, vocab: int) -> dict:
    client = Client(url, None, api_key=args.api_key)
    try:
        client.model = await client.served_model()
        if args.warmup_requests:
            # untimed: compiles kernels and captures decode graphs for the batch sizes the scenario will use
            rng = random.Random(args.seed + 7)
            t0 = time.perf_counter()
            await asyncio.gather(*[client.complete(_random_prompt(rng, 64, vocab), 8, t0)
                                   for _ in range(args.warmup_requests)])
            if args.scenario == "document":
                # and one long prompt of the document's length (another document): the first question's TTFT is
                # then a prefill of a warm engine, as the follow-ups' and the cache-off run's are
                await client.complete(_random_prompt(rng, args.doc_len, vocab), 1, time.perf_counter())
        before = await client.metrics()
        results = await _scenario(client, args, vocab)
        after = await client.metrics()
    finally:
        await client.close()
    q = after.get("sala_prefix_cache_queries_total", 0.0) - before.get("sala_prefix_cache_queries_total", 0.0)
    h = after.get("sala_prefix_cache_hits_total", 0.0) - before.get("sala_prefix_cache_hits_total", 0.0)
    results["prefix_cache_hit_rate"] = h / q if q > 0 else None
    d = after.get("sala_spec_draft_tokens_total", 0.0) - before.get("sala_spec_draft_tokens_total", 0.0)
    a = after.get("sala_spec_accepted_tokens_total", 0.0) - before.get("sala_spec_accepted_tokens_total", 0.0)
    if d > 0:      # a speculating server: drafted / accepted tokens and the acceptance rate of this run
        results["speculative"] = {"draft_tokens": d, "accepted_tokens": a, "acceptance_rate": a / d}
    results["server_model"] = client.model
    return results


def _measure_sync(url: str, args, vocab: int) -> dict:
    return asyncio.run(_measure(url, args, vocab))


def _measure_in_child(url: str, args, vocab: int) -> dict:
    """`_measure` in a child process: the load generator's Python (request building, streaming parses: hundreds of
    microseconds per output token) must not take the GIL from the in-process server's engine thread, as no real
    client would."""
    import concurrent.futures
    import multiprocessing

    plain = argparse.Namespace(**{k: v for k, v in vars(args).items() if not callable(v)})
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(_measure_sync, url, plain, vocab).result()


def _check_args(args) -> None:
    if args.rate is not None and args.rate <= 0:
        raise ValueError(f"--rate must be > 0 requests/s, got {args.rate}")
    if args.num_requests < 1:
        raise ValueError(f"--num-requests must be >= 1, got {args.num_requests}")
    if args.offline and (args.url or args.scenario != "load"):
        raise ValueError("--offline needs --model (in process) and the load scenario")
    if args.decode_batch is not None and not 1 <= args.decode_batch <= args.max_num_seqs:
        raise ValueError(f"--decode-batch must be in [1, --max-num-seqs {args.max_num_seqs}], got {args.decode_batch}")
    if args.decode_steps < 1:
        raise ValueError(f"--decode-steps must be >= 1, got {args.decode_steps}")


def _free_device_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _offline(model, tok, args, vocab: int) -> dict:
    """The load scenario's requests on a fresh EngineCore (same engine settings), no HTTP."""
    from sala.engine.scheduler import EngineCore

    core = EngineCore(model, tok, **_engine_kwargs(args, not args.no_prefix_cache))
    reqs = load_requests(random.Random(args.seed), args.num_requests, parse_range(args.prompt_len),
                         parse_range(args.output_len), vocab)
    try:
        return offline_throughput(core, reqs, warmup=args.warmup_requests, vocab=vocab, seed=args.seed)
    finally:
        del core
        _free_device_memory()


def _run_in_process(args, payload: dict) -> None:
    """Build the model, then the sequential baseline, the scenario over HTTP against an in-process server (the
    load scenario: then the pure decode step on the same engine), the offline run; results into payload."""
    from sala.engine import SalaEngine
    from sala.engine.scheduler import EngineCore

    model, tok = build_model(args.model, args.device, args.dtype, args.seed)
    vocab = args.vocab or int(model.config.vocab_size)
    if tok is not None:
        vocab = min(vocab, tok.vocab_size)
    if args.sequential_baseline:
        payload["sequential_baseline"] = sequential_baseline(
            model, tok, requests=args.sequential_baseline, prompt_len=parse_range(args.prompt_len)[1],
            output_len=parse_range(args.output_len)[1], vocab=vocab, seed=args.seed)
        _free_device_memory()
    # the sparse kernels' length-dependent variants, compiled before anything is timed (no-op on the CPU)
    payload["kernel_warmup_s"] = SalaEngine(model, tok).warmup(_longest_request(args), _batch_size(args))
    runs = [(not args.no_prefix_cache, "results")]
    if args.scenario == "document" and args.compare_no_cache:
        runs.append((False, "results_no_cache"))
    for prefix_cache, key in runs:
        if getattr(args, "engine_process", False):
            # the server's EngineCore is built by its own process from --model (same weights for a preset: same
            # seed); this process's copy of the weights waits in host memory meanwhile
            device = next(model.parameters()).device
            on_gpu = device.type == "cuda"
            if on_gpu:
                model.to("cpu")
                _free_device_memory()
            kw = {**_engine_kwargs(args, prefix_cache), "device": args.device, "dtype": args.dtype,
                  "seed": args.seed}
            with in_process_server(None, str(args.model), engine_process=True,
                                   engine_kwargs={k: v for k, v in kw.items() if v is not None}) as server:
                payload[key] = _measure_in_child(server.url, args, vocab)
                stats = server.app.state.engine.stats()
            if on_gpu:
                model.to(device)
            payload.setdefault("engine", {k: v for k, v in stats.items() if isinstance(v, (int, float))})
            core = EngineCore(model, tok, **_engine_kwargs(args, prefix_cache)) if args.scenario == "load" else None
        else:
            core = EngineCore(model, tok, **_engine_kwargs(args, prefix_cache))
            with in_process_server(core, str(args.model)) as server:
                payload[key] = _measure_in_child(server.url, args, vocab)
            payload.setdefault("engine", {k: v for k, v in core.stats().items() if isinstance(v, (int, float))})
        if args.scenario == "load":          # the server has stopped: the engine is idle and ours
            batch, context = _decode_shape(args)
            payload["decode_floor"] = decode_report(
                core, batch, context, args.bandwidth_gbs * 1e9 if args.bandwidth_gbs else None,
                itl_p50_s=payload[key]["itl_s"]["p50"], steps=args.decode_steps)
        del core
        _free_device_memory()
    if "results_no_cache" in payload:
        payload["same_answers_as_no_cache"] = (payload["results"]["answers"]
                                               == payload["results_no_cache"]["answers"])
    if args.offline:
        payload["offline"] = _offline(model, tok, args, vocab)
    base = payload.get("sequential_baseline", {}).get("output_tokens_per_s")
    if base and payload["results"].get("output_tokens_per_s"):
        payload["speedup_vs_sequential"] = payload["results"]["output_tokens_per_s"] / base
    if base and payload.get("offline", {}).get("output_tokens_per_s"):
        payload["offline_speedup_vs_sequential"] = payload["offline"]["output_tokens_per_s"] / base


def run(args) -> dict:
    """Run `sala bench serve`; returns the payload written to args.out (and the plot path under "plot")."""
    from sala.bench.common import run_metadata, write_json

    _check_args(args)
    if args.warmup_requests is None:
        args.warmup_requests = _batch_size(args)
    payload: dict = {"meta": run_metadata(), "scenario": args.scenario,
                     "setup": {k: v for k, v in vars(args).items() if k != "func" and not callable(v)}}
    if args.url:
        if args.vocab is None:
            raise ValueError("--url needs --vocab (token ids are drawn below it)")
        payload["results"] = asyncio.run(_measure(args.url, args, args.vocab))
    else:
        _run_in_process(args, payload)
    write_json(args.out, payload)
    plot_path = None if args.plot == "none" else (args.plot or args.out.rsplit(".", 1)[0] + ".png")
    if plot_path:
        payload["plot"] = plot(payload, plot_path)
    return payload
