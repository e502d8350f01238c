"""`sala generate`: stream a continuation of a prompt (or a file) from a SALA model."""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from sala.utils.bundled import BUNDLED_MODEL_DIR as BUNDLED_MODEL
from sala.utils.bundled import bundled_model_dir
from sala.utils.errors import UsageError

# Prefill chunk on the CPU when --chunk-size is not given: small enough that a long prompt reports progress.
CPU_CHUNK_SIZE = 4096
_ESCAPE = re.compile(r"\\(u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|x[0-9a-fA-F]{2}|[ntr0\\'\"])")
_SIMPLE = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", "\\": "\\", "'": "'", '"': '"'}


def unescape(text: str) -> str:
    """Backslash escapes of a command-line string: \\n, \\t, \\r, \\0, \\\\, \\', \\", \\xHH, \\uHHHH, \\UHHHHHHHH
    (other backslashes stay as they are; non-ASCII text is untouched)."""
    def one(m: re.Match) -> str:
        e = m.group(1)
        if e[0] in "uUx":
            return chr(int(e[1:], 16))
        return _SIMPLE[e]

    return _ESCAPE.sub(one, text)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text from a prompt (long contexts: chunked prefill)",
                              description="Generate a continuation with a SALA model, streaming tokens to stdout.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help=f"model directory (default: the bundled model at {BUNDLED_MODEL}, if present)")
    src.add_argument("--preset", help="a preset shape (minicpm-sala-9b, sala-small, sala-tiny); needs --random-weights")
    p.add_argument("--random-weights", action="store_true", help="random weights for --preset (benchmarking)")
    inp = p.add_mutually_exclusive_group(required=True)
    inp.add_argument("--prompt", help="prompt text")
    inp.add_argument("--prompt-file", help="read the prompt from this file ('-' for stdin)")
    inp.add_argument("--input", help="JSONL of prompts ({\"prompt\": ..., optional \"id\" and sampling fields}): "
                                     "batch generation with continuous batching; needs --output")
    p.add_argument("--output", help="JSONL results for --input, in input order (appended; a re-run skips ids done)")
    p.add_argument("--chat", action="store_true",
                   help="send the prompt as a user message through the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=positive_int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--stop", action="append", default=[],
                   help="stop string (repeatable); escapes such as \\n, \\t, \\\\ and \\u2028 are interpreted")
    p.add_argument("--stop-token-id", type=int, action="append", default=[], help="stop token id (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the model's EOS tokens")
    p.add_argument("--no-bos", action="store_true",
                   help="do not prepend the BOS token (default: as the tokenizer's add_bos_token setting says)")
    p.add_argument("--chunk-size", type=positive_int, default=None,
                   help=f"prefill chunk in tokens (default 16384 on a GPU, {CPU_CHUNK_SIZE} on the CPU)")
    p.add_argument("--no-progress", action="store_true", help="no prefill progress bar on stderr")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (and weight seed with --random-weights)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32")
    p.add_argument("--quantization", choices=["none", "fp8"], default="none",
                   help="fp8: FP8 projection and LM-head weights (Ada/Hopper GPUs); an FP8 checkpoint loads as fp8")
    p.add_argument("--no-cuda-graph", action="store_true", help="decode eagerly (debugging)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the prefill's elementwise work "
                        "(long prompts on a GPU; the first chunk compiles)")
    p.add_argument("--speculative", default=None, metavar="ngram|draft:DIR",
                   help="speculative decoding: n-gram prompt lookup, or a draft model directory (same tokenizer)")
    p.add_argument("--num-speculative-tokens", type=int, default=4,
                   help="most draft tokens per verify step (adaptive; default 4)")
    p.add_argument("--stats", action="store_true", help="print prompt length, TTFT and decode speed to stderr")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    from sala.commands._replicas import add_generate_replica_args

    add_generate_replica_args(p)
    p.set_defaults(func=run)


