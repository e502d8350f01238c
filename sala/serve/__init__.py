"""`sala serve`: an OpenAI-compatible HTTP server over the continuous-batching EngineCore.

Modules: protocol (request bodies, error shape), async_engine (the engine thread and asyncio streams),
engine_process (the same over an engine in a child process: `--engine-process`), prompts
(prompt fields -> token ids and limits), choices (outputs -> OpenAI choices, logprobs, usage), chat (chat
template), metrics (Prometheus), app (FastAPI routes), server (building and running the app). Needs the `serve`
extra (fastapi, uvicorn, prometheus-client); nothing is imported here so that a missing extra is reported once.
"""
