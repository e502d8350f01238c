"""ProcessEngine: the EngineCore in a process of its own (as vLLM v1 runs its EngineCore), fed and read from asyncio.

The thread engine (`AsyncEngine`) steps the EngineCore in a thread of the server process, so the engine's Python
(scheduling, sampling, detokenizing, launching kernels) and the server's (uvicorn, FastAPI, one SSE chunk per
token per stream) take turns on one interpreter lock. ProcessEngine moves the step loop into a child process
(multiprocessing "spawn": CUDA cannot fork) that builds the EngineCore itself, so the two only meet at a pipe.
It has the AsyncEngine interface the app uses (`add / abort / outputs / generate / stats / start / shutdown /
is_running / dead / steps`, `tokenizer / config / max_model_len`).

IPC: two one-way multiprocessing Pipes of pickled tuples.

    parent -> child   ("add", seq, Request)      admit a request (seq: the parent's number for its verdict)
                      ("abort", request_id)      cancel a request (unknown or finished ids are ignored)
                      ("stop",)                  leave the loop and exit
    child -> parent   ("ready", info)            built: tokenizer, config, max_model_len, stats, pid, device
                      ("failed", message, tb)    the EngineCore could not be built (the child exits)
                      ("admitted", [(seq, None | (kind, message)), ...])
                                                 the verdicts of the adds just applied, sent before the next step;
                                                 kind "request" -> RequestError, "queue_full" -> QueueFullError
                      ("step", steps, [RequestOutput, ...], stats | None)
                                                 ONE message per step: its outputs, and a `core.stats()` snapshot
                                                 when a request finished, when the engine goes idle, or at least
                                                 every `stats_interval_s` (None otherwise)
                      ("stats", stats)           a snapshot that changed while idle
                      ("dead", message)          `step()` raised: every request fails, the child exits
                      ("stopped",)               after ("stop",)

The child takes everything queued on its input pipe between steps (and blocks on it when no request is
unfinished), so an abort is applied before the next step, as in the thread engine. In the parent, one writer
thread sends (a send can block while the child is inside a step and the pipe is full: never on the event loop),
and one reader thread receives, resolves the `add` futures with the child's verdicts (re-raised as the same
RequestError / QueueFullError with the same message), and hands each step's outputs to the asyncio queues of
their requests with one `loop.call_soon_threadsafe` per message (`StreamingEngine._deliver`).

Lifecycle: the constructor starts the child and waits for "ready" (a "failed" or a child that exits raises
EngineProcessError with the child's message; nothing waits forever on a dead child). A child that dies later
marks the engine dead (the app answers 503). `shutdown()` sends "stop", joins the child, and terminates (then
kills) it only if it does not exit in time; the child is a daemon, ignores SIGINT (the parent's Ctrl-C drives the
stop), and exits on its own when the parent's end of the pipe closes. Its logs go to stderr at the parent's level.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import multiprocessing
import queue
import threading
import time

from sala.serve.async_engine import RequestStream, StreamingEngine, use_engine_device

logger = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"
# A stats snapshot rides on a step message at least this often while requests run (and always when one finishes
# or the engine goes idle): not pickled and sent on every step of a long decode.
STATS_INTERVAL_S = 0.05
# How long `start()` waits for the child to build the EngineCore (loading weights, capturing CUDA graphs).
STARTUP_TIMEOUT_S = 1800.0


class EngineProcessError(RuntimeError):
    """The engine process failed to start, or is gone."""


def _refusal(kind: str, message: str) -> BaseException:
    """The parent's exception for a refused add: the engine's own types and messages."""
    from sala.engine.requests import QueueFullError, RequestError

    if kind == "request":
        return RequestError(message)
    if kind == "queue_full":
        return QueueFullError(message)
    return RuntimeError(message)


def _resolve(fut: concurrent.futures.Future, error: BaseException | None = None) -> None:
    """Set a verdict future unless its waiter already gave up (cancelled)."""
    if not fut.set_running_or_notify_cancel():
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)


# ---------------------------------------------------------------------------------------------------- child
def _engine_main(model: str, engine_kwargs: dict, inbox, outbox, log_level: int, stats_interval_s: float) -> None:
    """The child process: build the EngineCore, report ready (or failed), then run the step loop."""
    import signal
    import sys
    import traceback

    signal.signal(signal.SIGINT, signal.SIG_IGN)      # Ctrl-C reaches the whole process group: the parent stops us
    logging.basicConfig(level=log_level, format=LOG_FORMAT, stream=sys.stderr)
    try:
        from sala.engine.scheduler import EngineCore

        core = EngineCore.from_pretrained(model, **engine_kwargs)
        use_engine_device(core)
        device = getattr(core, "device", None)
        outbox.send(("ready", {"tokenizer": core.tokenizer, "config": core.config,
                               "max_model_len": core.max_model_len, "stats": dict(core.stats()),
                               "pid": multiprocessing.current_process().pid, "device": str(device)}))
    except BaseException as e:  # noqa: BLE001 - whatever it is, the parent must hear it and not wait
        try:
            outbox.send(("failed", f"{type(e).__name__}: {e}", traceback.format_exc()))
        except Exception:  # noqa: BLE001 - the parent is gone
            pass
        raise SystemExit(1) from None
    logger.info("engine process %d ready: %s on %s, max_model_len %d", multiprocessing.current_process().pid,
                model, device, core.max_model_len)
    try:
        _step_loop(core, inbox, outbox, stats_interval_s)
    except (EOFError, OSError):                       # the parent closed its end: it is gone or went away
        logger.info("engine process: the server is gone, exiting")
        return
    logger.info("engine process stopped")


def _step_loop(core, inbox, outbox, stats_interval_s: float) -> None:
    from sala.engine.requests import QueueFullError, RequestError

    steps = 0
    last_stats: dict | None = None
    last_stats_t = 0.0
    while True:
        messages = [] if core.has_unfinished() else [inbox.recv()]     # idle: sleep on the pipe
        while inbox.poll(0):
            messages.append(inbox.recv())
        verdicts = []
        stop = False
        for msg in messages:
            kind = msg[0]
            if kind == "add":
                _, seq, request = msg
                try:
                    core.add_request(request)
                except RequestError as e:
                    verdicts.append((seq, ("request", str(e))))
                except QueueFullError as e:
                    verdicts.append((seq, ("queue_full", str(e))))
                except Exception as e:  # noqa: BLE001 - a bug: that request fails, the engine goes on
                    logger.exception("add_request failed")
                    verdicts.append((seq, ("error", f"{type(e).__name__}: {e}")))
                else:
                    verdicts.append((seq, None))
            elif kind == "abort":
                try:
                    core.abort(msg[1])
                except Exception:  # noqa: BLE001 - an unknown or finished id: nothing to free
                    logger.debug("abort of %s ignored", msg[1], exc_info=True)
            elif kind == "stop":
                stop = True
                break
        if verdicts:
            outbox.send(("admitted", verdicts))
        if stop:
            outbox.send(("stopped",))
            return
        if not core.has_unfinished():
            stats = dict(core.stats())
            if stats != last_stats:
                outbox.send(("stats", stats))
                last_stats, last_stats_t = stats, time.monotonic()
            continue
        try:
            t0 = time.perf_counter()
            outputs = core.step()
        except Exception as e:  # noqa: BLE001 - a bug in the engine: fail every request, stop serving
            logger.exception("engine step failed; the server answers 503 from now on")
            outbox.send(("dead", f"engine step failed: {e}"))
            return
        steps += 1
        now = time.monotonic()
        stats = None
        if (now - last_stats_t >= stats_interval_s or not core.has_unfinished()
                or any(o.finished for o in outputs)):
            stats = dict(core.stats())
            last_stats, last_stats_t = stats, now
        outbox.send(("step", steps, outputs, stats))
        logger.debug("step %d: %d outputs in %.1f ms", steps, len(outputs), (time.perf_counter() - t0) * 1e3)


# --------------------------------------------------------------------------------------------------- parent
class ProcessEngine(StreamingEngine):
    """An EngineCore stepped in a child process (see the module docstring), with AsyncEngine's interface.

    model, engine_kwargs: `EngineCore.from_pretrained(model, **engine_kwargs)` in the child (the parent never loads
    the weights; it receives the tokenizer, config and max_model_len the child's engine uses).
    log_level: the child's logging level (default: this process's root logger level).
    The constructor starts the child and returns once it is ready (`start=False`: call `start()` later).
    """

    def __init__(self, model, engine_kwargs: dict | None = None, *, log_level: int | None = None,
                 startup_timeout: float | None = STARTUP_TIMEOUT_S, stats_interval_s: float = STATS_INTERVAL_S,
                 start: bool = True) -> None:
        self.model = str(model)
        self.engine_kwargs = dict(engine_kwargs or {})
        self.log_level = logging.getLogger().getEffectiveLevel() if log_level is None else log_level
        self.startup_timeout = startup_timeout
        self.stats_interval_s = stats_interval_s
        self.tokenizer = None
        self.config = None
        self.max_model_len = 0
        self.device: str | None = None
        self.pid: int | None = None
        self.exitcode: int | None = None         # the last child's, once it exited
        self.steps = 0
        self.dead: BaseException | None = None   # set when the child failed or died: the engine is unusable
        self._streams: dict[str, tuple[RequestStream, asyncio.AbstractEventLoop]] = {}
        self._pending: dict[int, concurrent.futures.Future] = {}
        self._seq = itertools.count()
        self._lock = threading.Lock()            # _pending / _streams registration vs the reader's final sweep
        self._closed = True
        self._stopping = False
        self._stats: dict = {}
        self._stats_lock = threading.Lock()
        self._proc = None
        self._send_q: queue.SimpleQueue | None = None
        self._to_child = None
        self._from_child = None
        self._reader: threading.Thread | None = None
        self._writer: threading.Thread | None = None
        if start:
            self.start()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the child and wait until it is ready; EngineProcessError with the child's message if it fails.
        A no-op while a child runs."""
        if self._proc is not None:
            if self.is_running:
                return
            self.shutdown(timeout=5)              # a dead child: clean up, then start a fresh one
        ctx = multiprocessing.get_context("spawn")
        child_in, to_child = ctx.Pipe(duplex=False)
        from_child, child_out = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_engine_main, name="sala-engine", daemon=True,
                           args=(self.model, self.engine_kwargs, child_in, child_out, self.log_level,
                                 self.stats_interval_s))
        proc.start()
        child_in.close()                          # the child's ends: closed here so that its exit reads as EOF
        child_out.close()
        try:
            info = self._wait_ready(proc, from_child)
        except BaseException:
            _stop_process(proc, 0)
            to_child.close()
            from_child.close()
            self.exitcode = proc.exitcode
            raise
        self.tokenizer = info["tokenizer"]
        self.config = info["config"]
        self.max_model_len = int(info["max_model_len"])
        self.device = info.get("device")
        self.pid = info.get("pid", proc.pid)
        with self._stats_lock:
            self._stats = dict(info["stats"])
        self.steps = 0
        self.dead = None
        self.exitcode = None
        self._stopping = False
        self._closed = False
        self._proc, self._to_child, self._from_child = proc, to_child, from_child
        self._send_q = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write, args=(self._send_q, to_child), daemon=True,
                                        name="sala-engine-writer")
        self._reader = threading.Thread(target=self._read, args=(from_child, proc), daemon=True,
                                        name="sala-engine-reader")
        self._writer.start()
        self._reader.start()
        logger.info("engine process %s ready (%s, max_model_len %d)", self.pid, self.device, self.max_model_len)

    def _wait_ready(self, proc, conn) -> dict:
        deadline = None if self.startup_timeout is None else time.monotonic() + self.startup_timeout
        while True:
            if conn.poll(0.1):
                try:
                    msg = conn.recv()
                except (EOFError, OSError):       # it exited without a word (killed, or died in the interpreter)
                    proc.join(5)
                    raise EngineProcessError(f"the engine process exited during startup (exit code "
                                             f"{proc.exitcode}); see its log above") from None
                if msg[0] == "ready":
                    return msg[1]
                if msg[0] == "failed":
                    proc.join(10)                 # it exits right after saying so
                    logger.debug("engine process traceback:\n%s", msg[2])
                    raise EngineProcessError(f"the engine process failed to start: {msg[1]}")
                raise EngineProcessError(f"the engine process sent {msg[0]!r} before it was ready")
            if not proc.is_alive() and not conn.poll(0):
                raise EngineProcessError(f"the engine process exited during startup (exit code {proc.exitcode}); "
                                         "see its log above")
            if deadline is not None and time.monotonic() > deadline:
                raise EngineProcessError(f"the engine process was not ready within {self.startup_timeout:.0f} s")

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the child (a stop message, then terminate / kill only if it does not exit within `timeout`) and
        the parent's threads. Requests still running fail. Idempotent."""
        proc = self._proc
        if proc is None:
            return
        self._stopping = True
        if self._send_q is not None:
            self._send_q.put(("stop",))
            self._send_q.put(None)                # the writer's own stop, after the child's
        if self._writer is not None:
            self._writer.join(timeout)
        _stop_process(proc, timeout)
        if self._reader is not None:
            self._reader.join(5)
        for conn in (self._to_child, self._from_child):
            if conn is not None:
                conn.close()
        self.exitcode = proc.exitcode
        self._proc = self._reader = self._writer = self._send_q = self._to_child = self._from_child = None
        logger.info("engine process %s exited (code %s)", self.pid, self.exitcode)

    @property
    def is_running(self) -> bool:
        proc = self._proc
        return proc is not None and not self._stopping and self.dead is None and proc.is_alive()

    @property
    def process(self):
        """The child (multiprocessing.Process) while started, else None."""
        return self._proc

    def stats(self) -> dict:
        """The latest `core.stats()` snapshot the child sent."""
        with self._stats_lock:
            return dict(self._stats)

    # ------------------------------------------------------------------ asyncio side
    async def add(self, request) -> RequestStream:
        """Submit a request; returns once the child's engine accepted it. Raises what `core.add_request` raised
        there (RequestError: can never fit; QueueFullError: the waiting queue is full), same types and messages."""
        if not self.is_running:
            raise RuntimeError("the engine is not running" + (f": {self.dead}" if self.dead else ""))
        stream = RequestStream(request.request_id)
        admitted: concurrent.futures.Future = concurrent.futures.Future()
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is not running" + (f": {self.dead}" if self.dead else ""))
            seq = next(self._seq)
            self._pending[seq] = admitted
            self._streams_put(stream, loop)       # before the child's first output can arrive
        self._send_q.put(("add", seq, request))
        return await self._admission(request, stream, admitted)

    def abort(self, request_id: str) -> None:
        """Cancel a request (thread-safe); its outputs stop and the child frees its memory before its next step."""
        entry = self._streams.pop(request_id, None)
        if entry is not None:
            entry[0].finished = True
        q = self._send_q
        if q is not None and not self._closed:
            q.put(("abort", request_id))

    # ------------------------------------------------------------------ parent threads
    def _write(self, q: queue.SimpleQueue, conn) -> None:
        """Send the queued messages to the child, in order (blocks while the pipe is full, off the event loop)."""
        while True:
            msg = q.get()
            if msg is None:
                return
            try:
                conn.send(msg)
            except Exception as e:  # noqa: BLE001 - the child is gone (the reader marks the engine dead) or unpicklable
                logger.debug("could not send %r to the engine process", msg[0], exc_info=True)
                if msg[0] == "add":
                    with self._lock:
                        fut = self._pending.pop(msg[1], None)
                    if fut is not None:
                        _resolve(fut, RuntimeError(f"could not send the request to the engine process: {e}"))

    def _read(self, conn, proc) -> None:
        """Receive the child's messages until it stops or dies; then fail whatever still waits."""
        reason: str | None = None
        try:
            while True:
                msg = conn.recv()
                kind = msg[0]
                if kind == "step":
                    _, steps, outputs, stats = msg
                    if stats is not None:         # before the outputs: a finished request's counts are in
                        with self._stats_lock:
                            self._stats = stats
                    self.steps = steps
                    self._deliver(outputs)
                elif kind == "admitted":
                    for seq, refusal in msg[1]:
                        with self._lock:
                            fut = self._pending.pop(seq, None)
                        if fut is not None:
                            _resolve(fut, None if refusal is None else _refusal(*refusal))
                elif kind == "stats":
                    with self._stats_lock:
                        self._stats = msg[1]
                elif kind == "dead":
                    reason = msg[1]
                    if not self._stopping and self.dead is None:
                        logger.error("%s; the server answers 503 from now on", reason)
                        self.dead = EngineProcessError(reason)
                elif kind == "stopped":
                    break
        except (EOFError, OSError):
            pass
        except Exception:  # noqa: BLE001 - a message that does not unpickle: a bug; the engine cannot go on
            logger.exception("engine process reader failed")
            reason = "the engine process sent a message the server could not read (logged)"
        if not self._stopping and self.dead is None:
            if reason is None:
                proc.join(5)
                reason = f"the engine process exited unexpectedly (exit code {proc.exitcode})"
            logger.error("%s; the server answers 503 from now on", reason)
            self.dead = EngineProcessError(reason)
        with self._lock:
            self._closed = True
            pending = list(self._pending.values())
            self._pending.clear()
        error = RuntimeError(str(self.dead) if self.dead is not None else "the engine was shut down")
        for fut in pending:
            _resolve(fut, error)
        self._fail_all(error)


def _stop_process(proc, timeout: float) -> None:
    """Join `proc` for `timeout` s; then terminate it, and kill it if it still runs (no orphans)."""
    proc.join(timeout)
    if proc.is_alive():
        if timeout > 0:
            logger.warning("engine process %s did not exit within %.0f s: terminating it", proc.pid, timeout)
        proc.terminate()
        proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join(5)

