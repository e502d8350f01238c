"""SalaEngine: long-context generation with a SALA model on one device.

    engine = SalaEngine.from_pretrained("path/to/model")                 # or from_preset(..., random_weights=True)
    for piece in engine.stream("Once upon a time", SamplingParams(max_new_tokens=50)):
        print(piece, end="", flush=True)
    results = engine.generate(["prompt a", "prompt b"], SamplingParams(temperature=0.7, top_p=0.9))

A request: tokenize, plan memory (refuse with numbers before allocating), allocate a StaticCache once for
batch x (longest prompt + max_new_tokens), prefill each prompt in chunks (only the last position's logits),
then decode all sequences together, one token per step (CUDA graph on GPU), with sampling and stop rules.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from sala.engine.decode_graph import GraphedDecodeStep
from sala.engine.forward import DecodeStep, ModelRunner
from sala.engine.loading import (
    default_device,
    load_config_dir,
    load_model_dir,
    load_tokenizer_dir,
    parse_dtype,
    random_model,
)
from sala.engine.memory import MemoryPlan, check_fits, device_free_bytes, plan_memory
from sala.engine.quantization import load_quantized_model, quantize_loaded_model, resolve_quantization
from sala.engine.sampling import SamplingParams, StopMatcher, sample_next
from sala.engine.static_cache import StaticCache
from sala.modeling.configuration_sala import SalaConfig
from sala.modeling.modeling_sala import SalaForCausalLM

DEFAULT_CHUNK_SIZE = 16384


@dataclass
class GenerationResult:
    """One sequence's output. finish_reason: "stop" (stop string), "stop_token", or "length"."""

    prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)
    text: str | None = None
    finish_reason: str = "length"
    ttft_s: float = 0.0          # request start -> first token sampled (prefill of all prompts included)
    total_s: float = 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        n = len(self.token_ids) - 1
        dt = self.total_s - self.ttft_s
        return n / dt if n > 0 and dt > 0 else 0.0


