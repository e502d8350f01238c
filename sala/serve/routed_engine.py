"""RoutedEngine: the AsyncEngine interface of the HTTP app over several engine replicas, with a PrefixRouter.

The FastAPI app of `sala.serve.app` drives an engine through `start / shutdown / is_running / dead / stats /
add / outputs / abort` and the attributes `tokenizer, config, max_model_len`. RoutedEngine implements the same
operations over replica handles (Ray Serve DeploymentHandles of `sala.serve.replicas.SalaReplica`, or anything
with the same `generate` streaming call and `stats` call), so the single-process app serves N replicas with the
same API, errors and streaming.

Routing: the prompt's leading page keys (`page_keys`, the prefix cache's hash chain over token ids) go to the
PrefixRouter, which picks the replica holding the longest cached prefix unless it is overloaded, else the
least-loaded one. Faults: a replica that fails before its request produced any output is marked down and the
request is sent to another one; once output went out, the request fails with a retryable 503. A background task
polls every replica's `stats()`: a replica that does not answer is down (skipped by the router); one that
answers with a new process id restarted with an empty cache (the router forgets its pages); n prefix-cache
evictions make the router forget that replica's n least recently routed pages.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from sala.engine.prefix_cache import PAGE_SIZE, page_keys
from sala.engine.requests import QueueFullError, RequestError
from sala.serve.protocol import APIError
from sala.serve.router import PrefixRouter

logger = logging.getLogger(__name__)

# Message tags of the replica's `generate` stream (see sala.serve.replicas.SalaReplica.generate): (ADMITTED,
# None), (REFUSED, (kind, message)), (OUTPUT, [RequestOutput, ...]).
ADMITTED, OUTPUT, REFUSED = "admitted", "output", "refused"


class ReplicaFailed(RuntimeError):
    """A replica died or failed while serving a request (the app answers 503: retry)."""


@dataclass
class RoutedStream:
    """One request's stream from the replica serving it."""

    request: Any
    replica: int
    gen: Any                                   # async iterator of (tag, payload) from the replica
    tried: set[int] = field(default_factory=set)
    yielded: int = 0                           # outputs handed to the app so far
    finished: bool = False
    released: bool = False

    @property
    def request_id(self) -> str:
        return self.request.request_id


