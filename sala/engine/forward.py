"""The engine's runner: input preparation for the model's own layers over a `StaticCache`.

- `ModelRunner.prefill_chunk` / `prefill_sequence`: one sequence, in chunks; the layers (in PREFILL mode) carry
  lightning states from chunk to chunk, append sparse K/V to the cache and extend the compressed keys; only the last
  position's logits are computed. A serving engine's chunks replay their dense pieces from CUDA graphs
  (`sala.engine.prefill_graph`).
- `DecodeStep`: one new token for every sequence of the cache (the layers in DECODE mode), with static shapes and
  no host syncs, so a CUDA graph can capture it; `decode_forward` is its forward for T tokens per row (the
  speculative verify step, `sala.engine.speculative.verify.VerifyStep`, runs it with T = k + 1).

There is no second copy of the layers here: `SalaModel.run_layers` runs them (`PiecewisePrefill` calls the same
layers, and their `pre_attention` / `post_attention` around the sparse layers' attention), told by a
`ForwardContext` which mode they are in and where the cache is; the elementwise pieces run as the fused ops of
`sala.ops.fused`.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from sala.engine.prefill_graph import PiecewisePrefill
from sala.engine.static_cache import StaticCache
from sala.modeling.configuration_sala import SalaConfig
from sala.modeling.context import DECODE, FUSED_OPS, PREFILL, REFERENCE_OPS, ElementwiseOps, ForwardContext
from sala.modeling.modeling_sala import SalaForCausalLM

# Names the A/B scripts use: the fused kernels (CUDA; references elsewhere) and the plain references.
FusedOps = ElementwiseOps
EAGER_OPS = FUSED_OPS


def compiled_ops(backend: str = "inductor") -> ElementwiseOps:
    """The references through torch.compile (dynamic shapes: one graph per piece for every layer and length)."""
    return ElementwiseOps(*(torch.compile(f, backend=backend, dynamic=True) for f in REFERENCE_OPS))


__all__ = ["ModelRunner", "DecodeStep", "decode_forward", "decode_buffers", "EAGER_OPS", "REFERENCE_OPS", "FusedOps",
           "compiled_ops"]


class ModelRunner:
    """Holds a model (its projections fused in place: `SalaForCausalLM.fuse_projections`) and runs prefill chunks.

    The elementwise pieces (RMSNorm with the residual add before it, QK-norm + RoPE, output norm + gate,
    SiLU x up) run as the fused kernels of `sala.ops.fused` (`ops` for prefill, `decode_ops` for decode).
    compile=True instead runs the prefill's pieces as torch.compile'd references (dynamic shapes: one graph
    per piece for every chunk length and layer); decode stays on the fused kernels (it is CUDA-graph
    captured). The first chunk pays the compilation.

    prefill_graphs > 0 (a serving engine on CUDA): chunks of a length seen before, up to
    `prefill_graph_max_tokens`, run as `PiecewisePrefill` (their dense pieces replayed from CUDA graphs, the sparse
    layers' attention eager); `pin_prefill_graphs` keeps the lengths the engine uses most.
    """

    def __init__(self, model: SalaForCausalLM, *, compile: bool = False, compile_backend: str = "inductor",
                 prefill_graphs: int = 0, prefill_graph_max_tokens: int = 2048) -> None:
        self.model = model
        self.config: SalaConfig = model.config
        self.device = model.lm_head.weight.device
        self.dtype = model.model.embed_tokens.weight.dtype     # the activations' (the LM head may be FP8)
        self.compiled = compile
        self.ops = compiled_ops(compile_backend) if compile else EAGER_OPS     # prefill
        self.decode_ops = EAGER_OPS                                             # decode (graph-captured)
        # One GEMM for q|k|v(|z or |o_gate) and one for gate|up per layer, as real parameters; gate|up in halves,
        # the layout the fused SiLU x up op reads (a model fused for training interleaves them)
        if any(layer.mlp.interleave for layer in model.model.layers):
            model.unfuse_projections()
        model.fuse_projections()
        # Serving chunks on CUDA: the dense pieces of up to `prefill_graphs` chunk lengths (the most recently used,
        # each <= prefill_graph_max_tokens) as CUDA graphs (`sala.engine.prefill_graph`), sharing one memory pool
        if prefill_graphs < 0 or prefill_graph_max_tokens < 1:
            raise ValueError(f"prefill_graphs ({prefill_graphs}) must be >= 0 and prefill_graph_max_tokens "
                             f"({prefill_graph_max_tokens}) >= 1")
        self.prefill_graphs = prefill_graphs if self.device.type == "cuda" and not compile else 0
        self.prefill_graph_max_tokens = prefill_graph_max_tokens
        self._pieces: OrderedDict[int, PiecewisePrefill] = OrderedDict()
        self._pinned: set[int] = set()
        self._seen: dict[int, int] = {}
        self._graph_pool = None

    def pin_prefill_graphs(self, lengths: list[int]) -> None:
        """Keep the piecewise graphs of these chunk lengths for good (never evicted; the engine's full chunk)."""
        self._pinned.update(n for n in lengths if n <= self.prefill_graph_max_tokens)

    def _pieces_for(self, length: int) -> PiecewisePrefill | None:
        """The piecewise-graphed prefill of chunks of `length` tokens, or None: graphs off, a chunk too long, or a
        length seen once so far (one-off lengths, a prompt's tail, run plainly rather than evict a graph). Pinned
        lengths stay; the others, up to `prefill_graphs` in all, the most recently used."""
        if not self.prefill_graphs or length > self.prefill_graph_max_tokens:
            return None
        pieces = self._pieces.get(length)
        if pieces is None:
            if length not in self._pinned:
                if len(self._seen) > 4096:
                    self._seen.clear()
                self._seen[length] = self._seen.get(length, 0) + 1
                if self._seen[length] < 2:
                    return None
            if self._graph_pool is None and self.device.type == "cuda":
                self._graph_pool = torch.cuda.graph_pool_handle()
            while len(self._pieces) >= max(self.prefill_graphs, len(self._pinned) + 1):
                victim = next((n for n in self._pieces if n not in self._pinned), None)
                if victim is None:
                    break
                del self._pieces[victim]                   # the least recently used unpinned length
            pieces = self._pieces[length] = PiecewisePrefill(self, length, pool=self._graph_pool)
        self._pieces.move_to_end(length)
        return pieces

    @torch.no_grad()
    def prefill_chunk(self, ids: torch.Tensor, cache: StaticCache, row: int) -> torch.Tensor:
        """Run tokens ids [T] of sequence `row` after its cached tokens; returns the last hidden state [1, T, hidden]
        (before the final norm: `logits_of` applies it). Updates the cache and its lengths. With prefill graphs on,
        the result may be a static buffer that the next chunk of the same length overwrites: use it first."""
        T = ids.shape[0]
        cache.check_room(row, T)
        start = cache.lengths[row]
        pieces = self._pieces_for(T)
        if pieces is not None:      # a static buffer: valid until the next chunk of this length
            h = pieces(ids, cache, row, start)
        else:
            positions = torch.arange(start, start + T, device=self.device)[None]
            ctx = ForwardContext(positions, ops=self.ops, mode=PREFILL, cache=cache, row=row, start=start)
            inner = self.model.model
            h, _ = inner.run_layers(inner.embed_tokens(ids[None]) * self.config.scale_emb, ctx)
        cache.lengths[row] = start + T
        cache.seqlens[row:row + 1].fill_(start + T)      # a fill kernel: no host sync (item assignment syncs)
        return h

    @torch.no_grad()
    def logits_of(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [..., V] fp32 of hidden states [..., H] (final norm applied here)."""
        h = self.model.model.norm(hidden)
        return self.model.lm_head(h / self.config.logit_divisor).float()

    @torch.no_grad()
    def prefill_sequence(self, ids: torch.Tensor, cache: StaticCache, row: int, chunk_size: int,
                         on_chunk=None) -> torch.Tensor:
        """Prefill all of ids [T] into `row` in chunks; returns the last position's logits [V] fp32."""
        if ids.dim() != 1 or ids.shape[0] < 1:
            raise ValueError(f"prefill: token ids must be a non-empty 1-D tensor, got shape {tuple(ids.shape)}")
        if chunk_size < 1:
            raise ValueError(f"prefill: chunk_size must be >= 1, got {chunk_size}")
        T = ids.shape[0]
        last = None
        for s in range(0, T, chunk_size):
            h = self.prefill_chunk(ids[s:s + chunk_size], cache, row)
            last = h[:, -1].clone()      # h may be a static buffer that the next chunk overwrites
            del h
            if on_chunk is not None:
                on_chunk(min(T, s + chunk_size), T)
        return self.logits_of(last)[0]


def decode_buffers(runner: ModelRunner, batch: int, tokens: int) -> dict[str, torch.Tensor]:
    """The attention outputs a DECODE call of `tokens` per row writes into (no allocation inside a graph)."""
    cfg, dev, dt = runner.config, runner.device, runner.dtype
    return {"lightning": torch.zeros(batch, tokens, cfg.lightning_nh, cfg.lightning_head_dim, dtype=dt, device=dev),
            "sparse": torch.zeros(batch, tokens, cfg.num_attention_heads, cfg.head_dim, dtype=dt, device=dev)}


@torch.no_grad()
def decode_forward(runner: ModelRunner, cache: StaticCache, ids: torch.Tensor, out: dict[str, torch.Tensor],
                   saved_kv: dict | None = None) -> torch.Tensor:
    """ids [B, T] after every row's cached tokens (positions from the device lengths, which then advance by T);
    returns the last hidden states [B, T, hidden] (before the final norm). No host sync."""
    T = ids.shape[1]
    positions = cache.seqlens.long()[:, None] + torch.arange(T, device=ids.device)     # [B, T]
    cache.seqlens.add_(T)
    ctx = ForwardContext(positions, ops=runner.decode_ops, mode=DECODE, cache=cache, out=out, saved_kv=saved_kv)
    inner = runner.model.model
    h, _ = inner.run_layers(inner.embed_tokens(ids) * runner.config.scale_emb, ctx)
    return h


class DecodeStep:
    """One decode step for all B sequences of a StaticCache, on static buffers (CUDA-graph capturable).

    Inputs: `ids` [B] int64 (the tokens to feed). Each call advances `cache.seqlens` by one on the device and
    writes logits [B, V] fp32 into `logits`. The host-side `cache.lengths` is the caller's.
    """

    def __init__(self, runner: ModelRunner, cache: StaticCache) -> None:
        self.runner = runner
        self.cache = cache
        B, dev = cache.batch, runner.device
        self.ids = torch.zeros(B, dtype=torch.long, device=dev)
        self.logits = torch.zeros(B, runner.config.vocab_size, dtype=torch.float32, device=dev)
        self.out = decode_buffers(runner, B, 1)

    @torch.no_grad()
    def __call__(self) -> torch.Tensor:
        h = decode_forward(self.runner, self.cache, self.ids[:, None], self.out)
        self.logits.copy_(self.runner.logits_of(h[:, 0]))
        return self.logits