@dataclass
class TokenEvent:
    """A streamed token: sequence index, token id, text newly safe to show (None without tokenizer)."""

    row: int
    token_id: int
    text: str | None
    finished: bool


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SalaEngine:
    """Chunked prefill + graph-captured decode over a `SalaForCausalLM` (see the module docstring)."""

    def __init__(self, model: SalaForCausalLM, tokenizer=None, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 use_cuda_graph: bool = True, check_memory: bool = True, compile: bool = False,
                 compile_backend: str = "inductor") -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.model = model.eval()
        self.config: SalaConfig = model.config
        self.tokenizer = tokenizer
        self.runner = ModelRunner(model, compile=compile, compile_backend=compile_backend)
        self.device = self.runner.device
        self.dtype = self.runner.dtype
        self.chunk_size = chunk_size
        self.use_cuda_graph = use_cuda_graph
        self.check_memory = check_memory
        self.cache: StaticCache | None = None
        self.decode_mode: str | None = None
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, device: str | torch.device | None = None,
                        dtype: str | torch.dtype | None = None, context: int | None = None, batch: int = 1,
                        quantization: str | None = None, **kwargs) -> "SalaEngine":
        """Load a model directory (weights + tokenizer). With `context`, the memory plan is checked first.
        quantization="fp8": FP8 projections and LM head (`sala.engine.quantization`; an FP8 checkpoint loads as
        stored, also without it); refused before loading where the device has no FP8 GEMMs."""
        device = torch.device(device) if device is not None else default_device()
        dt = parse_dtype(dtype, device)
        config = load_config_dir(path)
        quant = resolve_quantization(quantization, device, path)
        if context is not None:
            _check_before_load(config, context, batch, dt, device, kwargs.get("chunk_size", DEFAULT_CHUNK_SIZE))
        model = (load_quantized_model(path, device, dt, quant) if quant
                 else load_model_dir(path, device=device, dtype=dt))
        return cls(model, load_tokenizer_dir(path), **kwargs)

    @classmethod
    def from_preset(cls, name: str, *, random_weights: bool = False, device: str | torch.device | None = None,
                    dtype: str | torch.dtype | None = None, seed: int = 0, tokenizer=None, context: int | None = None,
                    batch: int = 1, config_overrides: dict | None = None, quantization: str | None = None,
                    **kwargs) -> "SalaEngine":
        """A preset shape with random weights made on the device (presets ship no weights)."""
        if not random_weights:
            raise ValueError(f"preset {name!r} has no trained weights: pass random_weights=True (--random-weights) "
                             "to benchmark the shape, or load a model directory")
        device = torch.device(device) if device is not None else default_device()
        dt = parse_dtype(dtype, device)
        config = SalaConfig.from_preset(name, **(config_overrides or {}))
        quant = resolve_quantization(quantization, device)
        if context is not None:
            _check_before_load(config, context, batch, dt, device, kwargs.get("chunk_size", DEFAULT_CHUNK_SIZE))
        return cls(quantize_loaded_model(random_model(config, device, dt, seed), quant), tokenizer, **kwargs)

    # ------------------------------------------------------------------ kernels
    def warmup(self, max_tokens: int, batch: int = 1) -> float:
        """Compile, before any request, the sparse-kernel variants that depend on the context length (top-k row
        widths, decode-selection capacity classes) for contexts up to `max_tokens` at this decode batch, so the
        first request at each new length does not pay them (Triton caches them on disk for later processes).
        Returns the seconds spent; a no-op without sparse layers or off the Triton/CUDA path."""
        from sala.modeling.configuration_sala import SPARSE
        from sala.modeling.modeling_sala import sparse_params_from_config
        from sala.ops.dispatch import use_triton

        if max_tokens < 1 or batch < 1:
            raise ValueError(f"warmup: max_tokens and batch must be >= 1, got {max_tokens} and {batch}")
        t0 = time.perf_counter()
        probe = torch.empty(0, device=self.device)
        if SPARSE not in self.config.mixer_types or not use_triton(probe):
            return 0.0
        from sala.ops.infllmv2.triton_decode import warmup_length_classes

        c = self.config
        with torch.no_grad():
            warmup_length_classes(max_tokens, sparse_params_from_config(c), batch=batch,
                                  heads=(c.num_attention_heads, c.num_key_value_heads, c.head_dim),
                                  device=self.device, dtype=self.dtype)
        _sync(self.device)
        return time.perf_counter() - t0

    # ------------------------------------------------------------------ memory
    def plan(self, context: int, batch: int = 1) -> MemoryPlan:
        return plan_memory(self.config, context, batch, self.dtype, self.chunk_size)

    def allocate(self, batch: int, capacity: int) -> StaticCache:
        """Free the previous cache, check the plan against free memory, allocate the new cache once."""
        self.cache = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if self.check_memory:
            check_fits(self.config, self.plan(capacity, batch), device_free_bytes(self.device), weights_loaded=True,
                       where=str(self.device))
        self.cache = StaticCache(self.config, batch, capacity, self.dtype, self.device)
        return self.cache

    # ------------------------------------------------------------------ token-level API
    def _tokenize(self, prompts: str | list[str] | list[list[int]], add_bos: bool) -> list[list[int]]:
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise ValueError("no prompts given")
        out = []
        for p in prompts:
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ValueError("this engine has no tokenizer (the model directory has none): pass token ids")
                out.append(self.tokenizer.encode(p, add_bos=add_bos))
            else:
                out.append([int(t) for t in p])
        for i, ids in enumerate(out):
            if not ids:
                raise ValueError(f"prompt {i} is empty (0 tokens)")
            bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
            if bad:
                raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {self.config.vocab_size}): "
                                 f"{bad[:5]}")
        return out

    def _stop_ids(self, sampling: SamplingParams) -> set[int]:
        ids = set(sampling.stop_token_ids)
        if not sampling.ignore_eos:
            eos = self.config.eos_token_id
            ids.update(eos if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else []))
            if self.tokenizer is not None and self.tokenizer.eos_id is not None:
                ids.add(int(self.tokenizer.eos_id))
        return ids

    @torch.no_grad()
    def prefill(self, prompt_ids: list[list[int]], capacity: int,
                on_chunk: Callable[[int, int, int], None] | None = None) -> torch.Tensor:
        """Allocate a cache for len(prompt_ids) sequences x `capacity` tokens and prefill every prompt.

        Returns the logits of each prompt's last position [B, V] fp32.
        """
        longest = max(len(p) for p in prompt_ids)
        if capacity < longest:
            raise ValueError(f"capacity {capacity} is smaller than the longest prompt ({longest} tokens)")
        cache = self.allocate(len(prompt_ids), capacity)
        rows = []
        for b, ids in enumerate(prompt_ids):
            t = torch.tensor(ids, dtype=torch.long, device=self.device)
            cb = (lambda done, total, b=b: on_chunk(b, done, total)) if on_chunk is not None else None
            rows.append(self.runner.prefill_sequence(t, cache, b, self.chunk_size, cb))
        return torch.stack(rows)

    @torch.no_grad()
    def iter_generate(self, prompts: str | list[str] | list[list[int]], sampling: SamplingParams | None = None,
                      add_bos: bool = True, results: list[GenerationResult] | None = None) -> Iterator[TokenEvent]:
        """Generate for several prompts at once, yielding a TokenEvent per sampled token of every live sequence.

        Pass a list as `results` to receive the GenerationResult objects (filled as tokens arrive).
        """
        sampling = sampling or SamplingParams()
        if sampling.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this engine has none (use stop_token_ids)")
        t0 = time.perf_counter()
        ids = self._tokenize(prompts, add_bos)
        B = len(ids)
        capacity = max(len(p) for p in ids) + sampling.max_new_tokens
        res = [GenerationResult(prompt_tokens=len(p)) for p in ids]
        if results is not None:
            results.extend(res)
        logits = self.prefill(ids, capacity)
        gen = None
        if sampling.seed is not None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(sampling.seed)
        tokens = sample_next(logits, sampling, gen)
        stop_ids = self._stop_ids(sampling)
        matchers = [StopMatcher(sampling.stop) for _ in range(B)]
        done = [False] * B
        step = GraphedDecodeStep(DecodeStep(self.runner, self.cache), use_graph=self.use_cuda_graph)
        self.decode_mode = step.mode
        first = True
        for n in range(sampling.max_new_tokens):
            tok_list = tokens.tolist()          # the one host sync per step
            now = time.perf_counter()
            if first:
                for r in res:
                    r.ttft_s = now - t0
                self.timings["ttft_s"] = now - t0
                first = False
            for b in range(B):
                if done[b]:
                    continue
                tok = tok_list[b]
                r = res[b]
                if tok in stop_ids:
                    done[b], r.finish_reason = True, "stop_token"
                    r.total_s = now - t0
                    piece = None
                    if self.tokenizer is not None:
                        piece = matchers[b].flush(self._decode(r.token_ids))
                        r.text = matchers[b].text
                    yield TokenEvent(b, tok, piece, True)
                    continue
                r.token_ids.append(tok)
                piece = None
                if self.tokenizer is not None:
                    text = self._decode(r.token_ids)
                    piece, stopped = matchers[b].feed(text)
                    if stopped:
                        done[b], r.finish_reason, r.text = True, "stop", matchers[b].text
                if not done[b] and len(r.token_ids) >= sampling.max_new_tokens:
                    done[b], r.finish_reason = True, "length"
                    if self.tokenizer is not None:
                        piece = (piece or "") + matchers[b].flush(self._decode(r.token_ids))
                        r.text = matchers[b].text
                if done[b]:
                    r.total_s = now - t0
                yield TokenEvent(b, tok, piece, done[b])
            if all(done) or n == sampling.max_new_tokens - 1:
                break
            step.ids.copy_(tokens)
            logits = step()
            self.decode_mode = step.mode
            for b in range(B):
                self.cache.lengths[b] += 1
            tokens = sample_next(logits, sampling, gen)
        _sync(self.device)
        end = time.perf_counter()
        for r in res:
            if not r.total_s:
                r.total_s = end - t0
            if self.tokenizer is not None and r.text is None:
                r.text = self._decode(r.token_ids)
        self.timings["total_s"] = end - t0

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids)

    def generate(self, prompts: str | list[str] | list[list[int]], sampling: SamplingParams | None = None,
                 add_bos: bool = True, on_token: Callable[[TokenEvent], None] | None = None
                 ) -> list[GenerationResult]:
        """Generate for one or several prompts (text or token ids); returns one GenerationResult per prompt."""
        results: list[GenerationResult] = []
        for ev in self.iter_generate(prompts, sampling, add_bos, results):
            if on_token is not None:
                on_token(ev)
        return results

    def stream(self, prompt: str | list[int], sampling: SamplingParams | None = None, add_bos: bool = True
               ) -> Iterator[str]:
        """Text pieces of one prompt's continuation as they become final (stop strings held back)."""
        if self.tokenizer is None:
            raise ValueError("stream() yields text and needs a tokenizer; use iter_generate() for token ids")
        for ev in self.iter_generate([prompt], sampling, add_bos):
            if ev.text:
                yield ev.text


def _check_before_load(config: SalaConfig, context: int, batch: int, dtype: torch.dtype, device: torch.device,
                       chunk_size: int) -> None:
    """Refuse a request whose whole plan (weights included) cannot fit, before allocating anything."""
    plan = plan_memory(config, context, batch, dtype, chunk_size)
    check_fits(config, plan, device_free_bytes(device), weights_loaded=False, where=str(device))