class RoutedEngine:
    """Engine replicas behind the AsyncEngine interface (see the module docstring).

    replicas: handles with `generate(request)` (streaming; ADMITTED / OUTPUT / REFUSED messages) and `stats()`;
    `call(handle, method, *args, stream=False)` makes a call and returns an awaitable (or an async iterator
    with stream=True) with a `cancel()` method -- it adapts the handle type (Ray Serve handles by default).
    admit_timeout_s: a replica that does not admit a request within it is treated as failed.
    """

    def __init__(self, replicas: list, *, tokenizer, config, max_model_len: int, call,
                 router: PrefixRouter | None = None, page_size: int = PAGE_SIZE, poll_s: float = 1.0,
                 admit_timeout_s: float = 60.0) -> None:
        self.replicas = list(replicas)
        self.tokenizer = tokenizer
        self.config = config
        self.max_model_len = max_model_len
        self.router = router or PrefixRouter(len(self.replicas))
        if self.router.num_replicas != len(self.replicas):
            raise ValueError(f"the router has {self.router.num_replicas} replicas, the engine "
                             f"{len(self.replicas)}")
        self.page_size = page_size
        self.poll_s = poll_s
        self.admit_timeout_s = admit_timeout_s
        self._call = call
        self.down: set[int] = set()
        self.replica_stats: list[dict] = [{} for _ in self.replicas]
        self.failures = 0                      # replica failures seen by requests
        self.retried = 0                       # requests moved to another replica before any output
        self._streams: dict[str, RoutedStream] = {}
        self._poller: asyncio.Task | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll_forever())

    def shutdown(self, timeout: float = 30.0) -> None:
        if self._poller is not None:
            self._poller.cancel()
            self._poller = None
        for s in list(self._streams.values()):
            self._cancel(s)

    @property
    def is_running(self) -> bool:
        return len(self.down) < len(self.replicas)

    @property
    def dead(self) -> str | None:
        """Why nothing can be served (every replica down), else None (the app shows it in its 503s)."""
        if self.is_running:
            return None
        return f"all {len(self.replicas)} engine replicas are down; Ray Serve restarts them: retry later"

    def stats(self) -> dict:
        """Sums over the replicas' latest stats (numbers only), plus `replicas` and `replicas_up`."""
        total: dict = {}
        for s in self.replica_stats:
            for k, v in s.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "pid":
                    total[k] = total.get(k, 0) + v
        total["replicas"] = len(self.replicas)
        total["replicas_up"] = len(self.replicas) - len(self.down)
        return total

    # ------------------------------------------------------------------ health
    async def _poll_forever(self) -> None:
        while True:
            await self.poll()
            await asyncio.sleep(self.poll_s)

    async def poll(self) -> None:
        """Ask every replica for its stats (bounded by poll_s, at least 5 s): update up/down and the router."""
        async def one(i: int):
            try:
                return await asyncio.wait_for(self._call(self.replicas[i], "stats"), max(5.0, self.poll_s))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - dead, restarting or unreachable: all mean down
                return e

        results = await asyncio.gather(*(one(i) for i in range(len(self.replicas))))
        for i, s in enumerate(results):
            if isinstance(s, Exception):
                if i not in self.down:
                    logger.warning("replica %d does not answer (%s): routing around it", i, s)
                self._mark_down(i)
                continue
            old = self.replica_stats[i]
            if old.get("pid") is not None and old.get("pid") != s.get("pid"):
                logger.warning("replica %d restarted (pid %s -> %s): its prefix cache is empty", i,
                               old.get("pid"), s.get("pid"))
                self.router.forget(i)
            elif old and s.get("prefix_cache_evictions", 0) > old.get("prefix_cache_evictions", 0):
                # which entries went is not reported: the least recently routed ones are the likeliest
                self.router.forget_oldest(i, s["prefix_cache_evictions"] - old.get("prefix_cache_evictions", 0))
            if i in self.down:
                logger.info("replica %d is back", i)
                self.down.discard(i)
            self.replica_stats[i] = dict(s)

    def _mark_down(self, i: int) -> None:
        self.down.add(i)
        self.router.forget(i)

    # ------------------------------------------------------------------ requests
    def _unavailable(self, why: str) -> APIError:
        return APIError(f"no engine replica can take the request ({why}): retry later", status=503,
                        type="service_unavailable", code="replica_unavailable")

    async def _open(self, request, keys: list[int], tried: set[int]) -> tuple[int, Any]:
        """Route and submit `request` until a replica admits it: (replica, its stream of messages)."""
        while True:
            exclude = tried | self.down
            if len(exclude) >= len(self.replicas):
                raise self._unavailable(f"{len(self.down)} of {len(self.replicas)} replicas down, "
                                        f"{len(tried)} failed for this request")
            d = self.router.route(keys, exclude)
            gen = self._call(self.replicas[d.replica], "generate", request, stream=True)
            try:
                tag, payload = await asyncio.wait_for(gen.__anext__(), self.admit_timeout_s)
            except asyncio.CancelledError:
                self.router.finished(d.replica)
                _cancel_quietly(gen)
                raise
            except Exception as e:  # noqa: BLE001 - any failure to admit: try another replica
                self.router.finished(d.replica)
                _cancel_quietly(gen)
                logger.warning("replica %d failed to admit %s (%s): trying another", d.replica,
                               request.request_id, e)
                self.failures += 1
                tried.add(d.replica)
                self._mark_down(d.replica)
                continue
            if tag == REFUSED:
                self.router.finished(d.replica)
                kind, message = payload
                raise (QueueFullError(message) if kind == "queue_full" else RequestError(message))
            if tag != ADMITTED:
                self.router.finished(d.replica)
                _cancel_quietly(gen)
                raise ReplicaFailed(f"replica {d.replica} answered {tag!r} before admitting the request")
            return d.replica, gen

    async def add(self, request) -> RoutedStream:
        """Route and submit a request; returns once a replica admitted it. Raises RequestError / QueueFullError
        as the replica's engine refused it, or a 503 APIError when no replica is available."""
        keys = page_keys(request.prompt_ids, self.page_size)
        tried: set[int] = set()
        replica, gen = await self._open(request, keys, tried)
        stream = RoutedStream(request, replica, gen, tried)
        self._streams[request.request_id] = stream
        return stream

    async def outputs(self, stream: RoutedStream) -> AsyncIterator[Any]:
        """Yield the request's RequestOutputs until the finished one. A replica failure before any output
        resubmits the request to another replica; after output, it raises ReplicaFailed. Leaving early
        cancels the request on its replica."""
        try:
            while True:
                try:
                    tag, payload = await stream.gen.__anext__()
                except StopAsyncIteration:
                    raise ReplicaFailed(f"replica {stream.replica} ended request {stream.request_id} without "
                                        "its last output") from None
                except (asyncio.CancelledError, GeneratorExit):
                    raise
                except Exception as e:  # noqa: BLE001 - Ray's actor-died / task errors: the replica failed
                    self.failures += 1
                    self._mark_down(stream.replica)
                    self.router.finished(stream.replica)
                    stream.released = True
                    if stream.yielded:
                        raise ReplicaFailed(f"replica {stream.replica} failed during the request after "
                                            f"{stream.yielded} outputs ({type(e).__name__}); retry it") from None
                    logger.warning("replica %d failed before %s produced output (%s): resubmitting",
                                   stream.replica, stream.request_id, type(e).__name__)
                    stream.tried.add(stream.replica)
                    keys = page_keys(stream.request.prompt_ids, self.page_size)
                    stream.replica, stream.gen = await self._open(stream.request, keys, stream.tried)
                    stream.released = False
                    self.retried += 1
                    continue
                if tag != OUTPUT:
                    raise ReplicaFailed(f"replica {stream.replica} sent {tag!r} mid-request")
                for out in payload:                # the outputs the replica had queued, in order
                    stream.yielded += 1
                    yield out
                    if out.finished:
                        stream.finished = True
                        return
        finally:
            if not stream.finished:
                self._cancel(stream)
            self._release(stream)

    def abort(self, request_id: str) -> None:
        stream = self._streams.get(request_id)
        if stream is not None and not stream.finished:
            self._cancel(stream)
            self._release(stream)

    def _cancel(self, stream: RoutedStream) -> None:
        # cancelling the replica's stream cancels its generator there, whose `finally` aborts the request
        _cancel_quietly(stream.gen)

    def _release(self, stream: RoutedStream) -> None:
        if not stream.released:
            stream.released = True
            self.router.finished(stream.replica)
        self._streams.pop(stream.request_id, None)