def _read_prompt(args) -> str:
    if args.prompt is not None:
        return args.prompt
    if args.prompt_file == "-":
        return sys.stdin.read()
    path = Path(args.prompt_file)
    if path.is_dir():
        raise UsageError(f"--prompt-file {path} is a directory: give a text file ('-' reads stdin)")
    if not path.exists():
        raise FileNotFoundError(f"--prompt-file {path}: no such file")
    return path.read_text(encoding="utf-8", errors="replace")


def _tokenizer_for_preset(vocab_size: int):
    from sala.modeling.tokenizer import load_tokenizer

    tok = load_tokenizer(None)
    if tok.vocab_size > vocab_size:
        raise ValueError(f"the shipped tokenizer has {tok.vocab_size} tokens, more than this preset's vocabulary "
                         f"({vocab_size}): pass a model directory with its own tokenizer")
    return tok


def _prefill_progress(engine, enabled: bool):
    """Make `engine.prefill` report tokens done / total, tokens/s and ETA on stderr (shown after 2 s); returns the
    bar (closed by the caller)."""
    from sala.utils.progress import progress

    bar = progress(None, desc="prefill", unit="tok", enabled=enabled, unit_scale=True)
    prefill = engine.prefill

    def on_chunk(row: int, done: int, total: int) -> None:
        if bar.total != total:
            bar.reset(total=total)
        bar.update(done - bar.n)

    def prefill_with_progress(prompt_ids, capacity, on_chunk_=None):
        return prefill(prompt_ids, capacity, on_chunk=on_chunk_ or on_chunk)

    engine.prefill = prefill_with_progress
    return bar


def run(args: argparse.Namespace) -> int:
    import torch

    if args.replicas:
        from sala.serve.offline_replicas import generate_replicas_command

        return generate_replicas_command(args)
    if args.input is not None or args.output is not None:
        from sala.engine.llm import generate_command

        return generate_command(args)

    from sala.engine import DEFAULT_CHUNK_SIZE, SalaEngine, SamplingParams
    from sala.engine.loading import default_device
    from sala.engine.memory import check_context
    from sala.modeling import SalaConfig
    from sala.utils.devices import check_device

    check_device(args.device)
    stops = [unescape(s) for s in args.stop]
    if any(not s for s in stops):
        raise UsageError("--stop: a stop string is empty")
    device = torch.device(args.device) if args.device else default_device()
    prompt = _read_prompt(args)
    if not prompt and not args.chat:
        raise UsageError("the prompt is empty: give --prompt TEXT or a --prompt-file with text")
    chunk = args.chunk_size or (DEFAULT_CHUNK_SIZE if device.type == "cuda" else CPU_CHUNK_SIZE)
    kw = dict(device=args.device, dtype=args.dtype, chunk_size=chunk, use_cuda_graph=not args.no_cuda_graph,
              compile=args.compile, quantization=args.quantization)
    if args.preset:
        if not args.random_weights:
            raise UsageError(f"preset {args.preset!r} ships no weights: add --random-weights, or pass --model DIR")
        config = SalaConfig.from_preset(args.preset)
        tok = _tokenizer_for_preset(config.vocab_size)
    else:
        if args.random_weights:
            raise UsageError("--random-weights goes with --preset, not with --model")
        model_dir = Path(args.model) if args.model else bundled_model_dir()
        if model_dir is None:
            raise FileNotFoundError(f"no model given and no bundled model at {BUNDLED_MODEL}: pass --model DIR "
                                    "(a SALA checkpoint directory), or --preset NAME --random-weights")
        if not model_dir.is_dir():
            raise FileNotFoundError(f"--model {model_dir}: no such directory")
        from sala.engine.loading import load_config_dir, load_tokenizer_dir
        from sala.modeling.checkpoint import check_config_json

        check_config_json(model_dir)
        config = load_config_dir(model_dir)
        tok = load_tokenizer_dir(model_dir)
        if tok is None:
            raise FileNotFoundError(f"{model_dir} has no tokenizer (tokenizer.json / tokenizer_config.json): "
                                    "`sala generate` needs one to read the prompt")
    add_bos = tok.add_bos and not args.no_bos
    if args.chat:
        from sala.modeling.tokenizer import render_chat

        prompt = render_chat(tok, [{"role": "user", "content": prompt}])
        add_bos = False   # the template writes BOS itself
    ids = tok.encode(prompt, add_bos=add_bos)
    n_prompt = len(ids)
    check_context(config, n_prompt + args.max_new_tokens)
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, stop=stops, stop_token_ids=list(args.stop_token_id),
                              ignore_eos=args.ignore_eos, seed=args.seed)
    if args.speculative:
        return _generate_speculative(args, args.preset or str(model_dir), tok, ids, sampling, chunk)
    if args.preset:
        engine = SalaEngine.from_preset(args.preset, random_weights=True, seed=args.seed or 0, tokenizer=tok,
                                        context=n_prompt + args.max_new_tokens, **kw)
    else:
        engine = SalaEngine.from_pretrained(model_dir, context=n_prompt + args.max_new_tokens, **kw)
        engine.tokenizer = tok
    bar = _prefill_progress(engine, enabled=not args.no_progress)
    results = []
    out = sys.stdout
    try:
        for ev in engine.iter_generate([prompt], sampling, add_bos=add_bos, results=results):
            if bar is not None:
                bar.close()
                bar = None
            if ev.text:
                out.write(ev.text)
                out.flush()
    finally:
        if bar is not None:
            bar.close()
    out.write("\n")
    out.flush()
    if args.stats:
        r = results[0]
        dev = torch.device(engine.device)
        print(f"[prompt {r.prompt_tokens} tokens, generated {len(r.token_ids)} ({r.finish_reason}), "
              f"TTFT {r.ttft_s:.3f} s, decode {r.decode_tokens_per_s:.1f} tokens/s, {dev}, "
              f"decode {engine.decode_mode}]", file=sys.stderr)
    return 0


