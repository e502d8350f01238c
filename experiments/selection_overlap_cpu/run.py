"""How much do the selected blocks of neighbouring queries overlap: a trained model on real text vs random inputs.

The sparse benchmark (`sala bench kernels --op sparse`) feeds random q and k. Random block scores make every
query's top-k set nearly independent of its neighbours', so a kernel that loads each selected block once for a
tile of TM queries (`SALA_SPARSE_ATTN=tiled`) gains nothing there. This measures the same statistic on the bundled
(trained) SALA model reading real text, with the model's own selection (the reference on the CPU).

For each sparse layer, KV head and aligned tile of TM consecutive queries (positions past dense_positions):
  chosen = selected blocks that are not forced (not an init block, not in the local window up to the own block);
  reuse = sum over the tile's queries of |chosen| / |union of chosen| (1 = no shared block, TM = identical sets);
  load ratio = |union of all selected blocks of the tile| / (TM x blocks per query), the share of the per-query
  kernel's block loads a tiled kernel would make.

    python experiments/selection_overlap_cpu/run.py --tokens 8192 --out experiments/selection_overlap_cpu/results.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import sala.ops.infllmv2 as I  # noqa: E402
from sala.data.corpus import iter_source_documents  # noqa: E402
from sala.modeling.tokenizer import load_tokenizer  # noqa: E402
from sala.train.model_factory import load_model_dir  # noqa: E402
from sala.utils.bundled import bundled_model_dir  # noqa: E402


def tile_stats(idx: torch.Tensor, q_offset: int, params: I.SparseParams, tiles: tuple[int, ...]) -> dict:
    """idx [B, Hkv, Tq, total] (-1 padded) of queries at q_offset...; statistics per tile size."""
    B, H, Tq, _ = idx.shape
    pos = q_offset + torch.arange(Tq)
    own = pos // params.block_size
    out = {}
    for tm in tiles:
        reuse, load = [], []
        for b in range(B):
            for h in range(H):
                for t0 in range(0, Tq - tm + 1, tm):
                    sets, chosen = [], []
                    for t in range(t0, t0 + tm):
                        s = {int(x) for x in idx[b, h, t].tolist() if x >= 0}
                        lo = int(own[t]) - params.local_blocks
                        sets.append(s)
                        chosen.append({x for x in s if x >= params.init_blocks and not lo <= x <= int(own[t])})
                    union_chosen = set().union(*chosen)
                    if union_chosen:
                        reuse.append(sum(map(len, chosen)) / len(union_chosen))
                    load.append(len(set().union(*sets)) / sum(map(len, sets)))
        out[str(tm)] = {"reuse_mean": sum(reuse) / max(1, len(reuse)), "load_ratio_mean": sum(load) / max(1, len(load)),
                        "tiles": len(load)}
    return out


def real_text_ids(tok, n_tokens: int) -> torch.Tensor:
    """The first stdlib documents, concatenated, cut to n_tokens (real Python source and prose)."""
    ids: list[int] = []
    for _, text in iter_source_documents("stdlib"):
        ids += tok.encode(text)
        if len(ids) >= n_tokens:
            break
    return torch.tensor([ids[:n_tokens]])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--tiles", default="2,4,8,16")
    ap.add_argument("--out", default=str(Path(__file__).with_name("results.json")))
    args = ap.parse_args()
    tiles = tuple(int(x) for x in args.tiles.split(","))
    torch.manual_seed(0)
    mdir = bundled_model_dir()
    model = load_model_dir(mdir).eval()
    tok = load_tokenizer(str(mdir))
    cfg = model.config
    records = []
    orig = I.select_blocks

    def recording(q, k1, k2, params, *, q_offset, scale=None):
        idx = orig(q, k1, k2, params, q_offset=q_offset, scale=scale)
        records.append((idx, q_offset, params, q.shape, k1.shape))
        return idx

    I.select_blocks = recording
    t0 = time.time()
    with torch.no_grad():
        model(input_ids=real_text_ids(tok, args.tokens), use_cache=False)
    I.select_blocks = orig
    result = {"model": str(mdir.relative_to(ROOT)), "tokens": args.tokens, "sparse_config": cfg.sparse_config,
              "forward_s": time.time() - t0, "real": [], "random": []}
    for n, (idx, off, params, qshape, k1shape) in enumerate(records):
        result["real"].append({"call": n, "q_offset": off, "queries": qshape[1],
                               "blocks_per_query": params.total_blocks, "stats": tile_stats(idx, off, params, tiles)})
        # the same call's shape with random q and k (what the sparse benchmark feeds)
        Tk = off + qshape[1]
        g = torch.Generator().manual_seed(n)
        q = torch.randn(qshape, generator=g)
        k = torch.randn(1, Tk, k1shape[2], qshape[3], generator=g)
        k1 = I.compress_keys(k, params.kernel_size, params.kernel_stride)
        k2 = I.compress_keys(k, params.k2_kernel, params.k2_stride)
        ridx = orig(q, k1, k2, params, q_offset=off)
        result["random"].append({"call": n, "stats": tile_stats(ridx, off, params, tiles)})
        print(n, "real", result["real"][-1]["stats"], "\n  random", result["random"][-1]["stats"], flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
