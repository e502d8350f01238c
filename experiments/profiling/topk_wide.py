"""Top-k of wide pooled-score rows (long contexts): the two-round Triton top-k (`topk_blocks_triton` on rows wider
than `topk_max_cols`, i.e. `triton_topk._topk_wide`: the top k of every 4,096-column tile, then of their
candidates) against the reference `topk_block_indices` (chunked torch.topk + cumsum tie rule). The H100 run
(bench/results/topk_wide_h100.json: 9.8-11.1x faster at 8,192 rows, the same indices) made the two-round top-k
the selection's path for wide rows; the reference remained for other dtypes and k > topk_max_cols.

Rows are those of one 512-token prefill chunk (2 KV heads: 1,024 rows) or of a 16K-token prefill query chunk, with
as many columns as 64-token blocks at 512K / 1M / 2M tokens. Results must be identical (checked); medians in ms.

    python experiments/profiling/topk_wide.py --out bench/results/topk_wide_h100.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sala.bench.common import bench_ms, run_metadata, write_json  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    import torch

    from sala.ops.infllmv2.params import DEFAULT_KERNEL_CONFIG
    from sala.ops.infllmv2.reference import topk_block_indices
    from sala.ops.infllmv2.triton_topk import topk_blocks_triton

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1024,8192")
    p.add_argument("--columns", default="8192,16384,32768")
    p.add_argument("--k", type=int, default=96)
    p.add_argument("--out", default="topk_wide.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("topk_wide: needs a CUDA GPU")
    g = torch.Generator(device="cuda").manual_seed(0)
    cases = []
    for R in (int(x) for x in args.rows.split(",")):
        for n in (int(x) for x in args.columns.split(",")):
            x = torch.rand(R, n, device="cuda", generator=g)
            x[:, :: 97] = x[:, :1]                      # ties
            x[:, 0] = float("inf")                      # forced blocks
            x[R // 2:, n // 2:] = float("-inf")         # blocks after the query's own
            want = topk_block_indices(x, args.k)
            got = topk_blocks_triton(x, args.k, max_cols=DEFAULT_KERNEL_CONFIG.topk_max_cols)
            same = bool(torch.equal(got, want))
            ref_ms = bench_ms(lambda: topk_block_indices(x, args.k), warmup=3, rep=20)
            new_ms = bench_ms(lambda: topk_blocks_triton(x, args.k, max_cols=DEFAULT_KERNEL_CONFIG.topk_max_cols),
                              warmup=3, rep=20)
            cases.append({"rows": R, "columns": n, "k": args.k, "identical": same, "reference_ms": ref_ms,
                          "two_round_ms": new_ms, "speedup": ref_ms / new_ms})
            print(cases[-1], flush=True)
    write_json(args.out, {"meta": run_metadata(), "benchmark": "topk_wide", "cases": cases})
    print(f"wrote {args.out}")
    return 0 if all(c["identical"] for c in cases) else 1


if __name__ == "__main__":
    raise SystemExit(main())
