"""Neighbour overlap of selected blocks at the released shape (128K tokens, top-k 64 + 32 local blocks) for random
inputs averaged over W tokens: which W makes random inputs overlap like the trained model's (run.py)?

    python experiments/selection_overlap_cpu/smoothed_random.py 1,16,64,256      # ~7 s per W on 2 CPU cores
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import tile_stats  # noqa: E402

import sala.ops.infllmv2 as I  # noqa: E402
from sala.bench.kernels_sparse import HKV, HQ, D, smooth_tokens  # noqa: E402

T, NQ = 131072, 1024   # the last 1024 queries of a 128K sequence (CPU reference selection)


def main() -> int:
    p = I.SparseParams()
    for w in [int(x) for x in (sys.argv[1] if len(sys.argv) > 1 else "1,16,64,256").split(",")]:
        g = torch.Generator().manual_seed(0)
        q = smooth_tokens(torch.randn(1, NQ + 512, HQ, D, generator=g), w)[:, 512:]
        k = smooth_tokens(torch.randn(1, T, HKV, D, generator=g), w)
        k1 = I.compress_keys(k, p.kernel_size, p.kernel_stride)
        k2 = I.compress_keys(k, p.k2_kernel, p.k2_stride)
        t0 = time.time()
        idx = I.select_blocks(q, k1, k2, p, q_offset=T - NQ)
        print(f"W={w}", tile_stats(idx, T - NQ, p, (8, 16)), f"{time.time() - t0:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
