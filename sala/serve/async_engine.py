"""AsyncEngine: an EngineCore driven by one background thread, fed and read from asyncio.

EngineCore is single-threaded. One thread owns it: it takes new requests and aborts from a thread-safe inbox
between steps, runs `step()` while work exists (and sleeps on the inbox when there is none), and hands each
step's RequestOutputs to the asyncio queues of their requests with one `loop.call_soon_threadsafe` per step. An
abort posted while a step runs is applied before the next step, so a cancelled request stops within one step.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

# How long the engine thread sleeps on an empty inbox when no request is unfinished: only bounds how quickly
# `shutdown()` is noticed (new work wakes the thread at once).
_IDLE_WAIT_S = 0.5


@dataclass
class _Add:
    request: Any                                 # sala.engine.requests.Request
    stream: RequestStream
    admitted: concurrent.futures.Future


@dataclass
class _Abort:
    request_id: str


@dataclass
class RequestStream:
    """The outputs of one request as they arrive on the event loop; `finished` once the last one is in."""

    request_id: str
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    finished: bool = False


def _put_all(items: list[tuple[asyncio.Queue, Any]]) -> None:
    for q, out in items:
        q.put_nowait(out)


def use_engine_device(core) -> None:
    """Make the engine's CUDA device current in the calling thread or process (the current device is per thread:
    graphs and streams must be on the engine's, cuda:1, ...); nothing on other devices."""
    device = getattr(core, "device", None)
    if device is not None and getattr(device, "type", None) == "cuda":
        import torch

        torch.cuda.set_device(device)


