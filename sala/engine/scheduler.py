"""EngineCore: continuous batching over one preallocated StaticCache (the serving engine's generation loop).

Slots are the rows of a paged StaticCache of `max_num_seqs` rows of up to `max_model_len` tokens, allocated once
(checked against the memory plan and `memory_fraction` of the free device memory): the sparse layers' K/V in a
shared `KVPagePool` of pages of one sparse block (64 tokens), the compressed keys and lightning states per row.
Requests wait in a FIFO queue; one is admitted when a row is free and the pool can hold its prompt (pages of a
restored prefix are shared, not counted again; cached prefixes are evicted for room when needed). A running
request maps a new page when its next step needs one; when the pool has none left (after evicting cached
prefixes), the most recently admitted request is preempted: its row and pages are given back and it waits at the
head of the queue, to prefill its prompt and the tokens it already generated again (from the prefix cache where
it can) and go on decoding exactly where it stopped (as vLLM's recompute preemption). It leaves, giving its pages
back, when it finishes. The pool holds at least one sequence of max_model_len, so whatever fits the model length
fits the pool. Each `step()`:

1. one decode step for every running sequence (a CUDA-graph `GraphedDecodeStep` over the smallest batch-size
   bucket of rows [0, b) that holds them). DecodeStep advances every row of its bucket, so the lightning states
   of rows still prefilling are saved before and put back after, and `seqlens` is rewritten from the host
   lengths (idle rows stay at 0; a prefilling row's stray K/V and compressed-key writes at its length are
   overwritten by its next chunk, which starts there);
2. admission of waiting requests into free rows, restoring the longest cached prefix (`PrefixCache`);
3. prefill chunks of admitted prompts, up to `max_tokens_per_step` prompt tokens per step (the decode tokens
   come on top), so a very long prompt advances one chunk per step while the others keep decoding; prompts that
   finish within one chunk go before longer ones. A chunk is a full chunk (`min(chunk_size,
   max_tokens_per_step)`, a whole number of pages) or a prompt's last piece (or ends where the prefix cache
   wants a snapshot): chunk lengths repeat, so their CUDA graphs replay instead of running eagerly. A prompt's
   last chunk samples its first token.

Sampling is per request (its own SamplingParams and torch.Generator). Greedy tokens equal those of the
request run alone: a row's arithmetic never mixes with another row's.

Speculative decoding (`speculative="ngram"` or `"draft:DIR"`): when some running request gets drafts this step
(up to its adaptive k, `AdaptiveK`), the step is one batched verify step instead of the decode step: every
running row feeds its last token and its drafts (padded to the step's T tokens; a row without drafts keeps just
its first position, which is its decode step) through the DECODE path of the model (a CUDA graph per bucket and
T), then acceptance per request (greedy prefix, or rejection sampling that keeps the target distribution), and an
exact rollback of every row to its accepted tokens (`sala.engine.speculative.verify`).
"""
from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from sala.engine.decode_graph import GraphedDecodeStep
from sala.engine.forward import DecodeStep, ModelRunner
from sala.engine.kv_pages import KVPagePool
from sala.engine.memory import (
    check_fits,
    device_free_bytes,
    largest_context,
    plan_memory,
    prefill_graph_bytes,
)
from sala.engine.prefix_cache import PrefixCache, PrefixMatch, page_keys
from sala.engine.requests import (
    QueueFullError,
    Request,
    RequestError,
    RequestOutput,
    TokenLogprob,
)
from sala.engine.sampling import SamplingParams, StopMatcher, sample_next
from sala.engine.speculative import (
    COST_PER_DRAFT,
    AdaptiveK,
    DraftState,
    SpecStats,
    StepCosts,
    VerifyStep,
    accept_drafts,
    accept_greedy,
    make_drafter,
)
from sala.engine.static_cache import StaticCache
from sala.modeling.configuration_sala import SalaConfig
from sala.modeling.modeling_sala import SalaForCausalLM

logger = logging.getLogger(__name__)

# Default max_model_len on CPU (at most what the available RAM holds).
CPU_DEFAULT_MAX_MODEL_LEN = 8192
# Default prefix-cache budget: this fraction of the slot cache's bytes, at least PREFIX_CACHE_MIN_BYTES; half of it
# as pool pages beyond what max_num_seqs full rows need (cached prefixes no running request maps), half for the
# lightning-state snapshots.
PREFIX_CACHE_FRACTION = 0.25
PREFIX_CACHE_MIN_BYTES = 64 << 20
# Serving prefill chunks on CUDA: the dense pieces of this many chunk lengths (the most recently used, each of at
# most PREFILL_GRAPH_MAX_TOKENS tokens) replay as CUDA graphs (`sala.engine.prefill_graph`); longer chunks are
# bound by the GPU, not by their launches.
PREFILL_GRAPH_LENGTHS = 4
PREFILL_GRAPH_MAX_TOKENS = 2048

_WAITING, _PREFILL, _RUNNING = "waiting", "prefill", "running"


@dataclass
class _Seq:
    req: Request
    stop_ids: set[int]
    matcher: StopMatcher | None
    generator: torch.Generator | None
    status: str = _WAITING
    row: int = -1
    fill: list[int] = field(default_factory=list)   # what admission prefills: the prompt, or after a preemption
                                             # the prompt and the output but its last token
    fill_t: torch.Tensor | None = None       # fill ids [T] on the device
    resumed: bool = False                    # re-admitted after a preemption: its prefill samples nothing
    admitted_once: bool = False
    stored: int = 0                          # prompt tokens stored in the prefix cache
    num_cached: int = 0
    match: PrefixMatch | None = None
    page_keys: list[int] | None = None       # prefix-cache keys of the prompt's full pages
    split_at: int = 0                        # where the prompt leaves a cached chain: end a chunk there
    output_ids: list[int] = field(default_factory=list)
    last_token: int = 0
    prompt_lps: list[TokenLogprob | None] | None = None
    prompt_lps_sent: bool = False
    text: str = ""                           # output text decoded so far (incrementally)
    prefix_offset: int = 0                   # output ids [prefix_offset, read_offset) give the text's context
    read_offset: int = 0
    adaptive: AdaptiveK | None = None        # speculative decoding: this request's k
    spec: SpecStats | None = None
    draft_state: DraftState | None = None    # the drafter's incremental view of prompt + output (from the first
                                             # prefill chunk on)

    @property
    def prompt(self) -> list[int]:
        return self.req.prompt_ids


