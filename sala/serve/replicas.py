"""`sala serve --replicas N` on Ray Serve: N engine replicas behind one OpenAI-compatible endpoint.

Two kinds of deployments (Ray Serve places them on the cluster, health-checks and restarts them):

- `SalaReplica` (one deployment per replica, `SalaReplica0` .. `SalaReplica{N-1}`, one replica each, one GPU each
  when CUDA is available): an EngineCore driven by an AsyncEngine; `generate(request)` streams
  (ADMITTED | REFUSED, then OUTPUT...) messages, `stats()`, `info()`, `pid()`, and `check_health` (Ray Serve
  calls it periodically; failing it, or dying, gets the replica restarted).
- `SalaIngress`: the same FastAPI app as the single-process server (`sala.serve.app.build_app`) over a
  RoutedEngine, which tokenizes in the ingress (the app does), routes by prefix-cache affinity
  (`sala.serve.router.PrefixRouter`) and streams from the chosen replica through Ray Serve's streaming
  DeploymentHandle responses.

One deployment per replica (rather than one deployment with N replicas) lets the ingress address each replica:
prefix affinity needs "the replica that computed this prefix", which Serve's own request routing cannot express.

    serve run sala.serve.replicas:build_app replicas=2            # or a config: configs/serve/ray_serve.yaml
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ray import serve

from sala.serve.routed_engine import (
    ADMITTED,
    OUTPUT,
    REFUSED,
    RetryAfter503,
    RoutedEngine,
    RouterMetricsCollector,
)
from sala.serve.router import PrefixRouter

logger = logging.getLogger(__name__)

APP_NAME = "sala"


class SalaReplica:
    """One engine replica: EngineCore + AsyncEngine in this Ray actor (see the module docstring)."""

    def __init__(self, model: str, engine_kwargs: dict | None = None, index: int = 0, cpu_threads: int = 0) -> None:
        import torch

        from sala.engine.scheduler import EngineCore
        from sala.serve.async_engine import AsyncEngine

        if cpu_threads > 0 and not torch.cuda.is_available():
            torch.set_num_threads(cpu_threads)   # replicas sharing a machine's cores must not oversubscribe them
        self.index = index
        self.model = str(model)
        self.core = EngineCore.from_pretrained(str(model), **(engine_kwargs or {}))
        self.engine = AsyncEngine(self.core)
        self.engine.start()
        logger.info("replica %d: %s on %s (pid %d)", index, model, getattr(self.core, "device", "?"), os.getpid())

    def info(self) -> dict:
        """What the ingress needs to serve this model: tokenizer, config, max_model_len."""
        from sala.serve.chat import read_chat_template

        model_dir = Path(self.model) if Path(self.model).is_dir() else None
        return {"tokenizer": self.core.tokenizer, "config": self.core.config,
                "max_model_len": self.core.max_model_len, "chat_template": read_chat_template(model_dir),
                "pid": os.getpid(), "index": self.index}

    def stats(self) -> dict:
        return {**self.engine.stats(), "pid": os.getpid(), "index": self.index}

    def pid(self) -> int:
        return os.getpid()

    def check_health(self) -> None:
        if not self.engine.is_running:
            raise RuntimeError(f"replica {self.index}: the engine thread is not running ({self.engine.dead})")

    async def generate(self, request):
        """Stream (ADMITTED, None) then (OUTPUT, [RequestOutput, ...])... until the finished one; or one
        (REFUSED, (kind, message)) when the engine refuses it ("request": never fits / bad; "queue_full")."""
        from sala.engine.requests import QueueFullError, RequestError

        try:
            stream = await self.engine.add(request)
        except RequestError as e:
            yield REFUSED, ("request", str(e))
            return
        except QueueFullError as e:
            yield REFUSED, ("queue_full", str(e) or "the waiting queue is full")
            return
        yield ADMITTED, None
        # Outputs already queued go in one message: when the ingress reads slower than the engine steps, the
        # per-message cost is paid once per batch, not once per token. Leaving early (the ingress cancelled:
        # client gone) runs AsyncEngine.outputs' finally, which aborts the request.
        outputs = self.engine.outputs(stream)
        async for out in outputs:
            batch = [out]
            while not out.finished and not stream.queue.empty():
                out = await outputs.__anext__()
                batch.append(out)
            yield OUTPUT, batch

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown(timeout=5)


def _ray_call(handle, method: str, *args, stream: bool = False):
    h = handle.options(stream=True) if stream else handle
    return getattr(h, method).remote(*args)


@serve.ingress()
class SalaIngress:
    """The HTTP ingress: the FastAPI app of `sala.serve.app` over a RoutedEngine of the replica handles."""

    async def __init__(self, replicas: list, served_model_name: str | None = None, api_key: str | None = None,
                       max_inflight: int = 32, poll_s: float = 1.0, model: str = "") -> None:
        self.replicas = replicas
        info = await replicas[0].info.remote()
        self.engine = RoutedEngine(replicas, tokenizer=info["tokenizer"], config=info["config"],
                                   max_model_len=info["max_model_len"], call=_ray_call,
                                   router=PrefixRouter(len(replicas), max_inflight=max_inflight), poll_s=poll_s)
        await self.engine.poll()
        self.chat_template = info["chat_template"]          # (template, special tokens) read by the replica
        self.model_name = served_model_name or _model_name(model)
        self.api_key = api_key

    def __serve_build_asgi_app__(self):
        from sala.serve.app import build_app
        from sala.serve.chat import ChatTemplate

        app = build_app(self.engine, model_name=self.model_name, api_key=self.api_key,
                        chat_template=ChatTemplate(*self.chat_template))
        app.state.metrics.registry.register(RouterMetricsCollector(self.engine))
        app.add_middleware(RetryAfter503)
        return app

    async def router_state(self) -> dict:
        """The router's counters (tests, debugging)."""
        e = self.engine
        return {"routed": dict(e.router.routed), "inflight": list(e.router.inflight), "down": sorted(e.down),
                "failures": e.failures, "retried": e.retried}


