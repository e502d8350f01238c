"""`sala demo`: on a CPU, hide a needle in a long document, ask for it, and compare SALA with a dense model.

Default model: the bundled one (sala/assets/model: a small converted SALA model with its tokenizer), next
to the bundled dense teacher it was converted from (sala/assets/model/teacher) when shipped. Without a
bundled model the demo runs a random-weights `sala-small` model (the answer is noise; a note says so) and
a same-size all-dense SALA configuration as the stand-in for the dense model.
"""
from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

from sala.utils.bundled import BUNDLED_MODEL_DIR as BUNDLED_MODEL
from sala.utils.bundled import bundled_model_dir


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="needle-in-a-haystack on the CPU: SALA vs a same-size dense model",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help=f"SALA model folder (default: {BUNDLED_MODEL})")
    p.add_argument("--dense", default=None,
                   help="dense comparison model folder (default: the bundled teacher, else an all-dense stand-in)")
    p.add_argument("--length", type=int, default=4096, help="document length in tokens (default 4096)")
    p.add_argument("--depth", type=float, default=0.3, help="needle position, 0 = start, 1 = end (default 0.3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-dense", action="store_true", help="skip the dense comparison")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--no-progress", action="store_true", help="no prefill progress bar on stderr")
    p.set_defaults(func=run)


def _rss_mb() -> float:
    """Peak resident memory of this process so far (MB)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _load(model_dir: Path | None, preset_note: list[str]):
    """(SALA model, tokenizer, where it came from)."""
    import torch
    from transformers import AutoModelForCausalLM

    import sala  # noqa: F401  (registers SALA with the Auto classes)
    from sala.modeling.tokenizer import load_tokenizer

    if model_dir is not None:
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{model_dir}: no config.json (not a model folder)")
        from sala.modeling.checkpoint import check_config_json

        check_config_json(model_dir)
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        tok = load_tokenizer(model_dir if (model_dir / "tokenizer.json").is_file() else None)
        return model, tok, str(model_dir)
    from sala.modeling.configuration_sala import SalaConfig
    from sala.modeling.modeling_sala import SalaForCausalLM

    tok = load_tokenizer(None)
    torch.manual_seed(0)
    cfg = SalaConfig.from_preset("sala-small", vocab_size=max(tok.vocab_size, 8192))
    preset_note.append("note: no bundled model found (sala/assets/model); running a RANDOM-WEIGHTS sala-small "
                       "model: its answer is noise, the time and memory numbers are real")
    return SalaForCausalLM(cfg).eval(), tok, "sala-small (random weights)"


def _dense_standin(model):
    """A same-size SALA configuration with every layer dense softmax (RoPE, dense attention): the stand-in."""
    import torch

    from sala.modeling.configuration_sala import SPARSE
    from sala.modeling.modeling_sala import SalaForCausalLM

    cfg = model.config.__class__.from_dict(model.config.to_dict())
    cfg.mixer_types = [SPARSE] * cfg.num_hidden_layers
    cfg.attn_use_rope = True
    cfg.use_sparse_attention = False
    torch.manual_seed(1)
    return SalaForCausalLM(cfg).eval()


def _haystack(tok, length: int, depth: float, seed: int):
    from sala.eval.tasks import generate

    s = next(generate("niah_single", length, 1, tok.count, seed=seed, depths=[depth]))
    return s


# Prefill chunk of the demo: long documents report progress per chunk (the same logits as one call).
PREFILL_CHUNK = 2048


def _answer(model, tok, ids, max_new_tokens: int, show_progress: bool = True) -> tuple[str, float, float]:
    """Greedy answer; returns (text, prefill seconds, total seconds)."""
    from sala.eval.runner import greedy_answer

    t0 = time.perf_counter()
    text, t_prefill = greedy_answer(model, ids, max_new_tokens, tok, chunk_size=PREFILL_CHUNK,
                                    show_progress=show_progress)
    return text, t_prefill, time.perf_counter() - t0


def _cache_mb(model, length: int) -> float:
    """Inference state after `length` tokens: KV cache of softmax layers + fixed states of lightning layers (fp32)."""
    c = model.config
    total = 0
    for m in c.mixer_types:
        if m == "minicpm4":
            total += 2 * length * c.num_key_value_heads * c.head_dim
        else:
            total += c.lightning_nh * c.lightning_head_dim * c.lightning_head_dim
    return total * 4 / 1e6


def run(args: argparse.Namespace) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    notes: list[str] = []
    model_dir = Path(args.model) if args.model else bundled_model_dir()
    model, tok, source = _load(model_dir, notes)
    if args.length < 256:
        raise ValueError(f"--length must be at least 256 tokens, got {args.length}")
    if not 0.0 <= args.depth <= 1.0:
        raise ValueError(f"--depth must be in [0, 1], got {args.depth}")
    if model.config.vocab_size < tok.vocab_size:
        raise ValueError(f"model vocabulary ({model.config.vocab_size}) is smaller than the tokenizer's "
                         f"({tok.vocab_size})")
    for n in notes:
        print(n)
    sample = _haystack(tok, args.length, args.depth, args.seed)
    ids = torch.tensor([tok.encode(sample.input, add_bos=tok.add_bos)])
    print(f"document: {ids.shape[1]} tokens, one needle at depth {args.depth:.0%}; the question is at the end:")
    print("  ..." + sample.input[-160:].replace("\n", " "))
    print(f"gold answer: {sample.outputs[0]}\n")

    rows = []
    n_sparse = model.config.mixer_types.count("minicpm4")
    rows.append((f"SALA ({n_sparse} sparse + {model.config.num_hidden_layers - n_sparse} lightning layers)",
                 source, model))
    if not args.no_dense:
        dense_dir = Path(args.dense) if args.dense else (model_dir / "teacher" if model_dir is not None else None)
        if dense_dir is not None and (dense_dir / "config.json").is_file():
            from transformers import AutoModelForCausalLM

            rows.append(("dense teacher (all softmax, RoPE)", str(dense_dir),
                         AutoModelForCausalLM.from_pretrained(str(dense_dir), dtype=torch.float32).eval()))
        else:
            rows.append(("dense stand-in (same size, all layers softmax, random weights)", "stand-in",
                         _dense_standin(model)))
            print("note: no dense teacher shipped; the dense row is a same-size all-softmax SALA configuration "
                  "with random weights (time and memory only)\n")
    for name, src, m in rows:
        gc.collect()
        text, t_pre, t_all = _answer(m, tok, ids, sample.max_new_tokens, show_progress=not args.no_progress)
        ok = all(g in text for g in sample.outputs)
        params = sum(p.numel() for p in m.parameters()) / 1e6
        state = _cache_mb(m, ids.shape[1]) if hasattr(m.config, "mixer_types") else (
            2 * ids.shape[1] * m.config.num_key_value_heads * getattr(m.config, "head_dim", 64)
            * m.config.num_hidden_layers * 4 / 1e6)
        print(f"{name}\n  model: {src} ({params:.1f}M params)\n  answer: {text.strip()!r} -> "
              f"{'CORRECT' if ok else 'wrong'}\n  prefill {t_pre:.2f}s, total {t_all:.2f}s, "
              f"inference state {state:.1f} MB, process peak RSS {_rss_mb():.0f} MB\n")
    return 0
