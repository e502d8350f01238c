"""How much host work one serving prefill chunk asks of Python: operator calls and Triton launches, counted on the
CPU (no GPU needed), for the plain prefill and for the piecewise one (`sala.engine.prefill_graph`), whose dense
pieces replay as CUDA graphs on a GPU, so that only the eager sparse-attention part is left to the host.

The model is the layer structure of `--preset` (the released 9B: 32 layers, sparse at 0, 9, 17, 25, 31) with small
widths; one sequence is prefilled up to `--context` tokens, then one `--chunk`-token chunk is counted. Kernels take
the Triton path (`SALA_KERNELS=triton` under `TRITON_INTERPRET=1`) with every launch counted and skipped, so the
counts are those of a GPU run and the (meaningless) values are never read. Operator calls are counted with a
TorchDispatchMode (one per aten op dispatched, views included), by the innermost `sala` frame that made them.

    python experiments/profiling/host_ops.py --context 16384 --chunk 512 --out host_ops.json
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import traceback
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"
os.environ["SALA_KERNELS"] = "triton"
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sala.bench.common import run_metadata, write_json  # noqa: E402


def _counters():
    """A TorchDispatchMode counting aten calls by op and by call site, and a patch counting Triton launches."""
    import torch  # noqa: F401
    import triton.runtime.interpreter as interp
    from torch.utils._python_dispatch import TorchDispatchMode

    launches: collections.Counter = collections.Counter()

    def run(self, *args, **kwargs):            # count the launch, skip the kernel
        launches[self.fn.__name__] += 1

    interp.InterpretedFunction.run = run

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: collections.Counter = collections.Counter()
            self.sites: collections.Counter = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            stack = traceback.extract_stack()
            site = next((f"{Path(f.filename).name}:{f.name}" for f in reversed(stack) if "/sala/" in f.filename), "?")
            self.ops[str(func.overloadpacket)] += 1
            self.sites[site] += 1
            return func(*args, **(kwargs or {}))

    return Count, launches


def count(preset: str, context: int, chunk: int, hidden: int = 256) -> dict:
    """Operator calls and Triton launches of one `chunk`-token prefill chunk after `context` cached tokens."""
    import torch

    from sala.engine.forward import ModelRunner
    from sala.engine.loading import random_model
    from sala.engine.prefill_graph import PiecewisePrefill
    from sala.engine.static_cache import StaticCache
    from sala.modeling.configuration_sala import SalaConfig

    Count, launches = _counters()
    base = SalaConfig.from_preset(preset)
    heads = max(2, hidden // 64)
    cfg = SalaConfig.from_preset(preset, hidden_size=hidden, intermediate_size=2 * hidden,
                                 num_attention_heads=heads, num_key_value_heads=min(base.num_key_value_heads, heads),
                                 head_dim=64, lightning_nh=heads, lightning_nkv=heads, lightning_head_dim=64,
                                 vocab_size=1024, dim_model_base=hidden)
    runner = ModelRunner(random_model(cfg, torch.device("cpu"), torch.float32, 0))
    cache = StaticCache(cfg, 1, context + 2 * chunk, torch.float32, "cpu")
    ids = torch.randint(3, cfg.vocab_size, (context + chunk,), generator=torch.Generator().manual_seed(0))
    if context:
        runner.prefill_chunk(ids[:context], cache, 0)
    pieces = PiecewisePrefill(runner, chunk)
    out = {}
    for name in ("plain", "piecewise_eager_part", "piecewise_all"):
        cache.lengths[0] = context
        part = ids[context:]
        if name == "piecewise_eager_part":     # what a GPU replay leaves to the host: the pieces are graphs
            pieces(part, cache, 0, context)                       # buffers allocated, then the pieces skipped
            cache.lengths[0] = context
            run_piece, pieces._piece = pieces._piece, lambda i: None
        launches.clear()
        mode = Count()
        with mode:
            if name == "plain":
                runner.prefill_chunk(part, cache, 0)
            else:
                pieces(part, cache, 0, context)
        if name == "piecewise_eager_part":
            pieces._piece = run_piece
        out[name] = {"aten_calls": sum(mode.ops.values()), "triton_launches": sum(launches.values()),
                     "top_ops": dict(mode.ops.most_common(12)), "top_sites": dict(mode.sites.most_common(12)),
                     "launches_by_kernel": dict(launches.most_common())}
    return {"preset": preset, "layers": cfg.num_hidden_layers, "sparse_layers": len(cfg.sparse_layer_ids),
            "context": context, "chunk": chunk, "counts": out}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="minicpm-sala-9b", help="the layer structure to count")
    ap.add_argument("--context", type=int, default=16384, help="tokens cached before the counted chunk")
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=256, help="the counted model's width (counts do not depend on it)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.context < 0 or a.chunk < 1:
        ap.error(f"--context must be >= 0 and --chunk >= 1, got {a.context} and {a.chunk}")
    res = count(a.preset, a.context, a.chunk, a.hidden)
    for name, c in res["counts"].items():
        print(f"{name}: {c['aten_calls']} operator calls, {c['triton_launches']} Triton launches", flush=True)
    if a.out:
        write_json(a.out, {"meta": run_metadata(), "benchmark": "host_ops", **res})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