def _top_logprobs(lp: torch.Tensor, chosen: list[int], k: int) -> list[TokenLogprob]:
    """TokenLogprob per row of log-probabilities lp [N, V] for the chosen ids (len N), with the top k."""
    ch = lp.gather(1, torch.tensor(chosen, device=lp.device)[:, None])[:, 0].tolist()
    if k > 0:
        vals, idx = torch.topk(lp, min(k, lp.shape[-1]), dim=-1)
        vals, idx = vals.tolist(), idx.tolist()
    else:
        vals = idx = [[] for _ in chosen]
    return [TokenLogprob(t, c, list(zip(i, v))) for t, c, i, v in zip(chosen, ch, idx, vals)]


def _merge(outs: list[RequestOutput]) -> RequestOutput:
    """One RequestOutput for several tokens of one request taken in one step (a verify step's)."""
    last = outs[-1]
    if len(outs) == 1:
        return last
    lps = None
    if last.new_logprobs is not None:
        lps = [lp for o in outs for lp in (o.new_logprobs or [])]
    plp = next((o.prompt_logprobs for o in outs if o.prompt_logprobs is not None), None)
    return RequestOutput(last.request_id, [t for o in outs for t in o.new_token_ids], "".join(o.new_text for o in outs),
                         lps, plp, last.finished, last.finish_reason, last.num_prompt_tokens, last.num_cached_tokens,
                         last.num_output_tokens, last.speculative)


def _rows_of(logits: torch.Tensor, seqs: list[_Seq]) -> torch.Tensor:
    """Each seq's row of a step's logits [b, ...] (a view when the rows are 0 .. n-1 in order: no index upload)."""
    rows = [s.row for s in seqs]
    if rows == list(range(len(rows))):
        return logits[:len(rows)]
    return logits.index_select(0, torch.tensor(rows, device=logits.device))


