"""Plots of the latency benchmark in the paper's style: time vs context length, both models, log-x.

    python -m sala.bench.plots bench/results/latency_h200.json [--out-dir bench/results]
writes latency_ttft.png and latency_e2e.png next to the JSON (or into --out-dir).
"""
from __future__ import annotations

import argparse
import json
import os


def _label(n: int) -> str:
    return f"{n >> 20}M" if n >= 1 << 20 else f"{n >> 10}K"


def _series(block: dict, key: str) -> tuple[list[int], list[float], list[int]]:
    xs, ys, oom = [], [], []
    for n, r in sorted(((int(k), v) for k, v in block.items()), key=lambda t: t[0]):
        if r.get("status") == "ok" and r.get(key) is not None:
            xs.append(n)
            ys.append(float(r[key]))
        elif r.get("status") == "OOM":
            oom.append(n)
    return xs, ys, oom


def plot_latency(payload: dict, out_dir: str) -> list[str]:
    """Write latency_ttft.png and latency_e2e.png; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    device = payload.get("meta", {}).get("device", "GPU")
    nd = payload.get("setup", {}).get("decode_tokens", 1024)
    paths = []
    for key_s, key_b, title, name in (("ttft_s", "ttft_s", "Time to first token", "latency_ttft.png"),
                                      ("e2e_s_1024", "e2e_s", f"End-to-end (prefill + {nd} decoded tokens)",
                                       "latency_e2e.png")):
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=130)
        xs, ys, _ = _series(payload.get("sala", {}), key_s)
        ax.plot(xs, ys, "o-", color="#d62728", lw=2, label="MiniCPM-SALA 9B shape (sala engine)")
        for x, y in zip(xs, ys):
            ax.annotate(f"{y:.1f}s", (x, y), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8,
                        color="#d62728")
        bx, by, boom = _series(payload.get("baseline", {}), key_b)
        if bx or boom:
            ax.plot(bx, by, "s--", color="#1f77b4", lw=2, label="Qwen3-8B shape (HF transformers, SDPA)")
            for x, y in zip(bx, by):
                ax.annotate(f"{y:.1f}s", (x, y), textcoords="offset points", xytext=(0, -13), ha="center",
                            fontsize=8, color="#1f77b4")
            for x in boom:
                ax.annotate("OOM", (x, ax.get_ylim()[1] * 0.9 if ys else 1), ha="center", color="#1f77b4",
                            fontsize=9, fontweight="bold")
        ticks = sorted(set(xs) | set(bx) | set(boom))
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks)
        ax.set_xticklabels([_label(t) for t in ticks])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("seconds")
        ax.set_title(f"{title}, batch 1, bf16 ({device})", fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
        fig.tight_layout()
        path = os.path.join(out_dir, name)
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sala.bench.plots", description="plot a latency benchmark JSON")
    ap.add_argument("json_path")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    with open(args.json_path) as f:
        payload = json.load(f)
    for p in plot_latency(payload, args.out_dir or os.path.dirname(os.path.abspath(args.json_path))):
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
