"""Host (Python) cost per call of the lightning ops in two source trees, with the Triton launches stubbed out, on
the CPU: what an eager GPU call pays before its kernels start, independent of the GPU.

    python experiments/regression/host_overhead.py --tree base=runs/baseline --tree new=. \
        --out bench/results/regression_host_overhead_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def worker() -> dict:
    import statistics
    import time

    import torch

    import sala.ops.lightning as lightning
    import sala.ops.lightning_triton as lt
    from sala.ops.slopes import lightning_log_decay

    lightning.use_triton = lambda *a: True
    setattr(lt, "launch" if hasattr(lt, "launch") else "_launch", lambda *a, **k: None)
    ld = lightning_log_decay(32)
    q, k, v = (torch.randn(64, 32, 128, dtype=torch.bfloat16) for _ in range(3))
    state = torch.zeros(64, 32, 128, 128)
    qf, kf, vf = (torch.randn(1, 8192, 32, 128, dtype=torch.bfloat16) for _ in range(3))

    def per_call_us(fn, n: int) -> float:
        for _ in range(20):
            fn()
        runs = []
        for _ in range(7):
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            runs.append((time.perf_counter() - t0) / n * 1e6)
        return statistics.median(runs)

    return {"decode_step_b64_us": per_call_us(lambda: lightning.lightning_decode_step(q, k, v, ld, state), 2000),
            "forward_8k_us": per_call_us(lambda: lightning.lightning_attention(qf, kf, vf, ld,
                                                                               output_final_state=True), 200)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", action="append", default=[], help="NAME=DIR (first = base)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker()))
        return
    results = {}
    for name, tree in (t.split("=", 1) for t in args.tree):
        env = {**os.environ, "PYTHONPATH": os.path.abspath(tree), "OMP_NUM_THREADS": "1"}
        env.pop("TRITON_INTERPRET", None)
        done = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", "--out", "-"], env=env,
                              cwd=os.path.abspath(tree), capture_output=True, text=True, check=True)
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    base = args.tree[0].split("=", 1)[0]
    ratios = {n: {k: round(v / results[base][k], 4) for k, v in r.items()} for n, r in results.items() if n != base}
    import platform

    import torch
    payload = {"meta": {"device": f"cpu: {platform.machine()}", "torch": torch.__version__,
                        "command": " ".join(sys.argv), "commit": os.environ.get("SALA_GIT_COMMIT", "unknown")},
               "note": "microseconds of Python per call, Triton launches stubbed; medians of 7 runs",
               "results": results, "ratios": ratios}
    with open(args.out + ".tmp", "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(args.out + ".tmp", args.out)
    print(json.dumps(payload["ratios"]))


if __name__ == "__main__":
    main()
