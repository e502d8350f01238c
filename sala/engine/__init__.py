"""Long-context inference: chunked prefill into preallocated caches, CUDA-graph decode, sampling, memory plans.

`SalaEngine` is the entry point (`sala generate` uses it); `EngineCore` serves many requests at once
(continuous batching, exact prefix caching; `sala serve`), `LLM` runs offline batches through it;
`plan_memory` / `check_fits` size a request
before anything is allocated; `SamplingParams` says how tokens are picked and when generation stops.
"""
from sala.engine.engine import DEFAULT_CHUNK_SIZE, GenerationResult, SalaEngine, TokenEvent
from sala.engine.llm import LLM, LLMResult
from sala.engine.memory import MemoryPlan, check_fits, largest_context, parameter_counts, plan_memory
from sala.engine.requests import QueueFullError, Request, RequestError, RequestOutput, TokenLogprob
from sala.engine.sampling import SamplingParams, StopMatcher, filter_top_k, filter_top_p, sample_next
from sala.engine.scheduler import EngineCore
from sala.engine.static_cache import StaticCache

__all__ = ["SalaEngine", "GenerationResult", "TokenEvent", "DEFAULT_CHUNK_SIZE", "MemoryPlan", "plan_memory",
           "check_fits", "largest_context", "parameter_counts", "SamplingParams", "StopMatcher", "filter_top_k",
           "filter_top_p", "sample_next", "StaticCache", "EngineCore", "Request", "RequestOutput", "TokenLogprob",
           "RequestError", "QueueFullError", "LLM", "LLMResult"]
