"""A live `sala serve` for the tests: the bundled model's EngineCore served by uvicorn on a free loopback port."""
from __future__ import annotations

import contextlib

from sala.utils.bundled import BUNDLED_MODEL_DIR

MODEL_DIR = str(BUNDLED_MODEL_DIR)
# Small enough that the CPU runs every test in steps, not minutes; large enough for several 64-token pages.
MAX_MODEL_LEN = 1024


def make_core(**kw):
    """The real EngineCore on the bundled model (fp32 on the CPU)."""
    from sala.engine.scheduler import EngineCore

    kw.setdefault("max_model_len", MAX_MODEL_LEN)
    kw.setdefault("max_num_seqs", 16)
    kw.setdefault("device", "cpu")
    kw.setdefault("dtype", "fp32")
    return EngineCore.from_pretrained(MODEL_DIR, **kw)


@contextlib.contextmanager
def serving(core=None, *, api_key: str | None = None, served_model_name: str = "sala-test", **core_kw):
    """A live server (yields BackgroundServer: .url, and .app.state.engine) until the block ends."""
    from sala.serve.server import BackgroundServer, create_app

    app = create_app(MODEL_DIR, served_model_name=served_model_name, api_key=api_key,
                     core=core if core is not None else make_core(**core_kw))
    with BackgroundServer(app) as server:
        server.app = app
        yield server


# The process engine's EngineCore settings: those of make_core (its child builds the core itself).
PROCESS_ENGINE_KWARGS = {"max_model_len": MAX_MODEL_LEN, "max_num_seqs": 16, "device": "cpu", "dtype": "fp32"}


@contextlib.contextmanager
def serving_process(*, api_key: str | None = None, served_model_name: str = "sala-test", **engine_kw):
    """A live server whose EngineCore runs in a child process (`create_app(..., engine_process=True)`); yields
    BackgroundServer (.url, .app.state.engine: the ProcessEngine) until the block ends."""
    from sala.serve.server import BackgroundServer, create_app

    app = create_app(MODEL_DIR, served_model_name=served_model_name, api_key=api_key, engine_process=True,
                     engine_kwargs={**PROCESS_ENGINE_KWARGS, **engine_kw})
    try:
        with BackgroundServer(app) as server:
            server.app = app
            yield server
    finally:
        app.state.engine.shutdown()          # a no-op after the server's lifespan stopped it


def stream_then_leave(url: str, body: dict, events: int = 3) -> None:
    """POST a streamed completion, read `events` of its data events and close the connection: a client that
    leaves mid-stream."""
    import json

    import httpx

    with httpx.Client(base_url=url, timeout=120) as client:
        with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            seen = 0
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    json.loads(line[6:])
                    seen += 1
                    if seen == events:
                        break
