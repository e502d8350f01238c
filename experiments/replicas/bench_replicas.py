"""Throughput and multi-turn follow-up TTFT of `sala serve` with N replicas vs one replica, in the same run.

For each replica count (1, then N) the Ray Serve application of `sala.serve.replicas` is deployed on the running
(or a new local) Ray cluster and loaded over HTTP with `sala.bench.serve`'s client:

- load: `--requests-per-replica x n` requests of random token ids at `--concurrency-per-replica x n`, so every
  replica sees the same load as the single one (target: tokens/s with N >= 0.9 x N x one replica);
- document: `--conversations-per-replica x n` concurrent conversations, each a document of `--doc-len` tokens
  followed by `--questions` questions one after another (target: follow-up TTFT p50 with N within 1.5x of one
  replica's; the router must keep each conversation on the replica holding its document).

    python experiments/replicas/bench_replicas.py --model minicpm-sala-9b --replicas 8 --out bench/results/replicas.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _vocab(model: str) -> int:
    from sala.engine.loading import load_config_dir
    from sala.modeling.configuration_sala import SalaConfig

    cfg = load_config_dir(model) if Path(model).is_dir() else SalaConfig.from_preset(model)
    return int(cfg.vocab_size)


async def _measure(url: str, args, n: int, vocab: int) -> dict:
    from sala.bench.serve import Client, run_document, run_load

    client = Client(url, None)
    try:
        client.model = await client.served_model()
        # warm-up: one short request per replica (compilation, CUDA graphs) is not timed
        await run_load(client, num_requests=2 * n, prompt_len=(64, 64), output_len=(8, 8), vocab=vocab,
                       concurrency=2 * n, seed=99)
        load = await run_load(client, num_requests=args.requests_per_replica * n,
                              prompt_len=(args.prompt_len, args.prompt_len),
                              output_len=(args.output_len, args.output_len), vocab=vocab,
                              concurrency=args.concurrency_per_replica * n, seed=1)
        load.pop("per_request", None)
        convs = await asyncio.gather(*[
            run_document(client, doc_len=args.doc_len, questions=args.questions, question_len=args.question_len,
                         output_len=args.answer_len, vocab=vocab, seed=100 + c)
            for c in range(args.conversations_per_replica * n)])
        follow = [t["ttft_s"] for c in convs for t in c["turns"][1:] if t["ttft_s"] is not None]
        first = [c["turns"][0]["ttft_s"] for c in convs if c["turns"][0]["ttft_s"] is not None]
        cached = [t["cached_tokens"] for c in convs for t in c["turns"][1:]]
        metrics = (await client.http.get("/metrics")).text
        routed = {}
        for line in metrics.splitlines():
            if line.startswith("sala_router_requests_total{"):
                routed[line.split('"')[1]] = float(line.split()[-1])
        return {"replicas": n, "load": load,
                "document": {"conversations": len(convs), "first_ttft_p50_s": statistics.median(first),
                             "followup_ttft_p50_s": statistics.median(follow),
                             "followup_ttft_max_s": max(follow),
                             "followup_cached_tokens_min": min(cached),
                             "failed": sum(c["failed"] for c in convs)},
                "router_requests": routed}
    finally:
        await client.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder or preset (random weights); default: bundled model")
    p.add_argument("--replicas", type=int, default=None, help="N (default: the GPUs Ray sees, at least 2)")
    p.add_argument("--replica-gpus", type=float, default=None, help="GPUs per replica (default 1 with CUDA)")
    p.add_argument("--replica-cpus", type=float, default=1.0)
    p.add_argument("--requests-per-replica", type=int, default=64)
    p.add_argument("--concurrency-per-replica", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=4096)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--conversations-per-replica", type=int, default=1)
    p.add_argument("--doc-len", type=int, default=131072)
    p.add_argument("--questions", type=int, default=5)
    p.add_argument("--question-len", type=int, default=64)
    p.add_argument("--answer-len", type=int, default=32)
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--out", default="bench/results/replicas.json")
    args = p.parse_args(argv)

    import ray
    from ray import serve

    from sala.serve.replicas import APP_NAME, build
    from sala.utils.bundled import BUNDLED_MODEL_DIR

    model = args.model or str(BUNDLED_MODEL_DIR)
    if not ray.is_initialized():
        ray.init(include_dashboard=False, logging_level="warning")
    n = args.replicas or max(2, int(ray.cluster_resources().get("GPU", 0)))
    engine_kwargs = {k: v for k, v in {"max_num_seqs": args.max_num_seqs, "max_model_len": args.max_model_len,
                                       "dtype": args.dtype}.items() if v is not None}
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    vocab = _vocab(model)
    runs = []
    try:
        for count in (1, n):
            t0 = time.perf_counter()
            serve.run(build(model, replicas=count, replica_cpus=args.replica_cpus, replica_gpus=args.replica_gpus,
                            engine_kwargs=engine_kwargs, max_inflight=max(32, args.concurrency_per_replica)),
                      name=APP_NAME, route_prefix="/")
            start_s = time.perf_counter() - t0
            result = asyncio.run(_measure(f"http://127.0.0.1:{port}", args, count, vocab))
            result["startup_s"] = start_s
            runs.append(result)
            print(json.dumps({k: v for k, v in result.items() if k != "load"}), file=sys.stderr)
            serve.delete(APP_NAME)
    finally:
        serve.shutdown()
    one, many = runs
    tput1, tputn = one["load"]["output_tokens_per_s"], many["load"]["output_tokens_per_s"]
    ttft1, ttftn = one["document"]["followup_ttft_p50_s"], many["document"]["followup_ttft_p50_s"]
    payload = {"model": model, "replicas": n, "args": vars(args), "runs": runs,
               "throughput_scaling": tputn / (n * tput1) if tput1 else None,       # target >= 0.9
               "followup_ttft_ratio": ttftn / ttft1 if ttft1 else None,            # target <= 1.5
               "gpus": ray.cluster_resources().get("GPU", 0)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(out)
    print(f"throughput scaling {payload['throughput_scaling']:.3f} (target >= 0.9), follow-up TTFT ratio "
          f"{payload['followup_ttft_ratio']:.3f} (target <= 1.5) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
