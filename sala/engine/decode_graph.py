"""CUDA-graph capture of the decode step: one graph per StaticCache (its batch size is the bucket).

The first step runs eagerly on a side stream (it compiles the Triton kernels and is a real decode step),
then the step is captured once; every later step is one `graph.replay()` with no host work per layer.
On CPU, or if capture fails (an op that syncs), the step runs eagerly and `mode` says so.
"""
from __future__ import annotations

import warnings

import torch

from sala.engine.forward import DecodeStep


class GraphedDecodeStep:
    """Callable like DecodeStep (fill `ids`, call, read `logits`), replaying a CUDA graph when it can."""

    def __init__(self, step: DecodeStep, use_graph: bool = True) -> None:
        self.step = step
        self.ids = step.ids
        self.logits = step.logits
        self.use_graph = use_graph and step.runner.device.type == "cuda"
        self.graph: torch.cuda.CUDAGraph | None = None
        self.mode = "cuda-graph" if self.use_graph else "eager"
        self._calls = 0

    def _capture(self) -> None:
        graph = torch.cuda.CUDAGraph()
        seqlens = self.step.cache.seqlens
        # Capture records without executing; keep the cache lengths as they are around it.
        saved = seqlens.clone()
        try:
            with torch.cuda.graph(graph):
                self.step()
        except Exception as e:  # noqa: BLE001 - any capture failure means: run eagerly
            warnings.warn(f"CUDA-graph capture of the decode step failed ({type(e).__name__}: {e}); "
                          "decoding eagerly", RuntimeWarning, stacklevel=3)
            self.use_graph = False
            self.mode = "eager (capture failed)"
            torch.cuda.synchronize()
            seqlens.copy_(saved)
            return
        seqlens.copy_(saved)
        self.graph = graph

    def __call__(self) -> torch.Tensor:
        self._calls += 1
        if not self.use_graph:
            return self.step()
        if self.graph is None:
            if self._calls == 1:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    out = self.step()
                torch.cuda.current_stream().wait_stream(side)
                return out
            self._capture()
            if self.graph is None:
                return self.step()
        self.graph.replay()
        return self.logits
