"""Registers and stack (spill) bytes of the lightning output kernel compiled for sm_90, on a machine without a GPU.

`sala.bench.sm90` compiles it for sm_90 on the CPU and reads the resource use from the cubin. This is how the
factored intra-chunk decay and the reverse walk's mask were chosen before a GPU run (timing still needs the GPU:
`experiments/gpu_check.sh lightning`).
The result depends on the installed Triton (the H200 has 3.6: `pip install --target DIR triton==3.6.0` and put DIR
first on PYTHONPATH to match it).

    python experiments/profiling/lightning_sm90_resources.py          # default launch settings, both directions
    python experiments/profiling/lightning_sm90_resources.py --configs 128,128,8,2 64,64,4,2
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import triton  # noqa: E402

from sala.bench.sm90 import cubin_resources, lightning_output_kernel_sm90  # noqa: E402
from sala.ops import lightning_triton as lt  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="*", default=None, help="chunk,block_v,warps,stages (default: DEFAULT_CONFIG's)")
    args = ap.parse_args()
    c = lt.DEFAULT_CONFIG
    configs = [tuple(int(x) for x in s.split(",")) for s in args.configs] if args.configs else \
        [(c.chunk, c.block_v, c.num_warps, c.num_stages)]
    print(f"triton {triton.__version__}")
    for chunk, bv, warps, stages in configs:
        for factored in (False, True):
            for reverse in (False, True):
                tag = f"C={chunk} BV={bv} warps={warps} stages={stages} {'factored' if factored else 'table':8s} " \
                      f"{'reverse' if reverse else 'forward'}"
                try:
                    print(tag, cubin_resources(lightning_output_kernel_sm90(chunk, bv, warps, stages, factored=factored,
                                                                            reverse=reverse)))
                except Exception as exc:  # a setting that does not compile
                    print(tag, "FAILED:", str(exc).splitlines()[0][:160])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