class StreamingEngine:
    """What the app needs of any engine driver on the asyncio side: the RequestStreams of admitted requests,
    `outputs()` / `generate()`, and the hand-over of a step's outputs from the driver's thread to the event loop
    (`_deliver`, `_fail_all`). Subclasses implement `add`, `abort`, `start`, `shutdown`, `is_running`, `stats`."""

    _streams: dict[str, tuple[RequestStream, asyncio.AbstractEventLoop]]

    async def add(self, request) -> RequestStream:       # pragma: no cover - abstract
        raise NotImplementedError

    def abort(self, request_id: str) -> None:            # pragma: no cover - abstract
        raise NotImplementedError

    async def _admission(self, request, stream: RequestStream, admitted: concurrent.futures.Future
                         ) -> RequestStream:
        """Wait for the driver's verdict on a submitted request: its stream, or the driver's exception (the stream
        dropped); a client that leaves meanwhile aborts it."""
        try:
            await asyncio.wrap_future(admitted)
        except asyncio.CancelledError:           # the client left while the request was being admitted
            self.abort(request.request_id)
            raise
        except BaseException:
            self._streams.pop(request.request_id, None)
            raise
        return stream

    async def generate(self, request) -> AsyncIterator[Any]:
        """Submit `request` and yield its RequestOutputs until the finished one (see `outputs`)."""
        stream = await self.add(request)
        async for out in self.outputs(stream):
            yield out

    async def outputs(self, stream: RequestStream) -> AsyncIterator[Any]:
        """Yield an admitted request's RequestOutputs until the finished one. Leaving the loop early (client
        gone, task cancelled) aborts the request."""
        try:
            while True:
                out = await stream.queue.get()
                if isinstance(out, BaseException):
                    stream.finished = True
                    raise out
                yield out
                if out.finished:
                    stream.finished = True
                    return
        finally:
            if not stream.finished:
                logger.info("request %s cancelled by its client: aborting", stream.request_id)
                self.abort(stream.request_id)

    def _streams_put(self, stream: RequestStream, loop: asyncio.AbstractEventLoop) -> None:
        self._streams[stream.request_id] = (stream, loop)

    def _deliver(self, outputs: list) -> None:
        """Hand a step's outputs to their requests' queues: one event-loop wake-up per loop and step, not one per
        output (the server shares the interpreter with the thread calling this)."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outputs:
            entry = self._streams.get(out.request_id)
            if entry is None:                    # aborted: nobody is listening
                continue
            stream, loop = entry
            if out.finished:
                self._streams.pop(out.request_id, None)
            by_loop.setdefault(loop, []).append((stream.queue, out))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:                 # the event loop is closed (server shutting down)
                pass

    def _fail_all(self, error: BaseException) -> None:
        for request_id, (stream, loop) in list(self._streams.items()):
            self._streams.pop(request_id, None)
            try:
                loop.call_soon_threadsafe(stream.queue.put_nowait, error)
            except RuntimeError:
                pass


class AsyncEngine(StreamingEngine):
    """Runs `core.step()` in a background thread; `generate()` yields a request's RequestOutputs in asyncio.

    `on_step(stats)` (optional) is called in the engine thread after each step with `core.stats()` (metrics).
    """

    def __init__(self, core, on_step: Callable[[dict], None] | None = None) -> None:
        self.core = core
        self.tokenizer = core.tokenizer
        self.config = core.config
        self.max_model_len = core.max_model_len
        self._on_step = on_step
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[RequestStream, asyncio.AbstractEventLoop]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stats_lock = threading.Lock()
        self._stats: dict = dict(core.stats())
        self.steps = 0
        self.dead: BaseException | None = None   # set when step() raised: the engine is unusable

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="sala-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.dead is None

    def stats(self) -> dict:
        """The latest `core.stats()` snapshot (taken in the engine thread after each step)."""
        with self._stats_lock:
            return dict(self._stats)

    # ------------------------------------------------------------------ asyncio side
    async def add(self, request) -> RequestStream:
        """Submit a request; returns once the engine accepted it. Raises what `core.add_request` raises
        (RequestError: can never fit; QueueFullError: the waiting queue is full)."""
        if not self.is_running:
            raise RuntimeError("the engine is not running" + (f": {self.dead}" if self.dead else ""))
        stream = RequestStream(request.request_id)
        admitted: concurrent.futures.Future = concurrent.futures.Future()
        self._streams_put(stream, asyncio.get_running_loop())   # before the engine thread can look for it
        self._inbox.put(_Add(request, stream, admitted))
        return await self._admission(request, stream, admitted)

    def abort(self, request_id: str) -> None:
        """Cancel a request (thread-safe); its outputs stop and its memory is freed by the next step."""
        entry = self._streams.pop(request_id, None)
        if entry is not None:
            entry[0].finished = True
        self._inbox.put(_Abort(request_id))

    # ------------------------------------------------------------------ engine thread
    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=_IDLE_WAIT_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _apply(self, item) -> None:
        if item is None:
            return
        if isinstance(item, _Abort):
            try:
                self.core.abort(item.request_id)
            except Exception:                    # an unknown or finished id: nothing to free
                logger.debug("abort of %s ignored", item.request_id, exc_info=True)
            return
        # _Add: a request whose client already left (aborted before admission) is dropped here.
        if not item.admitted.set_running_or_notify_cancel():
            return
        if item.request.request_id not in self._streams:
            item.admitted.set_exception(RuntimeError("request cancelled before it was admitted"))
            return
        try:
            self.core.add_request(item.request)
        except BaseException as e:
            item.admitted.set_exception(e)
        else:
            item.admitted.set_result(None)

    def _snapshot(self) -> None:
        stats = dict(self.core.stats())
        with self._stats_lock:
            self._stats = stats
        if self._on_step is not None:
            try:
                self._on_step(stats)
            except Exception:
                logger.exception("metrics callback failed")

    def _run(self) -> None:
        use_engine_device(self.core)
        logger.info("engine thread started")
        while not self._stop.is_set():
            self._drain_inbox(block=not self.core.has_unfinished())
            if self._stop.is_set():
                break
            if not self.core.has_unfinished():
                self._snapshot()
                continue
            try:
                t0 = time.perf_counter()
                outputs = self.core.step()
                self.steps += 1
                logger.debug("step %d: %d outputs in %.1f ms", self.steps, len(outputs),
                             (time.perf_counter() - t0) * 1e3)
            except BaseException as e:           # a bug in the engine: fail every request, stop serving
                logger.exception("engine step failed; the server answers 503 from now on")
                self.dead = e
                self._fail_all(RuntimeError(f"engine step failed: {e}"))
                return
            self._deliver(outputs)
            self._snapshot()
        logger.info("engine thread stopped")
