"""Hunt for non-finite values in sparse-on training steps on the GPU (a decay branch of run 14 went NaN).

Two sweeps, each over random packings of 16 x 4096 tokens with documents long enough for the sparse path
(lengths drawn log-uniformly, plus the edge lengths around the dense prefix and block boundaries):
- op: `infllmv2_attention` forward + backward at sala-small's shape (Hq 8, Hkv 2, d 64) on bf16 q, k, v of
  random scale; counts packings with a non-finite output or gradient;
- model: the 12-layer sala-small with sparse attention on, bf16 autocast over fp32 weights, fused projections
  off and on for the same batch: losses, gradient norms, finiteness.

  python3 experiments/train_small/sparse_training_nan_check.py --seconds 120 --out runs/sparse_nan_check.json
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def packing(rng, total: int, dense: int, block: int) -> list[int]:
    """Document boundaries [0, ..., total]: log-uniform lengths 1..8192 mixed with edge lengths."""
    edges = [dense - 1, dense, dense + 1, dense + block - 1, dense + block, dense + block + 1, 2 * dense + 3,
             4096, 4095, 4097]
    bounds, s = [0], 0
    while s < total:
        if rng.random() < 0.3:
            L = edges[int(rng.integers(len(edges)))]
        else:
            L = int(math.exp(rng.uniform(0, math.log(8192))))
        s = min(total, s + max(1, L))
        bounds.append(s)
    return bounds


def main() -> None:
    import numpy as np
    import torch

    from sala.bench.common import run_metadata, write_json
    from sala.modeling.configuration_sala import SalaConfig
    from sala.modeling.modeling_sala import SalaForCausalLM, sparse_params_from_config
    from sala.ops.infllmv2 import infllmv2_attention
    from sala.train.model_factory import set_fused_projections

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=120.0, help="time for both sweeps together")
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--out", default="runs/sparse_nan_check.json")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = SalaConfig.from_preset("sala-small", num_hidden_layers=12, vocab_size=8192, use_sparse_attention=True)
    p = sparse_params_from_config(cfg)
    rng = np.random.default_rng(0)
    t_end = time.time() + args.seconds / 2
    op = {"packings": 0, "nonfinite": []}
    while time.time() < t_end:
        bounds = packing(rng, args.tokens, p.dense_positions, p.block_size)
        scale = float(rng.choice([0.5, 1.0, 3.0, 10.0]))
        g = torch.Generator(device=dev).manual_seed(op["packings"])
        q = (torch.randn(1, args.tokens, 8, 64, device=dev, generator=g) * scale).bfloat16().requires_grad_()
        k = (torch.randn(1, args.tokens, 2, 64, device=dev, generator=g) * scale).bfloat16().requires_grad_()
        v = torch.randn(1, args.tokens, 2, 64, device=dev, generator=g).bfloat16().requires_grad_()
        cu = torch.tensor(bounds)
        o = infllmv2_attention(q, k, v, p, cu_seqlens=cu)
        do = torch.randn_like(o)
        gq, gk, gv = torch.autograd.grad(o, (q, k, v), do)
        bad = [n for n, t in (("o", o), ("dq", gq), ("dk", gk), ("dv", gv)) if not torch.isfinite(t).all()]
        if bad:
            op["nonfinite"].append({"bounds": bounds, "scale": scale, "tensors": bad})
            print("non-finite", bad, "scale", scale, "lengths", np.diff(bounds).tolist(), flush=True)
        op["packings"] += 1
    print(f"op sweep: {op['packings']} packings, {len(op['nonfinite'])} with non-finite values", flush=True)

    model = SalaForCausalLM(cfg).to(dev)
    t_end = time.time() + args.seconds / 2
    runs = []
    while time.time() < t_end:
        bounds = packing(rng, args.tokens, p.dense_positions, p.block_size)
        ids = torch.randint(3, 8192, (1, args.tokens), device=dev)
        row = {"lengths_max": int(np.diff(bounds).max())}
        for fused in (False, True):
            set_fused_projections(model, fused)
            model.zero_grad(set_to_none=True)
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids, cu_seqlens=torch.tensor(bounds), use_cache=False).loss
            loss.backward()
            gn = torch.nn.utils.get_total_norm([w.grad for w in model.parameters() if w.grad is not None])
            row["fused" if fused else "separate"] = {"loss": float(loss.detach()), "grad_norm": float(gn)}
        runs.append(row)
        print(row, flush=True)
    set_fused_projections(model, False)
    finite = all(math.isfinite(r[m][f]) for r in runs for m in ("fused", "separate") for f in ("loss", "grad_norm"))
    print(f"model sweep: {len(runs)} batches, all finite: {finite}", flush=True)
    write_json(args.out, {"meta": run_metadata(), "params": vars(args), "op": op, "model": runs,
                          "model_all_finite": finite})


if __name__ == "__main__":
    main()
