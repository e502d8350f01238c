"""`sala data prepare|train-tokenizer|synth`: offline corpus -> packed token files, tokenizers, synthetic tasks."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("data", help="prepare packed training data, train a tokenizer, write synthetic tasks",
                              description="Data for `sala train`: tokenize and pack documents into memory-mapped "
                                          "token files with a held-out split.")
    sub = p.add_subparsers(dest="data_command", metavar="ACTION")

    pr = sub.add_parser("prepare", help="tokenize + pack documents into a folder of memory-mapped token files")
    pr.add_argument("out", help="output folder (train.bin, val.bin, *.docs.npy, meta.json, tokenizer/)")
    pr.add_argument("--source", action="append", default=None,
                    help="'stdlib' (Python's standard library: *.py, *.txt, *.rst; the default), 'python-packages' "
                         "(the installed packages' *.py, *.txt, *.rst, *.md), a text file, a "
                         "folder, a .jsonl file (field 'text'; or FILE.jsonl:FIELD). Repeatable.")
    pr.add_argument("--tokenizer", default="sala",
                    help="'sala' (the shipped 8K BPE), a tokenizer.json or a model folder")
    pr.add_argument("--val-fraction", type=float, default=0.02, help="share of documents held out (default 0.02)")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--synthetic-fraction", type=float, default=0.0,
                    help="share of training tokens made of synthetic retrieval samples (default 0)")
    pr.add_argument("--synthetic-tasks", default="niah_single,niah_multikey,niah_multivalue,vt")
    pr.add_argument("--synthetic-lengths", default="512,1024,2048", help="sample lengths in tokens, e.g. 1k,2k,4k")
    pr.add_argument("--max-docs", type=int, default=None,
                    help="stop after this many documents (>= 1; default: every document)")
    pr.add_argument("--overwrite", action="store_true",
                    help="rebuild OUT when it holds a dataset made with other options (replaced once the new one is "
                         "complete); without it, such a folder is refused and one with the same options is reused")
    pr.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    pr.set_defaults(func=_prepare)

    tt = sub.add_parser("train-tokenizer", help="train a byte-level BPE on documents and save tokenizer.json")
    tt.add_argument("out", help="output folder")
    tt.add_argument("--source", action="append", default=None, help="as for prepare (default stdlib)")
    tt.add_argument("--vocab-size", type=int, default=8192)
    tt.set_defaults(func=_train_tokenizer)

    sy = sub.add_parser("synth", help="write synthetic RULER-style samples as JSONL")
    sy.add_argument("out", help="output .jsonl")
    sy.add_argument("--task", default="niah_single")
    sy.add_argument("--length", default="4k", help="length in tokens of --tokenizer (e.g. 4096, 4k)")
    sy.add_argument("--num-samples", type=int, default=100)
    sy.add_argument("--tokenizer", default="sala")
    sy.add_argument("--seed", type=int, default=0)
    sy.set_defaults(func=_synth)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def _prepare(args: argparse.Namespace) -> int:
    from sala.data.prepare import SyntheticMix, prepare
    from sala.eval.runner import parse_lengths

    synth = None
    if args.synthetic_fraction > 0:
        synth = SyntheticMix(fraction=args.synthetic_fraction, tasks=tuple(args.synthetic_tasks.split(",")),
                             lengths=tuple(parse_lengths(args.synthetic_lengths)), seed=args.seed + 1234)
    prepare(args.out, args.source or ["stdlib"], tokenizer=args.tokenizer, val_fraction=args.val_fraction,
            seed=args.seed, synthetic=synth, max_docs=args.max_docs, overwrite=args.overwrite, log=print,
            show_progress=not args.no_progress)
    return 0


def _train_tokenizer(args: argparse.Namespace) -> int:
    from sala.data.corpus import iter_source_documents
    from sala.modeling.tokenizer import train_bpe

    texts = (t for s in (args.source or ["stdlib"]) for _, t in iter_source_documents(s))
    tok = train_bpe(texts, vocab_size=args.vocab_size)
    tok.save(args.out)
    print(f"wrote {args.out}/tokenizer.json ({tok.vocab_size} tokens)")
    return 0


def _synth(args: argparse.Namespace) -> int:
    from sala.eval.runner import parse_lengths
    from sala.eval.tasks import generate, write_jsonl
    from sala.modeling.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    n = 0
    for L in parse_lengths(args.length):
        n += write_jsonl(generate(args.task, L, args.num_samples, tok.count, seed=args.seed), args.out)
    print(f"wrote {n} samples to {args.out}")
    return 0
