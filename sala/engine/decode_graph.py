"""CUDA-graph capture of the decode step and the speculative verify step: one graph per step object (its
StaticCache's batch size is the bucket; a verify step's tokens per row are part of its shapes).

The first call runs eagerly on a side stream (it compiles the Triton kernels and does real work), then the call
is captured once; every later call is one `graph.replay()` with no host work per layer. On CPU, or if capture
fails (an op that syncs), the call runs eagerly and `mode` says so.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch

from sala.engine.forward import DecodeStep


class GraphedCall:
    """`fn()` (static buffers in and out), replayed from a CUDA graph after its first eager call."""

    def __init__(self, fn: Callable[[], torch.Tensor | None], device: torch.device, *, use_graph: bool = True,
                 preserve: tuple[torch.Tensor, ...] = (), name: str = "decode step") -> None:
        self.fn = fn
        self.use_graph = use_graph and device.type == "cuda"
        self.preserve = preserve    # tensors whose values must be the same after the capture as before it
        self.name = name
        self.graph: torch.cuda.CUDAGraph | None = None
        self.result: torch.Tensor | None = None
        self.mode = "cuda-graph" if self.use_graph else "eager"
        self._calls = 0

    def _capture(self) -> None:
        graph = torch.cuda.CUDAGraph()
        saved = [t.clone() for t in self.preserve]
        try:
            with torch.cuda.graph(graph):
                self.result = self.fn()
        except Exception as e:  # noqa: BLE001 - any capture failure means: run eagerly
            warnings.warn(f"CUDA-graph capture of the {self.name} failed ({type(e).__name__}: {e}); running it "
                          "eagerly", RuntimeWarning, stacklevel=4)
            self.use_graph = False
            self.mode = "eager (capture failed)"
            torch.cuda.synchronize()
            for t, s in zip(self.preserve, saved):
                t.copy_(s)
            return
        for t, s in zip(self.preserve, saved):
            t.copy_(s)
        self.graph = graph

    def __call__(self) -> torch.Tensor | None:
        self._calls += 1
        if not self.use_graph:
            return self.fn()
        if self.graph is None:
            if self._calls == 1:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    out = self.fn()
                torch.cuda.current_stream().wait_stream(side)
                return out
            self._capture()
            if self.graph is None:
                return self.fn()
        self.graph.replay()
        return self.result


class GraphedDecodeStep:
    """Callable like the step it wraps (a `DecodeStep`, or a `VerifyStep` with its `rollback`): fill `ids`, call,
    read `logits` (a verify step: then fill `keep` and call `rollback()`), replaying CUDA graphs when it can."""

    def __init__(self, step: DecodeStep, use_graph: bool = True) -> None:
        self.step = step
        self.ids = step.ids
        self.logits = step.logits
        device = step.runner.device
        self._run = GraphedCall(step, device, use_graph=use_graph, preserve=(step.cache.seqlens,),
                                name="decode step" if isinstance(step, DecodeStep) else "verify step")
        self._rollback = (GraphedCall(step.rollback, device, use_graph=use_graph, name="verify rollback")
                          if hasattr(step, "rollback") else None)

    @property
    def mode(self) -> str:
        return self._run.mode

    @property
    def keep(self) -> torch.Tensor:
        return self.step.keep

    def __call__(self) -> torch.Tensor:
        return self._run()

    def rollback(self) -> None:
        self._rollback()
