"""A serving prefill chunk as CUDA graphs of its dense pieces, with the sparse layers' attention ops eager between
them (vLLM's "piecewise" graphs).

An eager prefill chunk launches every kernel from Python: ~2,000 operator calls and ~300 Triton launches for a
32-layer model, whatever the chunk's length, so a short serving chunk (512 tokens next to decoding streams) costs
more host time than GPU time. Most of that work has fixed shapes for a fixed chunk length: the projections, norms,
RoPE, MLPs and the lightning layers (whose state lives at a fixed address: the row is a device index). Only the
sparse layers' attention depends on how much is cached (K/V written at the chunk's offset, compressed keys
extended, selection and attention over the whole context), so it stays eager.

`PiecewisePrefill(runner, length)` splits a chunk of `length` tokens at the S sparse layers into S + 1 pieces:
piece 0 is the embedding, the layers before the first sparse layer and that layer's projections (q, k, v and the
gate input); piece i the output side of sparse layer i - 1 (output gate and projection, residual, MLP), the
lightning layers after it and the next sparse layer's projections; the last piece ends with the last layer. Pieces
hand over through static buffers (`hidden`, `q`, `k`, `v`, `gate`, and `o`, which the eager attention writes).

Calls on a CUDA device: the first runs the pieces eagerly on a side stream (it compiles the kernels); the second
captures every piece (nothing runs while capturing) and then replays them; later calls replay. A capture that
fails leaves every piece eager (`mode` says so). On the CPU the pieces always run eagerly: the same operations in
the same order, which is what the CPU tests compare against the plain forward.
"""
from __future__ import annotations

import logging
import warnings
from typing import Any

import torch

from sala.modeling.configuration_sala import SPARSE
from sala.modeling.context import PREFILL, ForwardContext

log = logging.getLogger(__name__)