def _generate_speculative(args, source: str, tok, ids: list[int], sampling, chunk: int) -> int:
    """One prompt (token ids, as the plain path encodes them) through EngineCore with speculative decoding,
    streamed to stdout. source: the preset name or model folder the plain path resolved."""
    import time

    from sala.engine.prefix_cache import PAGE_SIZE as page
    from sala.engine.requests import Request
    from sala.engine.scheduler import EngineCore

    max_len = -(-(len(ids) + sampling.max_new_tokens) // page) * page
    kw = dict(device=args.device, dtype=None if args.dtype == "auto" else args.dtype, max_num_seqs=1,
              max_model_len=max_len, enable_prefix_cache=False, chunk_size=max(chunk, page),
              use_cuda_graph=not args.no_cuda_graph, speculative=args.speculative,
              num_speculative_tokens=args.num_speculative_tokens, quantization=args.quantization)
    if args.preset:
        kw["seed"] = args.seed or 0
    core = EngineCore.from_pretrained(str(source), **kw)
    core.tokenizer = tok
    t0 = time.perf_counter()
    core.add_request(Request("0", ids, sampling))
    last, first_at = None, None
    out = sys.stdout
    while core.has_unfinished():
        for o in core.step():
            if o.new_token_ids and first_at is None:
                first_at = time.perf_counter()
            if o.new_text:
                out.write(o.new_text)
                out.flush()
            last = o
    out.write("\n")
    out.flush()
    if args.stats and last is not None:
        end = time.perf_counter()
        n = last.num_output_tokens
        rate = (n - 1) / (end - first_at) if first_at is not None and n > 1 and end > first_at else 0.0
        sp = last.speculative or {}
        print(f"[prompt {len(ids)} tokens, generated {n} ({last.finish_reason}), TTFT "
              f"{(first_at or end) - t0:.3f} s, decode {rate:.1f} tokens/s, speculative {args.speculative}: "
              f"acceptance {sp.get('acceptance_rate', 0.0):.2f}, {sp.get('mean_accepted_length', 0.0):.2f} "
              "tokens per verify step]", file=sys.stderr)
    return 0