def admission_spare_pages(num_pages: int) -> int:
    """Pages of a pool of `num_pages` that admission keeps free for running requests to grow into (1%, >= 1)."""
    return max(1, num_pages // 100)


def kv_cache_tokens_for(tokens: int, page_size: int) -> int:
    """The smallest `kv_cache_tokens` whose pool admits requests holding `tokens` in all, with admission's spare
    pages on top (for sizing a pool to a workload)."""
    need = -(-tokens // page_size)
    pages = need + 1
    while pages - admission_spare_pages(pages) < need:
        pages += 1
    return pages * page_size


def _buckets(max_num_seqs: int) -> list[int]:
    """Decode batch sizes: powers of two below max_num_seqs, and max_num_seqs."""
    out = [b for b in (1 << i for i in range(max_num_seqs.bit_length())) if b < max_num_seqs]
    return out + [max_num_seqs]


class EngineCore:
    """Continuous batching with exact prefix caching (see the module docstring). Single-threaded: one caller."""

    def __init__(self, model: SalaForCausalLM, tokenizer=None, *, max_num_seqs: int = 16,
                 max_model_len: int | None = None, memory_fraction: float = 0.9, enable_prefix_cache: bool = True,
                 chunk_size: int = 2048, max_tokens_per_step: int | None = None, max_waiting: int = 256,
                 use_cuda_graph: bool = True, prefix_cache_bytes: int | None = None,
                 kv_cache_tokens: int | None = None, speculative: str | None = None,
                 num_speculative_tokens: int = 4, speculative_max_batch: int = 8,
                 speculative_cost_per_token: float | None = None) -> None:
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        page_size = model.config.sparse_config["block_size"]      # a K/V page is one sparse block
        if chunk_size < page_size:
            raise ValueError(f"chunk_size ({chunk_size}) must be >= the page size ({page_size}, the sparse block)")
        if kv_cache_tokens is not None and kv_cache_tokens < page_size:
            raise ValueError(f"kv_cache_tokens must be >= the page size ({page_size}), got {kv_cache_tokens}")
        if not 0.0 < memory_fraction <= 1.0:
            raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction}")
        if max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {max_waiting}")
        self.model = model.eval()
        self.config: SalaConfig = model.config
        self.tokenizer = tokenizer
        self.runner = ModelRunner(model, prefill_graphs=PREFILL_GRAPH_LENGTHS if use_cuda_graph else 0,
                                  prefill_graph_max_tokens=PREFILL_GRAPH_MAX_TOKENS)
        self.device = self.runner.device
        self.dtype = self.runner.dtype
        self.max_num_seqs = max_num_seqs
        self.chunk_size = chunk_size
        self.page_size = page_size
        self.max_tokens_per_step = max_tokens_per_step or chunk_size
        if self.max_tokens_per_step < page_size:
            raise ValueError(f"max_tokens_per_step ({self.max_tokens_per_step}) must be >= the page size "
                             f"({page_size}, the sparse block)")
        self.max_waiting = max_waiting
        if num_speculative_tokens < 0:
            raise ValueError(f"num_speculative_tokens must be >= 0, got {num_speculative_tokens}")
        self.speculative = speculative
        self.num_speculative_tokens = num_speculative_tokens
        # A verify step feeds T tokens per running row: with many rows its GEMMs stop being bound by reading the
        # weights, so above this many running sequences every request decodes plainly.
        self.speculative_max_batch = speculative_max_batch
        # A verify step's cost per draft position, in decode steps (AdaptiveK's cost model; default: measured
        # on this device type)
        device_type = model.lm_head.weight.device.type
        self.speculative_cost_per_token = (COST_PER_DRAFT.get(device_type, COST_PER_DRAFT["cpu"])
                                           if speculative_cost_per_token is None else speculative_cost_per_token)
        # Tokens per row of the verify steps (one CUDA graph each per bucket): 2, 3, 5, 9, ... up to k + 1.
        self.verify_sizes = sorted({min(2 ** i + 1, num_speculative_tokens + 1)
                                    for i in range(max(1, num_speculative_tokens).bit_length() + 1)} - {1})
        # The measured cost of verify steps against decode steps (AdaptiveK's r(k) for requests without a seed)
        self.step_costs = StepCosts(self.speculative_cost_per_token)
        self.drafter = (make_drafter(speculative, device=model.lm_head.weight.device,
                                     dtype=model.lm_head.weight.dtype, target_vocab=model.config.vocab_size)
                        if speculative else None)
        self.use_cuda_graph = use_cuda_graph
        self.max_model_len = self._size(max_model_len, memory_fraction, prefix_cache_bytes, enable_prefix_cache,
                                        kv_cache_tokens)
        pages_per_row = -(-self.max_model_len // page_size)
        page_bytes = KVPagePool.bytes_per_page(self.config, self.dtype)
        if prefix_cache_bytes is None:
            full = plan_memory(self.config, pages_per_row * page_size, max_num_seqs, self.dtype, chunk_size).caches
            prefix_cache_bytes = max(PREFIX_CACHE_MIN_BYTES, int(full * PREFIX_CACHE_FRACTION))
        snapshot_bytes = prefix_cache_bytes
        if kv_cache_tokens is None:      # every row full, and half the prefix cache's share as pages beyond that
            extra = prefix_cache_bytes // 2 // page_bytes if enable_prefix_cache else 0
            num_pages = max_num_seqs * pages_per_row + extra
            snapshot_bytes -= prefix_cache_bytes // 2
        else:
            num_pages = kv_cache_tokens // page_size
            if num_pages < pages_per_row:
                raise ValueError(f"kv_cache_tokens ({kv_cache_tokens}) must hold at least one sequence of "
                                 f"max_model_len ({self.max_model_len} tokens, {pages_per_row} pages of "
                                 f"{page_size}): lower max_model_len or raise kv_cache_tokens")
        self.pool = KVPagePool(self.config, num_pages, self.dtype, self.device)
        # free pages admission leaves for the running requests to grow into (fewer preemptions right after it)
        self._watermark = admission_spare_pages(num_pages)
        self.cache = StaticCache(self.config, max_num_seqs, self.max_model_len, self.dtype, self.device,
                                 pool=self.pool)
        self.prefix_cache = PrefixCache(self.config, self.pool, snapshot_bytes) if enable_prefix_cache else None
        self.buckets = _buckets(max_num_seqs)
        self._steps: dict[int, GraphedDecodeStep] = {}
        self._verify_steps: dict[tuple[int, int], GraphedDecodeStep] = {}
        self._spec_snapshot: torch.Tensor | None = None
        self.free_rows: list[int] = list(range(max_num_seqs))
        self.waiting: deque[_Seq] = deque()
        self.active: dict[str, _Seq] = {}         # admitted (prefill or running), by request id, admission order
        self._aborted: list[RequestOutput] = []
        self.counters = {"prompt_tokens_total": 0, "prefill_tokens_total": 0, "generation_tokens_total": 0,
                         "prefix_cache_queries": 0, "prefix_cache_hits": 0, "requests_finished": 0,
                         "requests_aborted": 0, "decode_steps": 0, "prefill_chunks": 0,
                         "spec_verify_steps": 0, "spec_draft_tokens_total": 0, "spec_accepted_tokens_total": 0,
                         "preemptions": 0}
        self._ids = itertools.count()
        logger.info("EngineCore: %d slots x %d tokens on %s (%s), K/V pool %d pages of %d tokens, caches %.1f MiB, "
                    "prefix-cache snapshots %s", max_num_seqs, self.max_model_len, self.device, self.dtype,
                    self.pool.num_pages, page_size, self.cache.memory_bytes()["total"] / 2**20,
                    f"{prefix_cache_bytes / 2**20:.1f} MiB" if enable_prefix_cache else "off")
        self.capture_prefill_graphs()
        self.capture_step_graphs()

    @property
    def full_chunk(self) -> int:
        """The length of a prompt's chunks but its last: whole pages, within the step's prompt-token budget."""
        return min(self.chunk_size, self.max_tokens_per_step) // self.page_size * self.page_size

    # ------------------------------------------------------------------ construction
    @torch.no_grad()
    def capture_prefill_graphs(self) -> list[int]:
        """Capture, before any request, the piecewise prefill graph of a full chunk (every chunk of a long prompt
        but its last), so no request's step pays a capture. Runs on row 0, which is then reset. Returns the
        lengths captured (none on CPU, with CUDA graphs off, or when a full chunk is too long to graph)."""
        if not self.runner.prefill_graphs or self.active:
            return []
        ps, full = self.page_size, self.full_chunk
        lengths = [full] if full <= min(self.cache.capacity, self.runner.prefill_graph_max_tokens) else []
        self.runner.pin_prefill_graphs(lengths)
        lengths = [n for n in lengths if -(-n // ps) <= self.pool.num_free]
        for n in lengths:
            for _ in range(2):               # the first call runs eagerly, the second captures and replays
                self.cache.grow_row(0, n)
                self.runner.prefill_chunk(torch.zeros(n, dtype=torch.long, device=self.device), self.cache, 0)
                self.cache.reset_row(0)      # its pages go back to the pool
        logger.debug("captured the prefill graphs of %s-token chunks", lengths)
        return lengths

    @torch.no_grad()
    def capture_step_graphs(self, buckets: list[int] | None = None) -> list[tuple[int, int]]:
        """Capture, before any request, the decode step's CUDA graph of every batch-size bucket in `buckets`
        (default: all) and, with speculation, the verify steps' of every size for the buckets that speculate, so
        no request's step pays a first eager call (Triton compiles) or a capture. The steps run on idle rows
        (their blocks map the scratch page); every row's states are zeroed after. Returns the (bucket, tokens per
        row) steps captured: none on CPU, with CUDA graphs off, or while requests are admitted."""
        if buckets is not None and any(not 1 <= x <= self.max_num_seqs for x in buckets):
            raise ValueError(f"capture_step_graphs: batch sizes must be in [1, max_num_seqs = {self.max_num_seqs}], "
                             f"got {buckets}")
        if self.device.type != "cuda" or not self.use_cuda_graph or self.active:
            return []
        done = []
        # the buckets of the verify steps: those of up to speculative_max_batch rows
        spec_rows = min(self.speculative_max_batch, self.max_num_seqs) if self.speculative else 0
        for b in self.buckets if buckets is None else sorted({self.bucket_for(x) for x in buckets}):
            steps = [(1, self._decode_step(b))]
            if spec_rows and b <= self.bucket_for(spec_rows):
                steps += [(T, self._verify_step(b, T)) for T in self.verify_sizes]
            for T, st in steps:
                for _ in range(2):          # the first call runs eagerly, the second captures
                    st.ids.zero_()
                    st()
                    if T > 1:
                        st.keep.fill_(1)
                        st.rollback()
                done.append((b, T))
        self.cache.states.zero_()
        logger.debug("captured the decode and verify step graphs %s", done)
        return done

    def _size(self, max_model_len: int | None, fraction: float, prefix_bytes: int | None, prefix_on: bool,
              kv_tokens: int | None) -> int:
        """max_model_len checked against (or, if None, sized from) the free device memory. With `kv_tokens` (the
        pool's size) the rows' K/V is that pool instead of max_num_seqs x max_model_len tokens."""
        free = device_free_bytes(self.device)
        budget = None if free is None else int(free * fraction)
        share = 1.0 + (PREFIX_CACHE_FRACTION if prefix_on and prefix_bytes is None else 0.0)
        extra = prefix_bytes if prefix_on and prefix_bytes is not None else 0
        if self.runner.prefill_graphs:      # the serving chunks' piecewise CUDA graphs
            extra += prefill_graph_bytes(self.config, min(self.chunk_size, self.runner.prefill_graph_max_tokens),
                                         self.runner.prefill_graphs, self.dtype)
        if self.speculative:      # the verify steps' snapshot of every row's lightning states
            cfg = self.config
            extra += (len(cfg.lightning_layer_ids) * self.max_num_seqs * cfg.lightning_nh
                      * cfg.lightning_head_dim ** 2 * 4)
        limit = self.config.max_position_embeddings
        if max_model_len is None:
            if budget is None:
                max_model_len = min(limit, CPU_DEFAULT_MAX_MODEL_LEN)
            else:
                fit = largest_context(self.config, int((budget - extra) / share), self.max_num_seqs, self.dtype,
                                      self.chunk_size, weights_loaded=True)
                if fit < self.page_size:
                    raise MemoryError(f"not enough memory for {self.max_num_seqs} sequences: at most {fit} tokens "
                                      f"each fit in {budget / 2**30:.2f} GiB ({fraction:.0%} of the free memory); "
                                      "lower max_num_seqs")
                max_model_len = min(limit, fit // self.page_size * self.page_size)
                if self.device.type == "cpu":   # CPU prefill is slow: a short default, sized to the RAM at most
                    max_model_len = min(max_model_len, CPU_DEFAULT_MAX_MODEL_LEN)
        if max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {max_model_len}")
        if budget is not None:
            plan = plan_memory(self.config, max_model_len, self.max_num_seqs, self.dtype, self.chunk_size)
            if kv_tokens is not None:
                plan.sparse_kv = plan_memory(self.config, kv_tokens, 1, self.dtype, self.chunk_size).sparse_kv
            cap = int((budget - extra) / share)
            check_fits(self.config, plan, cap, weights_loaded=True,
                       where=f"{self.device} ({fraction:.0%} of its free memory, less the prefix cache)")
        return int(max_model_len)

    @classmethod
    def from_pretrained(cls, path_or_preset: str, *, device: str | torch.device | None = None,
                        dtype: str | torch.dtype | None = None, seed: int = 0, quantization: str | None = None,
                        **kw) -> EngineCore:
        """A model directory (weights + tokenizer), or a preset name with random weights (and the shipped
        tokenizer when it fits the preset's vocabulary). quantization="fp8": FP8 projections and LM head
        (`sala.engine.quantization`; refused before loading where the device cannot run FP8)."""
        from pathlib import Path

        from sala.engine.loading import (
            default_device,
            load_model_dir,
            load_tokenizer_dir,
            parse_dtype,
            random_model,
        )
        from sala.engine.quantization import load_quantized_model, quantize_loaded_model, resolve_quantization
        from sala.modeling.configuration_sala import PRESETS

        dev = torch.device(device) if device is not None else default_device()
        dt = parse_dtype(dtype, dev)
        if Path(path_or_preset).is_dir():
            quant = resolve_quantization(quantization, dev, path_or_preset)
            model = (load_quantized_model(path_or_preset, dev, dt, quant) if quant
                     else load_model_dir(path_or_preset, device=dev, dtype=dt))
            return cls(model, load_tokenizer_dir(path_or_preset), **kw)
        if path_or_preset in PRESETS:
            config = SalaConfig.from_preset(path_or_preset)
            tok = None
            try:
                from sala.modeling.tokenizer import load_tokenizer

                tok = load_tokenizer(None)
                if tok.vocab_size > config.vocab_size:
                    tok = None
            except Exception:  # noqa: BLE001 - no shipped tokenizer: token ids only
                tok = None
            quant = resolve_quantization(quantization, dev)
            return cls(quantize_loaded_model(random_model(config, dev, dt, seed), quant), tok, **kw)
        raise FileNotFoundError(f"{path_or_preset!r} is neither a model directory nor a preset "
                                f"({', '.join(PRESETS)})")

    # ------------------------------------------------------------------ requests
    def _stop_ids(self, params: SamplingParams) -> set[int]:
        ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            eos = self.config.eos_token_id
            ids.update(eos if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else []))
            if self.tokenizer is not None and getattr(self.tokenizer, "eos_id", None) is not None:
                ids.add(int(self.tokenizer.eos_id))
        return ids

    def check_request(self, request: Request) -> None:
        """Raise RequestError if the request can never be served (bad or too many tokens, duplicate id, ...)."""
        rid = request.request_id
        if rid in self.active or any(s.req.request_id == rid for s in self.waiting):
            raise RequestError(f"request id {rid!r} is already in use")
        ids = request.prompt_ids
        if not ids:
            raise RequestError("the prompt is empty (0 tokens)")
        V = self.config.vocab_size
        bad = [t for t in ids if not (isinstance(t, int) and 0 <= t < V)]
        if bad:
            raise RequestError(f"the prompt has token ids outside the vocabulary [0, {V}): {bad[:5]}")
        p = request.params
        need = len(ids) + p.max_new_tokens
        if need > self.max_model_len:
            raise RequestError(f"the prompt ({len(ids)} tokens) plus max_new_tokens ({p.max_new_tokens}) is {need} "
                               f"tokens, more than the maximum model length of {self.max_model_len} tokens")
        if p.stop and self.tokenizer is None:
            raise RequestError("stop strings need a tokenizer and this engine has none (use stop_token_ids)")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(request, name)
            if k is not None and not 0 <= k <= V:
                raise RequestError(f"{name} must be in [0, {V}], got {k}")

    def add_request(self, request: Request) -> None:
        """Queue a request. RequestError if it can never be served; QueueFullError if too many wait."""
        self.check_request(request)
        if len(self.waiting) >= self.max_waiting:
            raise QueueFullError(f"the waiting queue is full ({len(self.waiting)} requests waiting, "
                                 f"max_waiting {self.max_waiting}); retry later")
        p = request.params
        gen = None
        if p.seed is not None and not p.greedy:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(p.seed)
        matcher = StopMatcher(p.stop) if self.tokenizer is not None else None
        seq = _Seq(request, self._stop_ids(p), matcher, gen, fill=list(request.prompt_ids))
        if self.drafter is not None:
            # A seeded request's k must not depend on timings (its samples reproduce): the prior cost for it.
            seq.adaptive = AdaptiveK(self.num_speculative_tokens, self.speculative_cost_per_token,
                                     cost=self._verify_cost if gen is None else None)
            seq.spec = SpecStats()
        self.waiting.append(seq)

    def abort(self, request_id: str) -> None:
        """Stop a request now: its row and prefix-cache pins are freed; the next step() reports it finished
        with finish_reason "abort". Unknown (or already finished) ids are ignored."""
        for s in self.waiting:
            if s.req.request_id == request_id:
                self.waiting.remove(s)
                break
        else:
            s = self.active.get(request_id)
            if s is None:
                return
            self._free(s)
        self.counters["requests_aborted"] += 1
        self._aborted.append(self._output(s, [], "", None, True, "abort"))

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.active or self._aborted)

    def stats(self) -> dict:
        out = {"running": sum(s.status == _RUNNING for s in self.active.values()),
               "prefilling": sum(s.status == _PREFILL for s in self.active.values()),
               "waiting": len(self.waiting), "free_slots": len(self.free_rows), "max_num_seqs": self.max_num_seqs,
               "max_model_len": self.max_model_len,
               "cache_pages_used": self.cache.pages_mapped,                       # by running rows
               "cache_pages_free": self.pool.num_free,
               "cache_pages_total": self.pool.num_pages, "cache_page_tokens": self.page_size,
               "cache_bytes": self.cache.memory_bytes()["total"]}
        out.update(self.counters)
        if self.prefix_cache is not None:
            out.update(self.prefix_cache.stats())
        return out

    # ------------------------------------------------------------------ rows
    def _admit(self) -> None:
        """Waiting requests, in arrival order (preempted ones first), into free rows while the pool holds their
        prefill and first decoded token (the first that does not fit waits, and the ones behind it with it)."""
        while self.waiting and self.free_rows:
            s = self.waiting[0]
            T = len(s.fill)
            m = None
            if self.prefix_cache is not None:
                if s.page_keys is None:
                    s.page_keys = page_keys(s.fill, self.page_size)
                # Prompt log-probabilities need every prompt position's hidden state: no restore then.
                if s.req.prompt_logprobs is None or s.prompt_lps_sent:
                    m = self.prefix_cache.lookup(s.fill, T - 1, s.page_keys)
            need = -(-(T + 1) // self.page_size) - (len(m.keys) if m is not None else 0)
            if self.pool.num_free < need + self._watermark:
                if m is not None:
                    self.prefix_cache.acquire(m)         # not evicted to make room for the request reusing it
                fits = self.prefix_cache is not None and self.prefix_cache.reclaim(need + self._watermark)
                if m is not None:
                    self.prefix_cache.release(m)
                if not fits and (self.active or self.pool.num_free < need):
                    return                               # wait for running requests to give pages back
            self.waiting.popleft()
            self.free_rows.sort()
            s.row = self.free_rows.pop(0)
            row = s.row
            self.cache.reset_row(row)
            s.fill_t = torch.tensor(s.fill, dtype=torch.long, device=self.device)
            s.status = _PREFILL
            first = not s.admitted_once
            s.admitted_once = True
            if first:
                self.counters["prompt_tokens_total"] += T
            if self.prefix_cache is not None:
                if first:
                    self.counters["prefix_cache_queries"] += T
                if m is not None:
                    s.split_at = m.pages_length
                    self.prefix_cache.restore(m, self.cache, row)
                    self.prefix_cache.acquire(m)
                    s.match, s.stored = m, m.length
                    if first:
                        s.num_cached = m.length
                        self.counters["prefix_cache_hits"] += m.length
            if s.req.prompt_logprobs is not None and not s.prompt_lps_sent:
                s.prompt_lps = [None]
            self.cache.grow_row(row, T + 1)
            self.active[s.req.request_id] = s

    def _preempt(self, s: _Seq) -> None:
        """Give `s`'s row and pages back and put it at the head of the queue: re-admitted, it prefills its prompt
        and every generated token but the last (the one its next step feeds) and decodes on from there."""
        logger.info("preempting request %s (%d tokens cached): the K/V pool is full", s.req.request_id,
                    self.cache.lengths[s.row])
        self.counters["preemptions"] += 1
        running = s.status == _RUNNING
        self._free(s)
        if running:
            s.fill = list(s.prompt) + s.output_ids[:-1]
            s.resumed = True
        s.status = _WAITING
        s.page_keys, s.stored, s.split_at, s.fill_t = None, 0, 0, None
        self.waiting.appendleft(s)

    def _grow_for_step(self, running: list[_Seq], drafts: dict[str, list[int]]) -> list[_Seq]:
        """Map the pages the step's tokens need (a verify step: the drafts too), oldest requests first; where the
        pool is short, cached prefixes are evicted, then the most recently admitted requests preempted. Returns
        the running requests still admitted."""
        ps = self.page_size
        for s in running:
            if s.status != _RUNNING:
                continue                                  # preempted for an older request's pages
            want = self.cache.lengths[s.row] + 1 + len(drafts.get(s.req.request_id, ()))
            need = -(-want // ps) - len(self.cache.row_pages[s.row])
            while s.status == _RUNNING and need > self.pool.num_free:
                if self.prefix_cache is not None and self.prefix_cache.reclaim(need):
                    break
                self._preempt(next(reversed(self.active.values())))     # the newest request (maybe s itself)
            if s.status == _RUNNING:
                self.cache.grow_row(s.row, want)
        for rid in [r for r in drafts if r not in self.active]:
            del drafts[rid]
        return [s for s in running if s.status == _RUNNING]

    def _free(self, s: _Seq) -> None:
        self.active.pop(s.req.request_id, None)
        if s.match is not None and self.prefix_cache is not None:
            self.prefix_cache.release(s.match)
            s.match = None
        if s.row >= 0:
            self.cache.reset_row(s.row)                 # its pages go back to the pool (or stay in the prefix cache)
            self.free_rows.append(s.row)
            s.row = -1
        s.status = "done"

    # ------------------------------------------------------------------ outputs
    def _output(self, s: _Seq, new_ids: list[int], text: str, lps: list[TokenLogprob] | None, finished: bool,
                reason: str | None) -> RequestOutput:
        plp = None
        if s.prompt_lps is not None and not s.prompt_lps_sent:
            plp, s.prompt_lps_sent = s.prompt_lps, True
        return RequestOutput(s.req.request_id, new_ids, text, lps, plp, finished, reason, len(s.prompt),
                             s.num_cached, len(s.output_ids), s.spec.as_dict() if s.spec is not None else None)

    def _detokenize(self, s: _Seq, final: bool) -> str:
        """The output text so far, extended by the new tokens' text. Only a few tokens are decoded per call
        (the new ones and a little context before them), so a long output costs O(1) per token; a piece that
        ends in an incomplete character waits for the next token unless `final`."""
        ids = s.output_ids
        before = self.tokenizer.decode(ids[s.prefix_offset:s.read_offset])
        after = self.tokenizer.decode(ids[s.prefix_offset:])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            s.text += after[len(before):]
            s.prefix_offset, s.read_offset = s.read_offset, len(ids)
        return s.text

    def _accept(self, s: _Seq, tok: int, lp: TokenLogprob | None) -> RequestOutput:
        """Take one sampled token: stop rules, text, finishing."""
        p = s.req.params
        lps = [lp] if lp is not None else ([] if s.req.logprobs is not None else None)
        tok_text = ""
        reason = None
        if tok in s.stop_ids:
            reason = "stop"
            new_ids = []
            lps = [] if lps is not None else None
        else:
            s.output_ids.append(tok)
            new_ids = [tok]
            self.counters["generation_tokens_total"] += 1
            if s.matcher is not None:
                tok_text, stopped = s.matcher.feed(self._detokenize(s, final=False))
                if stopped:
                    reason = "stop"
            if reason is None and len(s.output_ids) >= p.max_new_tokens:
                reason = "length"
        if reason is not None:
            if s.matcher is not None and not s.matcher.stopped:
                tok_text += s.matcher.flush(self._detokenize(s, final=True))
            self.counters["requests_finished"] += 1
            out = self._output(s, new_ids, tok_text, lps, True, reason)
            self._free(s)
            return out
        s.last_token = tok
        s.status = _RUNNING
        return self._output(s, new_ids, tok_text, lps, False, None)

    def _accept_tokens(self, s: _Seq, toks: list[int], lps: list[TokenLogprob | None]) -> RequestOutput:
        """Take the tokens of one verify step, in order, up to the one that finishes the request; one output.
        Without stop strings or logprobs, the tokens before the last that are neither stop tokens nor reach
        max_new_tokens are appended at once, and the last one's detokenization covers them all (the text of a
        span decoded with its context, as for one token): a verify step's outputs are host work of every step."""
        head = 0
        if (s.matcher is None or not s.matcher.stops) and s.req.logprobs is None:
            room = s.req.params.max_new_tokens - len(s.output_ids) - 1
            while head < min(len(toks) - 1, room) and toks[head] not in s.stop_ids:
                head += 1
            s.output_ids.extend(toks[:head])
            self.counters["generation_tokens_total"] += head
        mine = []
        for tok, lp in zip(toks[head:], lps[head:]):
            mine.append(self._accept(s, tok, lp))
            if mine[-1].finished:
                break
        out = _merge(mine)
        if head:
            out.new_token_ids = toks[:head] + out.new_token_ids
        return out

    def _sample(self, seqs: list[_Seq], logits: torch.Tensor) -> list[RequestOutput]:
        """Sample one token for each seq from its logits row (logits [len(seqs), V] fp32)."""
        greedy = [i for i, s in enumerate(seqs) if s.req.params.greedy]
        if len(greedy) == len(seqs):      # all greedy (the common case): no index upload, gather and scatter
            toks = torch.argmax(logits, dim=-1)
        else:
            toks = torch.empty(len(seqs), dtype=torch.long, device=logits.device)
            if greedy:
                g = torch.tensor(greedy, device=logits.device)
                toks[g] = torch.argmax(logits[g], dim=-1)
        # Unseeded rows with equal settings sample together; a seeded row draws from its own generator.
        groups: dict[tuple, list[int]] = {}
        for i, s in enumerate(seqs):
            p = s.req.params
            if p.greedy:
                continue
            if s.generator is not None:
                toks[i:i + 1] = sample_next(logits[i:i + 1], p, s.generator)
            else:
                groups.setdefault((p.temperature, p.top_k, p.top_p), []).append(i)
        for rows in groups.values():
            idx = torch.tensor(rows, device=logits.device)
            toks[idx] = sample_next(logits[idx], seqs[rows[0]].req.params)
        tok_list = toks.tolist()
        lps: list[TokenLogprob | None] = [None] * len(seqs)
        want = [i for i, s in enumerate(seqs) if s.req.logprobs is not None]
        if want:
            lp = torch.log_softmax(logits[want].float(), dim=-1)
            k = max(seqs[i].req.logprobs for i in want)
            got = _top_logprobs(lp, [tok_list[i] for i in want], k)
            for i, t in zip(want, got):
                t.top = t.top[:seqs[i].req.logprobs]
                lps[i] = t
        return [self._accept(s, t, lp) for s, t, lp in zip(seqs, tok_list, lps)]

    # ------------------------------------------------------------------ decode
    def bucket_for(self, rows: int) -> int:
        """The smallest decode batch-size bucket (CUDA graph) that holds rows [0, rows)."""
        return next(b for b in self.buckets if b >= rows)

    def _bucket_cache(self, b: int) -> StaticCache:
        """The cache rows [0, b) a step of bucket b runs on (the whole cache, or a view of its first rows)."""
        return self.cache if b == self.max_num_seqs else self.cache.rows_view(b)

    def _decode_step(self, b: int) -> GraphedDecodeStep:
        st = self._steps.get(b)
        if st is None:
            st = GraphedDecodeStep(DecodeStep(self.runner, self._bucket_cache(b)), use_graph=self.use_cuda_graph)
            self._steps[b] = st
        return st

    def _advance(self, seqs: list[_Seq], tokens: list[int] | None = None) -> None:
        """After a decode or verify step: each seq's host length grows by its kept tokens (`tokens`, by row;
        None: one each), the device lengths follow in one upload."""
        for s in seqs:
            self.cache.lengths[s.row] += 1 if tokens is None else tokens[s.row]
        self.cache.seqlens.copy_(torch.tensor(self.cache.lengths, dtype=torch.int32))
        self.counters["decode_steps"] += 1

    @torch.no_grad()
    def _decode(self, seqs: list[_Seq]) -> list[RequestOutput]:
        t0 = time.perf_counter()
        b = self.bucket_for(max(s.row for s in seqs) + 1)
        step = self._decode_step(b)
        ids = [0] * b
        for s in seqs:
            ids[s.row] = s.last_token
        # Rows of the bucket held by requests that do not decode this step (mid-prefill): their lightning states
        # must survive the step.
        decoding = {s.row for s in seqs}
        keep = [s.row for s in self.active.values() if s.row < b and s.row not in decoding]
        saved = self.cache.states[:, keep].clone() if keep else None
        step.ids.copy_(torch.tensor(ids, dtype=torch.long), non_blocking=False)
        logits = step()
        if keep:
            self.cache.states[:, keep] = saved
        self._advance(seqs)
        outs = self._sample(seqs, _rows_of(logits, seqs))     # (its host copy waits for the step)
        if self.drafter is not None:
            self.step_costs.record_decode(b, time.perf_counter() - t0)
        return outs

    # ------------------------------------------------------------------ speculative decoding
    def _drafts(self, s: _Seq) -> list[int]:
        """Draft tokens for a running request this step ([] = decode plainly)."""
        if s.adaptive is None:
            return []
        k = s.adaptive.next_k()
        # At most the tokens still allowed (the verify step adds one of its own) and the row's room.
        room = self.cache.capacity - self.cache.lengths[s.row] - 1
        k = min(k, s.req.params.max_new_tokens - len(s.output_ids) - 1, room)
        if k <= 0:
            return []
        told = len(s.draft_state.tokens) - len(s.prompt)    # output tokens the drafter has seen
        if len(s.output_ids) > told:
            s.draft_state.extend(s.output_ids[told:])
        return s.draft_state.propose(k)[:k]

    def _verify_size(self, tokens: int) -> int:
        """Tokens per row of the verify step that holds `tokens` (the smallest verify size >= tokens)."""
        return next((t for t in self.verify_sizes if t >= tokens), self.verify_sizes[-1])

    def _verify_cost(self, k: int) -> float:
        """r(k) of AdaptiveK: a verify step with k drafts in decode steps, as measured in this engine (the prior
        until measured)."""
        return self.step_costs.ratio(self._verify_size(k + 1))

    def _verify_step(self, b: int, T: int) -> GraphedDecodeStep:
        st = self._verify_steps.get((b, T))
        if st is None:
            if self._spec_snapshot is None:      # one snapshot buffer for every verify step (bucket and T)
                self._spec_snapshot = torch.empty_like(self.cache.states)
            st = GraphedDecodeStep(VerifyStep(self.runner, self._bucket_cache(b), T,
                                              snapshot=self._spec_snapshot[:, :b]), use_graph=self.use_cuda_graph)
            self._verify_steps[(b, T)] = st
        return st

    @torch.no_grad()
    def _verify(self, seqs: list[_Seq], drafts: dict[str, list[int]]) -> list[RequestOutput]:
        """One verify step for all running seqs (those without drafts take only their first position: a decode
        step); acceptance, rollback of every row of the bucket to its kept tokens, then the outputs."""
        t0 = time.perf_counter()
        b = self.bucket_for(max(s.row for s in seqs) + 1)
        T = self._verify_size(1 + max(len(d) for d in drafts.values()))
        step = self._verify_step(b, T)
        ids = [[0] * T for _ in range(b)]
        for s in seqs:
            d = drafts.get(s.req.request_id, [])
            ids[s.row] = [s.last_token] + d + [s.last_token] * (T - 1 - len(d))
        step.ids.copy_(torch.tensor(ids, dtype=torch.long))
        logits = step()                                                     # [b, T, V]
        keep = [0] * b                  # rows of the bucket that are not running keep nothing: their states return
        accepted: dict[str, tuple[list[int], int]] = {}
        plain = [s for s in seqs if s.req.request_id not in drafts]
        # greedy rows' target tokens: one argmax over the step's logits, one copy to the host
        best = (torch.argmax(logits, dim=-1).tolist()
                if any(s.req.params.greedy for s in seqs if s.req.request_id in drafts) else None)
        for s in seqs:
            d = drafts.get(s.req.request_id)
            if d is None:
                keep[s.row] = 1
                continue
            if s.req.params.greedy:
                toks, a = accept_greedy(best[s.row][:len(d) + 1], d)
            else:
                toks, a = accept_drafts(logits[s.row, :len(d) + 1], d, s.req.params, s.generator)
            accepted[s.req.request_id] = (toks, a)
            keep[s.row] = 1 + a
        if any(k < T for k in keep):
            step.keep.copy_(torch.tensor(keep, dtype=torch.long))
            step.rollback()
        self._advance(seqs, keep)
        outs = []
        for s in seqs:
            if s.req.request_id not in drafts:
                continue
            d, (toks, a) = drafts[s.req.request_id], accepted[s.req.request_id]
            self.counters["spec_verify_steps"] += 1
            self.counters["spec_draft_tokens_total"] += len(d)
            self.counters["spec_accepted_tokens_total"] += a
            s.spec.add(len(d), a)
            s.adaptive.update(len(d), a)
            lps: list[TokenLogprob | None] = [None] * len(toks)
            if s.req.logprobs is not None:
                lps = _top_logprobs(torch.log_softmax(logits[s.row, :len(toks)], dim=-1), toks, s.req.logprobs)
            outs.append(self._accept_tokens(s, toks, lps))
        if plain:
            outs.extend(self._sample(plain, _rows_of(logits, plain)[:, 0]))
        self.step_costs.record_verify(b, T, time.perf_counter() - t0)
        return outs

    # ------------------------------------------------------------------ prefill
    def _chunk_end(self, s: _Seq) -> int:
        """Where `s`'s next chunk ends: a full chunk on from its cached length, or less at the prompt's end, at a
        prefix-cache snapshot point, or at the last page boundary (whose state snapshot follow-ups reuse)."""
        ps, T = self.page_size, len(s.fill)
        start = self.cache.lengths[s.row]
        end = min(T, start + self.full_chunk)
        if start < s.split_at < end:
            end = s.split_at         # a snapshot there serves the next prompt that shares this prefix
        if end < T:
            aligned = end // ps * ps
            end = aligned if aligned > start else min(T, (start // ps + 1) * ps)
        elif self.prefix_cache is not None and T % ps and T // ps * ps > start:
            end = T // ps * ps
        return end

    @torch.no_grad()
    def _prefill(self, s: _Seq, end: int) -> RequestOutput | None:
        row = s.row
        start = self.cache.lengths[row]
        h = self.runner.prefill_chunk(s.fill_t[start:end], self.cache, row)
        if self.drafter is not None and s.draft_state is None:
            # the prompt's draft index is prompt processing: built while the GPU runs the first chunk, not inside
            # the decode steps
            s.draft_state = self.drafter.start(s.prompt)
        self.counters["prefill_tokens_total"] += end - start
        self.counters["prefill_chunks"] += 1
        T = len(s.fill)
        if s.prompt_lps is not None and not s.prompt_lps_sent:
            # Position j predicts prompt token j + 1; the last prompt position predicts the first output.
            n = min(end, T - 1) - start
            if n > 0:
                lp = torch.log_softmax(self.runner.logits_of(h[0, :n]), dim=-1)
                s.prompt_lps.extend(_top_logprobs(lp, s.prompt[start + 1:start + 1 + n], s.req.prompt_logprobs))
        if self.prefix_cache is not None and end % self.page_size == 0:
            s.stored = self.prefix_cache.store(s.fill, self.cache, row, end, s.stored, s.page_keys)
        if end < T:
            return None
        if s.resumed:                         # back where it was preempted: its next step feeds s.last_token
            del h
            s.resumed = False
            s.status = _RUNNING
            return None
        logits = self.runner.logits_of(h[:, -1])
        del h
        return self._sample([s], logits)[0]

    # ------------------------------------------------------------------ the loop
    def step(self) -> list[RequestOutput]:
        """One scheduler iteration: a decode step for the running sequences, admissions, prefill chunks under
        the token budget. Returns an output for every request that progressed (or was aborted)."""
        outputs, self._aborted = self._aborted, []
        running = [s for s in self.active.values() if s.status == _RUNNING]
        drafts = ({s.req.request_id: d for s in running if (d := self._drafts(s))}
                  if len(running) <= self.speculative_max_batch else {})
        running = self._grow_for_step(running, drafts)
        if drafts:
            outputs.extend(self._verify(running, drafts))
        elif running:
            outputs.extend(self._decode(running))
        self._admit()
        # Up to max_tokens_per_step prompt tokens (the decode tokens come on top). Prompts that finish within one
        # chunk go first (a long prompt does not hold back the first token of short ones), then the others in
        # arrival order. A chunk runs whole or waits for the next step: no sliver of a prompt to fill the budget
        # (its length would be one-off, run eagerly, and a chunk's fixed cost is most of a short one's).
        budget = self.max_tokens_per_step
        prefilling = [s for s in self.active.values() if s.status == _PREFILL]
        prefilling.sort(key=lambda s: len(s.fill) - self.cache.lengths[s.row] > self.full_chunk)
        for s in prefilling:
            while s.status == _PREFILL:
                start = self.cache.lengths[s.row]
                end = self._chunk_end(s)
                if end - start > budget:
                    break
                budget -= end - start
                out = self._prefill(s, end)
                if out is not None:
                    outputs.append(out)
            if budget < self.page_size:
                break
        return outputs

    def run_until_done(self) -> list[RequestOutput]:
        """Step until every queued request finished; all outputs in order (tests, offline use)."""
        out = []
        while self.has_unfinished():
            out.extend(self.step())
        return out