class PiecewisePrefill:
    """One sequence's prefill chunk of exactly `length` tokens (see the module docstring).

    Call with ids [length] (on the runner's device), the static cache, the row and the tokens already cached for
    it; returns the last hidden state [1, length, hidden] (before the final norm), a static buffer that the next
    call of this object overwrites. The caller updates the cache's lengths, as `ModelRunner.prefill_chunk` does.
    """

    def __init__(self, runner: Any, length: int, *, use_graph: bool = True, pool: Any = None) -> None:
        if length < 1:
            raise ValueError(f"PiecewisePrefill: length must be >= 1, got {length}")
        self.runner = runner
        self.length = length
        inner = runner.model.model
        self.layers = inner.layers
        self.embed = inner.embed_tokens
        self.scale_emb = runner.config.scale_emb
        self.sparse = [i for i, layer in enumerate(self.layers) if layer.mixer_type == SPARSE]
        dev = runner.device
        self.use_graph = use_graph and dev.type == "cuda"
        if pool is None and self.use_graph:
            pool = torch.cuda.graph_pool_handle()
        self.pool = pool
        self.ids = torch.zeros(length, dtype=torch.long, device=dev)
        self.positions = torch.zeros(1, length, dtype=torch.long, device=dev)
        self._arange = torch.arange(length, device=dev)[None]
        self.row_index = torch.zeros(1, dtype=torch.long, device=dev)
        self.ctx = ForwardContext(self.positions, ops=runner.ops, mode=PREFILL, row_index=self.row_index)
        self.buffers: dict[str, torch.Tensor] = {}     # hidden, q, k, v, gate, o: allocated by the first call
        self.x_dtype: torch.dtype | None = None
        self.cache = None
        self.graphs: list[torch.cuda.CUDAGraph] | None = None
        self.mode = "cuda-graph" if self.use_graph else "eager"
        self._calls = 0

    @property
    def num_pieces(self) -> int:
        return len(self.sparse) + 1

    def _next_norm(self, j: int):
        return self.layers[j + 1].input_layernorm if j + 1 < len(self.layers) else None

    def _keep(self, name: str, t: torch.Tensor | None) -> None:
        """Hand `t` to the next piece through the static buffer `name` (allocated on first use)."""
        if t is None:
            return
        buf = self.buffers.get(name)
        if buf is None:
            buf = self.buffers[name] = torch.empty(t.shape, dtype=t.dtype, device=t.device)
        if buf.data_ptr() != t.data_ptr():
            buf.copy_(t)

    def _piece(self, i: int) -> None:
        """Piece i (no host syncs, fixed shapes): reads the static buffers and writes them."""
        ctx, layers, ops = self.ctx, self.layers, self.ctx.ops
        if i == 0:
            ctx._rope.clear()                            # RoPE of this call's positions, computed inside the piece
            hidden = self.embed(self.ids[None]) * self.scale_emb
            normed = layers[0].input_layernorm(hidden, ops)
            first = 0
        else:
            s = self.sparse[i - 1]
            b = self.buffers
            hidden, normed = layers[s].post_attention(b["hidden"], b["o"], b.get("gate"), self.x_dtype,
                                                      self._next_norm(s), ops)
            first = s + 1
        last = self.sparse[i] if i < len(self.sparse) else len(layers)
        for j in range(first, last):
            hidden, normed = layers[j](hidden, ctx, None, normed, self._next_norm(j))
        self._keep("hidden", hidden)
        if i < len(self.sparse):
            attn = layers[last].self_attn
            q, k, v, gate = layers[last].pre_attention(normed, *attn.rope(ctx), ctx.position_ids, ops)
            self.x_dtype = normed.dtype
            for name, t in (("q", q), ("k", k), ("v", v), ("gate", gate)):
                self._keep(name, t)

    def _attend(self, i: int, ctx: ForwardContext) -> None:
        """Sparse layer i's attention op, eager (ctx: the call's row and start): K/V into the cache row, compressed
        keys, attention."""
        b = self.buffers
        o = self.layers[self.sparse[i]].self_attn.attend(b["q"], b["k"], b["v"], ctx)
        if "o" not in b:
            b["o"] = torch.empty_like(o)
        b["o"].copy_(o)

    def _run(self, cache: Any, row: int, start: int) -> None:
        ctx = ForwardContext(self.positions, ops=self.ctx.ops, mode=PREFILL, cache=cache, row=row, start=start)
        for i in range(self.num_pieces):
            if self.graphs is not None:
                self.graphs[i].replay()
            else:
                self._piece(i)
            if i < len(self.sparse):
                self._attend(i, ctx)

    def _capture(self) -> None:
        """Capture every piece into a graph (nothing runs); on failure every piece stays eager."""
        graphs = []
        try:
            for i in range(self.num_pieces):
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=self.pool):
                    self._piece(i)
                graphs.append(g)
        except Exception as e:  # noqa: BLE001 - any capture failure means: run eagerly
            warnings.warn(f"CUDA-graph capture of the {self.length}-token prefill pieces failed "
                          f"({type(e).__name__}: {e}); running them eagerly", RuntimeWarning, stacklevel=3)
            torch.cuda.synchronize()
            self.use_graph = False
            self.mode = "eager (capture failed)"
            return
        self.graphs = graphs
        log.debug("captured the %d-token prefill in %d pieces", self.length, len(graphs))

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, cache: Any, row: int, start: int) -> torch.Tensor:
        if ids.shape != (self.length,):
            raise ValueError(f"PiecewisePrefill: ids must have shape ({self.length},), got {tuple(ids.shape)}")
        if cache is not self.cache:      # the graphs hold the cache's addresses: capture again for another cache
            self.cache, self.graphs, self._calls = cache, None, 0
            self.use_graph = self.mode == "cuda-graph"
        self.ctx.cache = cache
        self.ids.copy_(ids)
        torch.add(self._arange, start, out=self.positions)
        self.row_index.fill_(row)
        self._calls += 1
        if self.use_graph and self.graphs is None:
            if self._calls == 1:          # eager, on a side stream: kernels compiled, cuBLAS ready for capture
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    self._run(cache, row, start)
                torch.cuda.current_stream().wait_stream(side)
                return self.buffers["hidden"]
            self._capture()
        self._run(cache, row, start)
        return self.buffers["hidden"]
