"""Same-run GPU regression check of two source trees (e.g. before and after a refactor).

Each tree runs in its own subprocess with only that tree on PYTHONPATH, through public APIs that both trees have
(`sala.ops.infllmv2_attention`, `sala.ops.lightning_attention`, `sala.ops.lightning_decode_step`,
`sala.engine.SalaEngine`, `SalaForCausalLM`), and the parent writes one JSON with both trees' medians and the
ratios new / base (> 1 means slower).

    python experiments/regression/gpu_regression.py --tree base=runs/baseline --tree new=. \
        --out bench/results/regression_one_forward_h200.json

Measured: InfLLM-V2 whole forward (compression + selection + attention) at 32K and 128K and forward + backward at
32K (32 query / 2 KV heads, head dim 128, bf16, released sparse settings); Lightning chunked forward at 64K and
forward + backward at 16K (32 heads x 128) and the decode step at batch 64; the 9B shape through SalaEngine
(random weights, bf16): prefill TTFT at 64K and decode tokens/s; a training step (fwd + bwd, bf16 autocast) of the
sala-small shape at 8 x 4096 tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def _bench(fn, warmup: int = 2, rep: int = 7) -> float:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rep):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return float(statistics.median(times))


def worker(parts: list[str]) -> dict:
    """Measurements of the tree on sys.path (ms unless the key says otherwise)."""
    import torch

    import sala
    from sala.modeling.configuration_sala import SalaConfig
    from sala.modeling.modeling_sala import SalaForCausalLM
    from sala.ops import infllmv2_attention, lightning_attention, lightning_decode_step
    from sala.ops.infllmv2 import SparseParams
    from sala.ops.slopes import lightning_log_decay

    out: dict = {"sala_file": sala.__file__}
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, dtype=torch.bfloat16, grad=False):
        t = torch.randn(*shape, generator=g, device=dev, dtype=torch.float32).to(dtype)
        return t.requires_grad_(grad)

    if "sparse" in parts:
        p = SparseParams()
        for T in (32768, 131072):
            q, k, v = rnd(1, T, 32, 128), rnd(1, T, 2, 128), rnd(1, T, 2, 128)
            with torch.no_grad():
                out[f"sparse_fwd_{T}"] = _bench(lambda: infllmv2_attention(q, k, v, p))
            del q, k, v
        T = 32768
        q, k, v = rnd(1, T, 32, 128, grad=True), rnd(1, T, 2, 128, grad=True), rnd(1, T, 2, 128, grad=True)
        do = rnd(1, T, 32, 128)

        def fb():
            o = infllmv2_attention(q, k, v, p)
            o.backward(do)
        out[f"sparse_fwd_bwd_{T}"] = _bench(fb)
        del q, k, v, do
        torch.cuda.empty_cache()

    if "lightning" in parts:
        ld = lightning_log_decay(32, device=dev)
        T = 65536
        q, k, v = rnd(1, T, 32, 128), rnd(1, T, 32, 128), rnd(1, T, 32, 128)
        with torch.no_grad():
            out[f"lightning_fwd_{T}"] = _bench(lambda: lightning_attention(q, k, v, ld, output_final_state=True))
        T = 16384
        q, k, v = rnd(1, T, 32, 128, grad=True), rnd(1, T, 32, 128, grad=True), rnd(1, T, 32, 128, grad=True)
        do = rnd(1, T, 32, 128)

        def lfb():
            o, _ = lightning_attention(q, k, v, ld)
            o.backward(do)
        out[f"lightning_fwd_bwd_{T}"] = _bench(lfb)
        B = 64
        qd, kd, vd = rnd(B, 32, 128), rnd(B, 32, 128), rnd(B, 32, 128)
        state = torch.zeros(B, 32, 128, 128, device=dev)
        with torch.no_grad():
            out["lightning_decode_b64_us"] = 1e3 * _bench(lambda: lightning_decode_step(qd, kd, vd, ld, state),
                                                          warmup=5, rep=50)
        del q, k, v, do
        torch.cuda.empty_cache()

    if "train" in parts:
        cfg = SalaConfig.from_preset("sala-small")
        model = SalaForCausalLM(cfg).to(dev).train()
        ids = torch.randint(3, cfg.vocab_size, (8, 4096), device=dev, generator=g)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss   # as the trainer calls it
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        out["train_step_small_8x4096"] = _bench(step, warmup=3, rep=10)
        del model, opt
        torch.cuda.empty_cache()

    if "engine" in parts:
        from sala.engine import SalaEngine, SamplingParams

        eng = SalaEngine.from_preset("minicpm-sala-9b", random_weights=True, dtype="bfloat16")
        T = 65536
        prompt = torch.randint(3, 70000, (T,), generator=torch.Generator().manual_seed(1)).tolist()
        sp = SamplingParams(max_new_tokens=64, ignore_eos=True)
        eng.generate([prompt[:4096]], SamplingParams(max_new_tokens=8, ignore_eos=True))   # warm: kernels, graph
        ttft, tps = [], []
        for _ in range(2):
            r = eng.generate([prompt], sp)[0]
            ttft.append(r.ttft_s * 1e3)
            tps.append(r.decode_tokens_per_s)
        out[f"engine_9b_ttft_{T}"] = float(min(ttft))
        out[f"engine_9b_decode_tok_s_{T}"] = float(max(tps))
        out["engine_decode_mode"] = eng.decode_mode
        del eng
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", action="append", default=[], help="NAME=DIR, a source tree (repeat; first = base)")
    ap.add_argument("--parts", default="sparse,lightning,engine,train")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "regression.json"))
    ap.add_argument("--worker-json", help=argparse.SUPPRESS)
    args = ap.parse_args()
    parts = args.parts.split(",")
    if args.worker_json:
        res = worker(parts)
        with open(args.worker_json, "w") as f:
            json.dump(res, f)
        return
    if len(args.tree) < 2:
        ap.error("give at least two --tree NAME=DIR")
    trees = [t.split("=", 1) for t in args.tree]
    results: dict = {}
    for name, tree in trees:
        tree = os.path.abspath(tree)
        results[name] = {"tree": tree}
        t0 = time.time()
        for part in parts:      # one process per part: a part that fails leaves the others' numbers
            fd, tmp = tempfile.mkstemp(suffix=".json")
            os.close(fd)
            env = {**os.environ, "PYTHONPATH": tree, "PYTHONUNBUFFERED": "1"}
            env.pop("SALA_KERNELS", None)
            done = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker-json", tmp, "--parts", part],
                                  cwd=tree, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                results[name][f"{part}_error"] = done.stderr[-1500:]
            else:
                with open(tmp) as f:
                    results[name].update(json.load(f))
            os.unlink(tmp)
        results[name]["wall_s"] = round(time.time() - t0, 1)
        print(name, json.dumps(results[name])[:2000], flush=True)
    base_name = trees[0][0]
    ratios = {}
    for name, _ in trees[1:]:
        r = {}
        for key, val in results[base_name].items():
            other = results[name].get(key)
            if isinstance(val, float) and isinstance(other, float) and val:
                r[key] = round(other / val, 4)
        ratios[f"{name}/{base_name}"] = r
    import torch

    meta = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "command": " ".join(sys.argv),
            "commit": os.environ.get("SALA_GIT_COMMIT", "unknown")}
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        pass
    payload = {"meta": meta, "note": "ms unless the key says otherwise; ratio = new / base (> 1 slower, except "
               "decode tok/s where > 1 is faster)", "results": results, "ratios": ratios}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(args.out + ".tmp", args.out)
    print(json.dumps(ratios, indent=1))


if __name__ == "__main__":
    main()