def _cancel_quietly(gen) -> None:
    cancel = getattr(gen, "cancel", None)
    if cancel is not None:
        try:
            cancel()
        except Exception:                      # already finished or its replica is gone
            logger.debug("cancel failed", exc_info=True)


class RouterMetricsCollector:
    """Prometheus families of the router: `sala_router_requests_total{reason}`, in-flight requests and the
    up state per replica."""

    def __init__(self, engine: RoutedEngine) -> None:
        self.engine = engine

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        e = self.engine
        routed = CounterMetricFamily("sala_router_requests", "Requests routed, by reason (affinity: to the "
                                     "replica holding the longest cached prefix; least_loaded: otherwise)",
                                     labels=["reason"])
        for reason, n in sorted(e.router.routed.items()):
            routed.add_metric([reason], float(n))
        inflight = GaugeMetricFamily("sala_replica_requests_in_flight", "Requests in flight per replica",
                                     labels=["replica"])
        up = GaugeMetricFamily("sala_replica_up", "1 while the replica answers, 0 while it is down",
                               labels=["replica"])
        for i in range(len(e.replicas)):
            inflight.add_metric([str(i)], float(e.router.inflight[i]))
            up.add_metric([str(i)], 0.0 if i in e.down else 1.0)
        failures = CounterMetricFamily("sala_replica_failures", "Replica failures seen by requests",
                                       value=float(e.failures))
        retried = CounterMetricFamily("sala_router_retries", "Requests resubmitted to another replica before "
                                      "any output", value=float(e.retried))
        return [routed, inflight, up, failures, retried]


class RetryAfter503:
    """ASGI middleware: every 503 response gets `Retry-After: <seconds>` (a replica down or a full queue is
    temporary)."""

    def __init__(self, app, seconds: int = 1) -> None:
        self.app = app
        self.header = (b"retry-after", str(seconds).encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message):
            if message["type"] == "http.response.start" and message.get("status") == 503:
                headers = list(message.get("headers") or [])
                if not any(k.lower() == b"retry-after" for k, _ in headers):
                    headers.append(self.header)
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_header)
