"""The FastAPI app: OpenAI-compatible routes over an AsyncEngine (or a ProcessEngine, a RoutedEngine).

    GET  /v1/models            the served model
    GET  /health               200 while the engine runs, 503 after an engine failure
    GET  /metrics              Prometheus text
    POST /v1/completions       text / token-id prompts, n, echo, logprobs, stop, seed, stream (SSE)
    POST /v1/chat/completions  messages through the chat template, stream with stream_options.include_usage

Errors are OpenAI's JSON shape {"error": {"message", "type", "param", "code"}}: 400 bad parameters or a prompt
too long (both numbers), 401 wrong or missing key with --api-key, 404 unknown model or route, 503 waiting queue
full. Anything else is a bug: logged with its traceback, answered 500 without one.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from sala.serve.async_engine import AsyncEngine
from sala.serve.chat import ChatTemplate
from sala.serve.choices import Choice, TokenText, chat_logprobs, completion_logprobs, speculative_stats, usage
from sala.serve.metrics import CONTENT_TYPE, ServerMetrics
from sala.serve.prompts import PromptInput, check_length, completion_prompts, encode_text, sampling_params
from sala.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest

logger = logging.getLogger(__name__)


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


class _APIKeyMiddleware:
    """ASGI middleware: /v1/* needs `Authorization: Bearer <key>` (checked before the body is read)."""

    def __init__(self, app, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                err = APIError("missing or incorrect API key (send 'Authorization: Bearer <key>')", status=401,
                               code="invalid_api_key")
                await _error_response(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _EventStream(StreamingResponse):
    """Server-sent events whose generator is closed however the response ends, so that a client that
    disconnects mid-stream runs its `finally` (which aborts the engine requests) at once."""

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('ctx', {}).get('error', msg)}", None
    return (f"{param}: {msg}" if param else msg), param


class _Timing:
    """Latency metrics of one sequence as its client sees them: TTFT, inter-token latency, end-to-end, all from
    the HTTP request's arrival (`start`, perf_counter seconds)."""

    def __init__(self, metrics: ServerMetrics, start: float) -> None:
        self.metrics = metrics
        self.start = start
        self.last: float | None = None

    def tokens(self, n: int) -> None:
        if n <= 0:
            return
        now = time.perf_counter()
        if self.last is None:
            self.metrics.ttft.observe(now - self.start)
        else:
            self.metrics.itl.observe(now - self.last)
        self.last = now

    def finished(self, reason: str | None) -> None:
        self.metrics.request_latency.observe(time.perf_counter() - self.start)
        self.metrics.requests.labels(finish_reason=reason or "unknown").inc()


def _usage_fields(choices: list[Choice]) -> dict:
    """A response's "usage", and its "speculative" counts when the engine speculates."""
    st = speculative_stats(choices)
    return {"usage": usage(choices)} if st is None else {"usage": usage(choices), "speculative": st}


def build_app(engine: AsyncEngine, *, model_name: str, api_key: str | None = None,
              chat_template: ChatTemplate | None = None, manage_engine: bool = True) -> FastAPI:
    """The app serving `engine` as model `model_name`. With `manage_engine`, the app's lifespan starts the
    engine thread and stops it."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if manage_engine:
            engine.start()
        try:
            yield
        finally:
            if manage_engine:
                engine.shutdown()

    app = FastAPI(title="sala serve", lifespan=lifespan)
    metrics = ServerMetrics(engine.stats)
    template = chat_template or ChatTemplate(None)
    token_text = TokenText(engine.tokenizer)
    vocab_size = int(engine.config.vocab_size)
    created = int(time.time())
    app.state.engine = engine
    app.state.metrics = metrics
    if api_key:
        app.add_middleware(_APIKeyMiddleware, api_key=api_key)

    # ------------------------------------------------------------------ errors
    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        msg, param = _validation_message(exc)
        return _error_response(APIError(msg, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(APIError(str(exc.detail), status=exc.status_code, type=kind))

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        return _error_response(APIError("internal server error (logged by the server)", status=500,
                                        type="internal_server_error"))

    # ------------------------------------------------------------------ helpers
    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(f"the model {name!r} does not exist; this server serves {model_name!r}", status=404,
                           type="not_found_error", param="model", code="model_not_found")

    def make_request(request_id: str, prompt: PromptInput, params, logprobs: int | None,
                     prompt_logprobs: int | None):
        from sala.engine.requests import Request

        return Request(request_id=request_id, prompt_ids=list(prompt.ids), params=params, logprobs=logprobs,
                       prompt_logprobs=prompt_logprobs)

    async def submit(requests: list) -> list:
        """Admit all sub-requests or none (their RequestStreams): the engine's refusals become 400 / 503."""
        from sala.engine.requests import QueueFullError, RequestError

        if not engine.is_running:
            raise APIError("the engine is not running" + (f" ({engine.dead})" if engine.dead else ""),
                           status=503, type="service_unavailable")
        added, streams = [], []
        try:
            for r in requests:
                streams.append(await engine.add(r))
                added.append(r.request_id)
        except BaseException as e:
            for rid in added:
                engine.abort(rid)
            if isinstance(e, RequestError):
                too_long = "length" in str(e) or "memory" in str(e)
                raise APIError(str(e), status=getattr(e, "status", 400),
                               code="context_length_exceeded" if too_long else None) from None
            if isinstance(e, QueueFullError):
                raise APIError(str(e) or "the server is busy: the waiting queue is full, retry later", status=503,
                               type="service_unavailable", code="queue_full") from None
            raise
        return streams

    async def run_all(streams: list, choices: list[Choice], start: float
                      ) -> AsyncIterator[tuple[Choice, str, list]]:
        """Yield (choice, new text, new logprobs) as outputs of any sub-request arrive; cancelling the
        consumer aborts every unfinished sub-request. `start`: the HTTP request's arrival (latency metrics)."""
        queue: asyncio.Queue = asyncio.Queue()
        timings = {c.index: _Timing(metrics, start) for c in choices}

        async def pump(stream, choice: Choice) -> None:
            try:
                async for out in engine.outputs(stream):
                    queue.put_nowait((choice, out))
            except BaseException as e:
                queue.put_nowait((choice, e))
                raise

        tasks = [asyncio.create_task(pump(s, c)) for s, c in zip(streams, choices)]
        pending = len(tasks)
        try:
            while pending:
                choice, out = await queue.get()
                if isinstance(out, asyncio.CancelledError):
                    raise out
                if isinstance(out, RuntimeError):      # the engine thread failed
                    raise APIError(f"generation failed: {out}", status=503, type="service_unavailable")
                if isinstance(out, BaseException):
                    raise out
                text, lps = choice.add(out)
                if not choice.discard_output:
                    timings[choice.index].tokens(len(out.new_token_ids))
                if out.finished:
                    pending -= 1
                    timings[choice.index].finished(choice.finish_reason)
                yield choice, text, lps
        finally:
            for t in tasks:
                if not t.done():
                    t.cancel()
            # let the cancelled pumps run their `finally` (which aborts the engine requests) now
            await asyncio.gather(*tasks, return_exceptions=True)

    async def until_done(events: AsyncIterator, raw: HTTPRequest) -> bool:
        """Consume a non-streamed request's events (True); if the client disconnects first, stop, which aborts
        the engine requests (False)."""
        async def consume():
            async for _ in events:
                pass

        async def disconnected():
            while (await raw.receive())["type"] != "http.disconnect":
                pass

        work, watch = asyncio.create_task(consume()), asyncio.create_task(disconnected())
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not work.done():
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
        if work.cancelled():
            logger.info("client disconnected before its response: request aborted")
            return False
        work.result()
        return True

    def sse(payload: dict) -> str:
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    def streaming(gen: AsyncIterator[str]) -> StreamingResponse:
        async def body():
            try:
                async for chunk in gen:
                    yield chunk
            except APIError as e:                # after the headers went out: an error event, then [DONE]
                yield sse(e.body())
            yield "data: [DONE]\n\n"

        return _EventStream(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ------------------------------------------------------------------ routes
    @app.get("/health")
    async def health():
        if not engine.is_running:
            return _error_response(APIError(f"engine not running: {engine.dead}", status=503,
                                            type="service_unavailable"))
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics_route():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "sala", "max_model_len": engine.max_model_len}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: HTTPRequest):
        check_model(body.model)
        prompts = completion_prompts(body.prompt, engine.tokenizer, vocab_size)
        discard = body.max_tokens == 0
        if discard and not body.echo:
            raise APIError("max_tokens 0 is only meaningful with echo (the prompt's log-probabilities)",
                           param="max_tokens")
        limits = [check_length(len(p.ids), None if discard else body.max_tokens, engine.max_model_len,
                               i if len(prompts) > 1 else None) for i, p in enumerate(prompts)]
        base = f"cmpl-{uuid.uuid4().hex}"
        requests, choices = [], []
        want_prompt_lp = body.logprobs if body.echo and body.logprobs is not None else None
        for i, (p, limit) in enumerate(zip(prompts, limits)):
            for j in range(body.n):
                index = i * body.n + j
                params = sampling_params(body, 1 if discard else limit, j)
                requests.append(make_request(f"{base}-{index}", p, params, body.logprobs, want_prompt_lp))
                text = p.text if p.text is not None else (engine.tokenizer.decode(p.ids) if engine.tokenizer
                                                          else "")
                choices.append(Choice(index=index, prompt_index=i, prompt_ids=p.ids, prompt_text=text,
                                      discard_output=discard))
        start = time.perf_counter()
        streams = await submit(requests)

        def logprobs_of(c: Choice, new_lps: list, with_prompt: bool, offset: int) -> dict | None:
            if body.logprobs is None:
                return None
            if with_prompt:
                prompt_entries = c.prompt_logprobs or [None] * len(c.prompt_ids)
                ids = list(c.prompt_ids) + [e.token_id for e in new_lps]
                return completion_logprobs(token_text, list(prompt_entries) + list(new_lps), ids, offset)
            return completion_logprobs(token_text, new_lps, [e.token_id for e in new_lps], offset)

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            async def events():
                offsets = {c.index: 0 for c in choices}
                echoed: set[int] = set()
                async for c, text, lps in run_all(streams, choices, start):
                    first = body.echo and c.index not in echoed
                    if first:
                        echoed.add(c.index)
                        text = c.prompt_text + text
                    if not text and not lps and not c.finished and not first:
                        continue
                    lp = logprobs_of(c, lps, first, offsets[c.index])
                    if lp is not None:              # the next chunk's offsets continue after these tokens
                        ids = (list(c.prompt_ids) if first else []) + [e.token_id for e in lps]
                        offsets[c.index] += sum(len(token_text.visible(t)) for t in ids)
                    yield sse({"id": base, "object": "text_completion", "created": int(time.time()),
                               "model": model_name, "choices": [{"index": c.index, "text": text, "logprobs": lp,
                                                                "finish_reason": c.finish_reason}]})
                if include_usage:
                    yield sse({"id": base, "object": "text_completion", "created": int(time.time()),
                               "model": model_name, "choices": [], **_usage_fields(choices)})

            return streaming(events())

        if not await until_done(run_all(streams, choices, start), raw):
            return Response(status_code=499)        # nobody reads it: the client is gone
        out_choices = []
        for c in choices:
            text = (c.prompt_text + c.text) if body.echo else c.text
            out_choices.append({"index": c.index, "text": text,
                                "logprobs": logprobs_of(c, c.logprobs, body.echo, 0),
                                "finish_reason": c.finish_reason})
        return {"id": base, "object": "text_completion", "created": int(time.time()), "model": model_name,
                "choices": out_choices, **_usage_fields(choices)}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw: HTTPRequest):
        check_model(body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            text = template.render(messages, add_generation_prompt=body.add_generation_prompt)
        except ValueError as e:
            raise APIError(str(e), param="messages") from None
        if engine.tokenizer is None:
            raise APIError("this model has no tokenizer: chat needs one", param="messages")
        prompt = PromptInput(encode_text(engine.tokenizer, text), text)
        limit = check_length(len(prompt.ids), body.output_limit, engine.max_model_len)
        top_n = body.top_logprobs or 0
        want_lp = top_n if body.logprobs else None
        base = f"chatcmpl-{uuid.uuid4().hex}"
        requests, choices = [], []
        for j in range(body.n):
            requests.append(make_request(f"{base}-{j}", prompt, sampling_params(body, limit, j), want_lp, None))
            choices.append(Choice(index=j, prompt_index=0, prompt_ids=prompt.ids, prompt_text=text))
        start = time.perf_counter()
        streams = await submit(requests)

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            def chunk(index: int, delta: dict, finish: str | None, lp=None) -> str:
                return sse({"id": base, "object": "chat.completion.chunk", "created": int(time.time()),
                            "model": model_name, "choices": [{"index": index, "delta": delta, "logprobs": lp,
                                                             "finish_reason": finish}]})

            async def events():
                for c in choices:
                    yield chunk(c.index, {"role": "assistant", "content": ""}, None)
                async for c, text, lps in run_all(streams, choices, start):
                    lp = chat_logprobs(token_text, lps, top_n) if body.logprobs and lps else None
                    if text or lp:
                        yield chunk(c.index, {"content": text}, None, lp)
                    if c.finished:
                        yield chunk(c.index, {}, c.finish_reason)
                if include_usage:
                    yield sse({"id": base, "object": "chat.completion.chunk", "created": int(time.time()),
                               "model": model_name, "choices": [], **_usage_fields(choices)})

            return streaming(events())

        if not await until_done(run_all(streams, choices, start), raw):
            return Response(status_code=499)        # nobody reads it: the client is gone
        out_choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                        "logprobs": chat_logprobs(token_text, c.logprobs, top_n) if body.logprobs else None,
                        "finish_reason": c.finish_reason} for c in choices]
        return {"id": base, "object": "chat.completion", "created": int(time.time()), "model": model_name,
                "choices": out_choices, **_usage_fields(choices)}

    return app
