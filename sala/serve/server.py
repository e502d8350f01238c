"""Building the served app from a model folder or preset, and running it with uvicorn (foreground or in a thread).

`BackgroundServer` serves an app on a free loopback port in a daemon thread (tests, `sala bench serve --model`).
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path

logger = logging.getLogger(__name__)


def create_app(model: str | Path, *, served_model_name: str | None = None, api_key: str | None = None,
               engine_kwargs: dict | None = None, core=None, engine_process: bool = False,
               log_level: int | None = None):
    """The FastAPI app serving `model` (a model folder or a preset name) through a new EngineCore, or through
    `core` when given (an EngineCore already built). The app's lifespan starts and stops the engine.

    engine_process: run the EngineCore in a child process of its own (`sala.serve.engine_process.ProcessEngine`:
    it builds the core from `model` and `engine_kwargs`; returns once it is ready) instead of a thread of this
    one, so the engine loop and the HTTP server do not share an interpreter lock. `log_level`: the child's
    (default: this process's root logger level)."""
    from sala.serve.app import build_app
    from sala.serve.chat import ChatTemplate

    model_dir = Path(model) if Path(model).is_dir() else None
    name = served_model_name or (model_dir.name if model_dir is not None else str(model))
    if engine_process:
        from sala.serve.engine_process import ProcessEngine

        if core is not None:
            raise ValueError("engine_process builds the EngineCore in its own process: pass the model and "
                             "engine_kwargs, not core")
        engine = ProcessEngine(str(model), engine_kwargs, log_level=log_level)
        try:
            return build_app(engine, model_name=name, api_key=api_key,
                             chat_template=ChatTemplate.from_model_dir(model_dir))
        except BaseException:
            engine.shutdown()
            raise
    from sala.serve.async_engine import AsyncEngine

    if core is None:
        from sala.engine.scheduler import EngineCore

        core = EngineCore.from_pretrained(str(model), **(engine_kwargs or {}))
    template = ChatTemplate.from_model_dir(model_dir)
    return build_app(AsyncEngine(core), model_name=name, api_key=api_key, chat_template=template)


class BackgroundServer:
    """uvicorn serving `app` on `host` (a free port unless `port`) in a daemon thread; `url` once started.

        with BackgroundServer(app) as server:
            httpx.get(server.url + "/health")
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = self.sock.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        config = uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="sala-uvicorn")

    def start(self, timeout: float = 120.0) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread exited during startup (see its log)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start within {timeout:.0f} s")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