def _model_name(model: str) -> str:
    p = Path(model)
    return p.name if p.is_dir() else str(model)


def _uses_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def build(model: str, *, replicas: int = 2, replica_cpus: float = 1.0, replica_gpus: float | None = None,
          engine_kwargs: dict | None = None, served_model_name: str | None = None, api_key: str | None = None,
          max_inflight: int = 32, poll_s: float = 1.0, health_check_period_s: float = 5.0,
          health_check_timeout_s: float = 30.0, ingress_cpus: float = 0.0):
    """The Ray Serve application: `replicas` SalaReplica deployments (`replica_gpus` GPUs each: default 1 when
    the driver sees CUDA, else 0) and the SalaIngress. `engine_kwargs` go to EngineCore.from_pretrained."""
    if replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {replicas}")
    if replica_gpus is None:
        replica_gpus = 1.0 if _uses_gpu() else 0.0
    model = str(model)
    threads = max(1, int(replica_cpus)) if replica_gpus == 0 else 0
    bound = []
    for i in range(replicas):
        dep = serve.deployment(SalaReplica).options(
            name=f"SalaReplica{i}", num_replicas=1, max_ongoing_requests=100_000,
            ray_actor_options={"num_cpus": replica_cpus, "num_gpus": replica_gpus},
            health_check_period_s=health_check_period_s, health_check_timeout_s=health_check_timeout_s,
            graceful_shutdown_timeout_s=5,
            logging_config={"enable_access_log": False})   # the ingress polls stats every poll_s
        bound.append(dep.bind(model, engine_kwargs or {}, i, threads))
    ingress = serve.deployment(SalaIngress).options(
        name="SalaIngress", num_replicas=1, max_ongoing_requests=100_000,
        ray_actor_options={"num_cpus": ingress_cpus})
    app = ingress.bind(bound, served_model_name, api_key, max_inflight, poll_s, model)
    return app


def build_app(args: dict[str, Any]):
    """Ray Serve application builder (`serve run sala.serve.replicas:build_app replicas=2 model=DIR`, or the
    `import_path` of a Serve config file with `args:`). Keys: model (default: the bundled model), replicas,
    replica_cpus, replica_gpus, served_model_name, api_key, max_inflight, and engine options max_num_seqs,
    max_model_len, memory_fraction, max_waiting, no_prefix_cache, dtype."""
    from sala.utils.bundled import BUNDLED_MODEL_DIR

    args = dict(args or {})
    engine_keys = {"max_num_seqs": int, "max_model_len": int, "memory_fraction": float, "max_waiting": int,
                   "dtype": str}
    engine_kwargs = {k: conv(args.pop(k)) for k, conv in engine_keys.items() if args.get(k) is not None}
    if str(args.pop("no_prefix_cache", "false")).lower() in ("1", "true", "yes"):
        engine_kwargs["enable_prefix_cache"] = False
    gpus = args.pop("replica_gpus", None)
    known = {"model", "replicas", "replica_cpus", "served_model_name", "api_key", "max_inflight"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown sala.serve.replicas:build_app arguments {unknown}; known: "
                         f"{sorted(known | set(engine_keys) | {'no_prefix_cache', 'replica_gpus'})}")
    return build(args.get("model") or str(BUNDLED_MODEL_DIR), replicas=int(args.get("replicas", 2)),
                 replica_cpus=float(args.get("replica_cpus", 1.0)),
                 replica_gpus=None if gpus is None else float(gpus), engine_kwargs=engine_kwargs,
                 served_model_name=args.get("served_model_name"), api_key=args.get("api_key"),
                 max_inflight=int(args.get("max_inflight", 32)))
