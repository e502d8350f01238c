"""Small-scale reproduction of the MiniCPM-SALA / HALO claims, one subcommand per step.

  prepare   (CPU)  packed stdlib + synthetic-retrieval token file, and the eval prompts (JSONL)
  teacher   (GPU)  dense Llama-style RoPE teacher trained from scratch at 2K context for a time budget
  convert   (GPU)  `sala convert` into SALA, all-lightning and SALA-with-RoPE (15% of the teacher's tokens), then,
                   with --continue-fraction > 0, continual training with the trainer (sala.train.continual)
  eval      (GPU)  held-out LM loss at 2K; needle / multi-key / variable tracking at 1x, 4x, 16x, 64x
  plot      (CPU)  plots and the Markdown table from the results JSON
  gpu       (GPU)  teacher + convert + eval + the bundled-model pipeline in one time-budgeted run

Every subcommand takes --tiny (toy sizes: the CPU smoke test of the whole script), --continue-fraction and
--teacher-doc-share. Offline throughout. experiments/repro_halo/README.md has the numbers and what they do and do
not show; docs/convert.md how conversion works.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

TASKS = ("niah_single", "niah_multikey", "vt")
TRAIN_LEN = 2048
EVAL_LENGTHS = (2048, 8192, 32768, 131072)
EVAL_SAMPLES = {2048: 10, 8192: 10, 32768: 10, 131072: 6}   # 16x: 10 prompts, so 90% means 9 of 10
SPARSE = {"kernel_size": 32, "kernel_stride": 16, "block_size": 64, "topk": 24, "init_blocks": 1,
          "window_size": 512, "dense_len": 2048}     # 1x (2K) is fully dense; longer prompts are sparse
REPRO_TEACHER = dict(hidden_size=384, intermediate_size=1152, num_hidden_layers=8, num_attention_heads=6,
                     num_key_value_heads=2, head_dim=64)
# share of the teacher's 2K windows that start at a document start, so its 256-2048-token retrieval samples are
# seen whole (question and answer); --teacher-doc-share. Off by default: it did not help the teacher's needle and
# made its held-out loss worse (experiments/repro_halo/README.md)
TEACHER_DOC_START_SHARE = 0.0
BUNDLE_TEACHER = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=64)
# conversion token budget as fractions of the teacher's training tokens (<= 0.25 in all, the limit): HALO's
# stages 1 and 2 and a CE fine-tune inside `sala convert`, then, optionally, continual training with the trainer
# (warmup + exponential decay, sparse on) on retrieval-rich data (`continue`, --continue-fraction, default 0: it
# cost held-out loss without improving the needle at 16x, experiments/repro_halo/README.md).
FRACTIONS = {"stage1": 0.03, "stage2": 0.06, "finetune": 0.06, "continue": 0.0}


def configure(tiny: bool, continue_fraction: float, teacher_doc_share: float) -> None:
    """Set the run's sizes and budgets from the command line (--tiny, --continue-fraction, --teacher-doc-share)."""
    global TRAIN_LEN, EVAL_LENGTHS, EVAL_SAMPLES, REPRO_TEACHER, BUNDLE_TEACHER, SPARSE, TEACHER_DOC_START_SHARE
    if tiny:   # CPU smoke test of the whole script at toy sizes
        TRAIN_LEN, EVAL_LENGTHS, EVAL_SAMPLES = 256, (256, 1024), {256: 2, 1024: 2}
        REPRO_TEACHER = BUNDLE_TEACHER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                              num_attention_heads=4, num_key_value_heads=2, head_dim=16)
        SPARSE = {**SPARSE, "block_size": 32, "topk": 4, "window_size": 128, "kernel_size": 16, "kernel_stride": 8}
    FRACTIONS["continue"] = continue_fraction
    TEACHER_DOC_START_SHARE = teacher_doc_share
CONTINUE = {"synthetic_fraction": 0.6, "lr": 1e-3, "micro_batch": 16}


def log(msg: str) -> None:
    print(f"[repro {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- prepare (CPU)
def cmd_prepare(args) -> None:
    from sala.data.prepare import SyntheticMix, prepare
    from sala.eval.tasks import generate, write_jsonl
    from sala.modeling.tokenizer import load_tokenizer

    data = Path(args.data)
    if not (data / "meta.json").is_file():
        prepare(str(data), ["stdlib"], tokenizer=None, val_fraction=0.03, seed=0, max_docs=args.max_docs,
                synthetic=SyntheticMix(fraction=0.3, tasks=TASKS, lengths=tuple(L for L in (256, 512, 1024, 2048)
                                                                          if L <= TRAIN_LEN), seed=1234))
    tok = load_tokenizer(data / "tokenizer")
    (data / "eval").mkdir(exist_ok=True)
    for task in TASKS:
        for length in EVAL_LENGTHS:
            path = data / "eval" / f"{task}_{length}.jsonl"
            if not path.is_file():
                write_jsonl(generate(task, length, EVAL_SAMPLES[length], tok.count, seed=4242), str(path))
                log(f"eval prompts {path.name}")


# ----------------------------------------------------------------------------- teacher (GPU)
def train_teacher(data: str, out: str, seconds: float, shape: dict, batch: int = 16, lr: float = 2e-3,
                  seq_len: int | None = None, seed: int = 0, doc_start_share: float = 0.0,
                  max_steps: int | None = None) -> dict:
    """Train a transformers LlamaForCausalLM (RoPE, GQA, SwiGLU) from scratch for `seconds` of wall time, or for
    `max_steps` optimizer steps when given (then `seconds` is ignored: a plan that does not depend on the machine).

    `doc_start_share` of each batch's windows start at a document start (whole retrieval samples, see
    `TokenSource.train_batch`); the rest at random offsets."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sala.convert.data import TokenSource
    from sala.data.packed import read_meta

    seq_len = seq_len or TRAIN_LEN
    meta = read_meta(data)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=meta["vocab_size"], max_position_embeddings=1 << 18, rope_theta=10000.0,
                      rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=meta.get("bos_id", 1),
                      eos_token_id=meta.get("eos_id", 2), pad_token_id=0, initializer_range=0.02, **shape)
    model = LlamaForCausalLM(cfg).to(dev)
    model.config._attn_implementation = "sdpa"
    n_params = sum(p.numel() for p in model.parameters())
    src = TokenSource(data, cfg.vocab_size, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1,
                            **({"fused": True} if dev.type == "cuda" else {}))
    est_steps, step, tokens, t0, losses = None, 0, 0, time.time(), []
    warmup = 50
    while True:
        el = time.time() - t0
        if (step >= max_steps) if max_steps else (el >= seconds):
            break
        if max_steps:
            est_steps = max_steps
        elif step == 20:   # estimate the total number of steps from the measured speed
            est_steps = int(seconds / (el / 20))
        total = est_steps or 10**9
        f = ((step + 1) / warmup if step < warmup
             else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1, (step - warmup) / max(1, total - warmup)))))
        for g in opt.param_groups:
            g["lr"] = lr * f
        ids = src.train_batch(batch, seq_len, doc_start_share=doc_start_share).to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens += ids.numel()
        step += 1
        if step % 50 == 0 or step == 1:
            losses.append({"step": step, "tokens": tokens, "loss": loss.item(), "seconds": time.time() - t0})
            log(f"teacher step {step} loss {loss.item():.3f} tok {tokens / 1e6:.1f}M "
                f"({tokens / (time.time() - t0) / 1e3:.0f}K tok/s)")
    model.save_pretrained(out)
    for name in os.listdir(Path(data) / "tokenizer"):
        shutil.copy2(Path(data) / "tokenizer" / name, Path(out) / name)
    report = {"params": n_params, "tokens": tokens, "steps": step, "seconds": time.time() - t0, "seq_len": seq_len,
              "batch": batch, "lr": lr, "doc_start_share": doc_start_share, "shape": shape, "history": losses}
    (Path(out) / "train_report.json").write_text(json.dumps(report, indent=1))
    return report


def cmd_teacher(args) -> None:
    train_teacher(args.data, args.out, args.seconds, BUNDLE_TEACHER if args.bundle else REPRO_TEACHER,
                  doc_start_share=0.0 if args.bundle else TEACHER_DOC_START_SHARE, max_steps=args.steps)


# ----------------------------------------------------------------------------- convert (GPU)
VARIANTS = {  # name -> (--softmax-layers, --keep-sparse-rope)
    "sala": ("auto", False),
    "all_lightning": ("none", False),
    "sala_rope": ("same-as-sala", True),
}


def continue_data(data: str) -> str:
    """A retrieval-rich packed dataset beside `data` for continual training (stdlib + CONTINUE's synthetic
    share, 256..TRAIN_LEN tokens; seconds to build), made once."""
    from sala.data.prepare import SyntheticMix, prepare

    path = Path(data).parent / (Path(data).name + "_continue")
    if not (path / "meta.json").is_file():
        prepare(str(path), ["stdlib"], tokenizer=None, val_fraction=0.03, seed=0, log=log,
                synthetic=SyntheticMix(fraction=CONTINUE["synthetic_fraction"], seed=4321,
                                       lengths=tuple(L for L in (256, 512, 1024, 2048) if L <= TRAIN_LEN)))
    return str(path)


def converted_dir(out: str) -> Path:
    """Where `convert_variant` writes the converted model (and its resumable stages); `out` gets the final one."""
    return Path(out + "_converted")


def convert_variant(teacher: str, out: str, variant: str, data: str, teacher_tokens: int,
                    softmax_of_sala: list[int] | None = None, batch: int = 48,
                    reuse_stage1_from: str | None = None) -> dict:
    """`sala convert` the teacher into `variant` (in `converted_dir(out)`), then continue training it with
    FRACTIONS["continue"] of the teacher's tokens when that is at least one step; the final model is `out`.
    Returns the conversion report."""
    import shutil

    from sala.convert import ConvertOptions, convert
    from sala.train.continual import continue_training

    layers, keep_rope = VARIANTS[variant]
    if layers == "same-as-sala":
        layers = ",".join(map(str, softmax_of_sala or []))
    budget = {k: int(v * teacher_tokens) for k, v in FRACTIONS.items()}
    t0 = time.time()
    conv = converted_dir(out)
    if reuse_stage1_from:
        src = converted_dir(reuse_stage1_from) / ".stages" / "stage1"
        if (src / "done.json").is_file() and not (conv / ".stages" / "stage1").exists():
            # same teacher, same student layers and options: stage 1 is identical, reuse it
            shutil.copytree(src, conv / ".stages" / "stage1")
    convert(ConvertOptions(
        teacher=teacher, out=str(conv), softmax_layers=layers, keep_sparse_rope=keep_rope, data=data,
        stage1_tokens=budget["stage1"], stage2_tokens=budget["stage2"], finetune_tokens=budget["finetune"],
        seq_len=min(512, TRAIN_LEN), finetune_seq_len=TRAIN_LEN, batch_size=batch, finetune_batch_size=16,
        finetune_lr=3e-4, stage2_lr=5e-4,
        sparse_config=SPARSE, select_length=TRAIN_LEN, select_samples=4, dtype="float32", progress=False),
        log=log)
    report = json.loads((conv / "convert_report.json").read_text())
    if (conv / "layer_scores.json").is_file():
        report["layer_scores"] = json.loads((conv / "layer_scores.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    if budget.get("continue", 0) < CONTINUE["micro_batch"] * TRAIN_LEN:
        shutil.copytree(conv, out, ignore=shutil.ignore_patterns(".stages"))
    else:
        run = continue_training(conv, continue_data(data), out + "_continue", tokens=budget["continue"],
                                seq_len=TRAIN_LEN, micro_batch=CONTINUE["micro_batch"], lr=CONTINUE["lr"],
                                progress=False, log=log)
        shutil.copytree(run["final"], out)
        for name in ("convert_report.json", "layer_scores.json"):
            if (conv / name).is_file():
                shutil.copy2(conv / name, Path(out) / name)
        report["continual_training"] = {k: v for k, v in run.items() if k != "config"}
        report["continual_training"]["stage"] = run["config"]["stages"][0]
        log(f"{variant}: continual training {run['tokens'] / 1e6:.1f}M tokens in {run['seconds']:.0f}s, "
            f"held-out {run['heldout_curve'][-1][1] if run['heldout_curve'] else float('nan'):.4f}")
    report["wall_seconds"] = time.time() - t0
    report["fraction_of_teacher_tokens"] = sum(budget.values()) / teacher_tokens
    return report


def cmd_convert(args) -> None:
    tokens = json.loads((Path(args.teacher) / "train_report.json").read_text())["tokens"]
    sala_layers = None
    for v in ("sala", "all_lightning", "sala_rope"):
        r = convert_variant(args.teacher, str(Path(args.out) / v), v, args.data, tokens, sala_layers)
        if v == "sala":
            sala_layers = r["softmax_layers"]


# ----------------------------------------------------------------------------- eval (GPU)
def evaluate(model_dir: str, data: str, deadline: float, lengths=None, max_samples: int | None = None) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    import sala  # noqa: F401
    from sala.convert.data import TokenSource
    from sala.eval.heldout import model_heldout_loss
    from sala.eval.runner import greedy_answer
    from sala.eval.scoring import string_match_all
    from sala.eval.tasks import read_jsonl
    from sala.modeling.tokenizer import load_tokenizer

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(dev).eval()
    if hasattr(model.config, "_attn_implementation") and model.config.model_type == "llama":
        model.config._attn_implementation = "sdpa"
    tok = load_tokenizer(Path(data) / "tokenizer")
    res: dict = {"model": model_dir, "heldout": {}, "tasks": {}}
    src = TokenSource(data, model.config.vocab_size)
    windows = src.heldout(16, TRAIN_LEN)
    loss = model_heldout_loss(model, windows)
    res["heldout"] = {"loss": loss, "seq_len": TRAIN_LEN, "tokens": int(windows[:, 1:].numel())}
    log(f"{Path(model_dir).name}: held-out loss {loss:.4f}")
    for length in lengths or EVAL_LENGTHS:
        for task in TASKS:
            key = f"{task}@{length}"
            if time.time() > deadline:
                res["tasks"][key] = {"skipped": "time budget"}
                continue
            samples = read_jsonl(str(Path(data) / "eval" / f"{task}_{length}.jsonl"))[:max_samples]
            t0, preds, golds = time.time(), [], []
            try:
                for s in samples:
                    ids = torch.tensor([tok.encode(s.input, add_bos=True)], device=dev)
                    preds.append(greedy_answer(model, ids, s.max_new_tokens, tok)[0])
                    golds.append(s.outputs)
                    if time.time() > deadline:
                        break
                acc = string_match_all(preds, golds) / 100.0 if preds else None
                res["tasks"][key] = {"accuracy": acc, "n": len(preds), "seconds": time.time() - t0,
                                     "examples": [[p, g] for p, g in zip(preds[:2], golds[:2])]}
            except Exception as e:  # noqa: BLE001 - record and go on: one failure must not lose the run
                res["tasks"][key] = {"error": f"{type(e).__name__}: {e}"[:400]}
            log(f"{Path(model_dir).name} {key}: {res['tasks'][key].get('accuracy')} "
                f"({res['tasks'][key].get('n')} in {time.time() - t0:.1f}s)")
    del model
    torch.cuda.empty_cache() if dev.type == "cuda" else None
    return res


def cmd_eval(args) -> None:
    deadline = time.time() + args.seconds
    results = {name: evaluate(str(Path(args.models) / name), args.data, deadline)
               for name in ("teacher", "sala", "all_lightning", "sala_rope")}
    Path(args.out).write_text(json.dumps(results, indent=1))


# ----------------------------------------------------------------------------- one-shot GPU run
def cmd_gpu(args) -> None:
    """Everything on the device in one call, budgeted by wall time; results written after every step."""
    t_start = time.time()
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    from sala.bench.common import run_metadata

    res: dict = {"meta": run_metadata(), "config": {"teacher": REPRO_TEACHER, "bundle_teacher": BUNDLE_TEACHER,
                 "sparse_config": SPARSE, "fractions": FRACTIONS,
                 "teacher_doc_start_share": TEACHER_DOC_START_SHARE, "bundle_seconds": args.bundle_seconds,
                 "train_len": TRAIN_LEN,
                 "eval_lengths": EVAL_LENGTHS, "eval_samples": EVAL_SAMPLES, "tasks": TASKS}, "steps": {}}
    path = out / "repro_results.json"

    def save() -> None:
        res["elapsed_seconds"] = time.time() - t_start
        path.write_text(json.dumps(res, indent=1))

    def step(name, fn):
        t0 = time.time()
        try:
            value = fn()
            res["steps"][name] = {"ok": True, "seconds": time.time() - t0}
            return value
        except Exception as e:  # noqa: BLE001
            import traceback
            res["steps"][name] = {"ok": False, "error": traceback.format_exc()[-2000:], "seconds": time.time() - t0}
            log(f"step {name} FAILED: {type(e).__name__}: {e}")
            return None
        finally:
            save()

    # 1. repro teacher
    rep = step("teacher", lambda: train_teacher(args.data, str(work / "teacher"), args.teacher_seconds, REPRO_TEACHER,
                                                doc_start_share=TEACHER_DOC_START_SHARE, max_steps=args.teacher_steps))
    res["teacher_train"] = rep
    if rep is None:
        return
    # 2. SALA conversion, then the bundled model (small teacher + SALA) so it is never squeezed out,
    #    then the two ablations (skipped if the time budget is gone)
    res["convert"] = {}

    def conv(v: str, sala_layers=None) -> None:
        r = step(f"convert_{v}", lambda: convert_variant(
            str(work / "teacher"), str(work / v), v, args.data, rep["tokens"], sala_layers,
            reuse_stage1_from=str(work / "sala") if v == "sala_rope" else None))
        if r is not None:
            res["convert"][v] = r

    conv("sala")
    b = None   # --bundle-seconds 0: the bundled model is not rebuilt (its time goes to the teacher)
    if args.bundle_seconds > 0:
        b = step("bundle_teacher",
                 lambda: train_teacher(args.data, str(work / "bundle_teacher"), args.bundle_seconds,
                                       BUNDLE_TEACHER, batch=16, lr=3e-3, max_steps=args.bundle_steps))
        res["bundle_teacher_train"] = b
    if b is not None:
        rb = step("bundle_convert", lambda: convert_variant(str(work / "bundle_teacher"), str(work / "bundle_sala"),
                                                            "sala", args.data, b["tokens"]))
        res["bundle_convert"] = rb
        for name in ("bundle_teacher", "bundle_sala"):
            if (work / name / "model.safetensors").is_file():
                step(f"pack_{name}", lambda name=name: _pack(work / name, out / f"{name}.tar"))
    sala_layers = res["convert"].get("sala", {}).get("softmax_layers")
    for v in ("sala_rope", "all_lightning"):
        if time.time() - t_start > args.total_seconds - 130:
            res["steps"][f"convert_{v}"] = {"ok": False, "error": "skipped: time budget"}
            continue
        conv(v, sala_layers)
    # 4. evaluation, budgeted
    res["eval"] = {}
    names = [n for n in ("teacher", "sala", "all_lightning", "sala_rope") if (work / n / "config.json").is_file()]
    for i, name in enumerate(names):
        share = (args.total_seconds - (time.time() - t_start) - 15) / (len(names) - i)
        r = step(f"eval_{name}",
                 lambda name=name, share=share: evaluate(str(work / name), args.data, time.time() + share))
        res["eval"][name] = r
    for name in ("bundle_teacher", "bundle_sala"):
        if (work / name / "config.json").is_file() and args.total_seconds - (time.time() - t_start) > 20:
            res["eval"][name] = step(f"eval_{name}", lambda name=name: evaluate(
                str(work / name), args.data, time.time() + 8, lengths=EVAL_LENGTHS[:2], max_samples=4))
    save()


def _pack(folder: Path, tar_path: Path) -> None:
    """model files (half precision) + tokenizer + reports into one tar (the device returns at most 8 files)."""
    import tarfile

    half = folder.parent / (folder.name + "_half")
    _half_copy(folder, half, max_mib=None)
    with tarfile.open(tar_path, "w") as tar:
        for f in sorted(half.iterdir()):
            tar.add(f, arcname=f.name)


def _half_copy(src: Path, dst: Path, max_mib: float | None = 16) -> None:
    """Copy a model folder with fp16 weights (config dtype float16), tokenizer and reports; refuse weights over
    `max_mib` (the bundled-model limit; None: no limit)."""
    import torch
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    sd = load_file(str(src / "model.safetensors"))
    save_file({k: v.to(torch.float16).contiguous() for k, v in sd.items()}, str(dst / "model.safetensors"),
              metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["dtype"] = "float16"
    cfg.pop("torch_dtype", None)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "convert_report.json", "layer_scores.json",
                 "train_report.json", "generation_config.json"):
        if (src / name).is_file():
            (dst / name).write_bytes((src / name).read_bytes())
    size = (dst / "model.safetensors").stat().st_size
    if max_mib is not None and size > max_mib * 2**20:
        raise ValueError(f"{dst}: weights are {size / 2**20:.1f} MiB, over the {max_mib} MiB limit of a bundled model")


def cmd_bundle(args) -> None:
    """Install a converted SALA model (and its dense teacher) as the bundled default model."""
    import shutil

    dst = ROOT / "sala" / "assets" / "model"
    if dst.exists():
        shutil.rmtree(dst)
    _half_copy(Path(args.sala), dst)
    if args.teacher:
        _half_copy(Path(args.teacher), dst / "teacher")
    log(f"bundled model installed in {dst}")


# ----------------------------------------------------------------------------- plot (CPU)
def cmd_plot(args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = json.loads(Path(args.results).read_text())
    ev = res.get("eval", {})
    names = [n for n in ("teacher", "sala", "all_lightning", "sala_rope") if ev.get(n)]
    labels = {"teacher": "dense teacher (RoPE)", "sala": "SALA (NoPE sparse + lightning)",
              "all_lightning": "all lightning", "sala_rope": "SALA, RoPE kept in sparse layers"}
    fig, axes = plt.subplots(1, len(TASKS), figsize=(5 * len(TASKS), 4), sharey=True)
    for ax, task in zip(axes, TASKS):
        for n in names:
            xs, ys = [], []
            for L in EVAL_LENGTHS:
                r = ev[n]["tasks"].get(f"{task}@{L}", {})
                if r.get("accuracy") is not None:
                    xs.append(L // TRAIN_LEN)
                    ys.append(100 * r["accuracy"])
            ax.plot(xs, ys, marker="o", label=labels[n])
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 4, 16, 64], ["1x", "4x", "16x", "64x"])
        ax.set_title(task)
        ax.set_xlabel(f"prompt length / training length ({TRAIN_LEN})")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.png, dpi=120)
    rows = ["| model | held-out loss @2K | "
            + " | ".join(f"{t} {L // TRAIN_LEN}x" for t in TASKS for L in EVAL_LENGTHS) + " |",
            "|---|---|" + "---|" * (len(TASKS) * len(EVAL_LENGTHS))]
    for n in names:
        cells = []
        for t in TASKS:
            for L in EVAL_LENGTHS:
                r = ev[n]["tasks"].get(f"{t}@{L}", {})
                cells.append(f"{100 * r['accuracy']:.0f}% ({r['n']})" if r.get("accuracy") is not None
                             else ("skipped" if "skipped" in r else ("error" if "error" in r else "-")))
        rows.append(f"| {labels[n]} | {ev[n]['heldout']['loss']:.3f} | " + " | ".join(cells) + " |")
    Path(args.table).write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--tiny", action="store_true", help="toy sizes: the CPU smoke test of the whole script")
    common.add_argument("--continue-fraction", type=float, default=0.0,
                        help="continual training after conversion, as a fraction of the teacher's tokens")
    common.add_argument("--teacher-doc-share", type=float, default=0.0,
                        help="share of the teacher's windows that start at a document start")
    sub = p.add_subparsers(dest="cmd", required=True)
    add_parser = sub.add_parser
    sub.add_parser = lambda name, **kw: add_parser(name, parents=[common], **kw)
    a = sub.add_parser("prepare")
    a.add_argument("--data", default="repro_data")
    a.add_argument("--max-docs", type=int, default=1000)
    a.set_defaults(func=cmd_prepare)
    a = sub.add_parser("teacher")
    a.add_argument("--data", default="repro_data")
    a.add_argument("--out", required=True)
    a.add_argument("--seconds", type=float, default=100)
    a.add_argument("--bundle", action="store_true")
    a.add_argument("--steps", type=int, default=None, help="train this many steps instead of --seconds")
    a.set_defaults(func=cmd_teacher)
    a = sub.add_parser("convert")
    a.add_argument("--data", default="repro_data")
    a.add_argument("--teacher", required=True)
    a.add_argument("--out", required=True)
    a.set_defaults(func=cmd_convert)
    a = sub.add_parser("eval")
    a.add_argument("--data", default="repro_data")
    a.add_argument("--models", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--seconds", type=float, default=120)
    a.set_defaults(func=cmd_eval)
    a = sub.add_parser("gpu")
    a.add_argument("--data", default="repro_data")
    a.add_argument("--work", default="/tmp/repro")
    a.add_argument("--out", required=True)
    a.add_argument("--teacher-seconds", type=float, default=100)
    a.add_argument("--bundle-seconds", type=float, default=45, help="0: skip the bundled model")
    a.add_argument("--total-seconds", type=float, default=390)
    a.add_argument("--teacher-steps", type=int, default=None, help="train the teacher this many steps, not seconds")
    a.add_argument("--bundle-steps", type=int, default=None, help="the bundled model's teacher: steps, not seconds")
    a.set_defaults(func=cmd_gpu)
    a = sub.add_parser("bundle")
    a.add_argument("--sala", required=True)
    a.add_argument("--teacher", default=None)
    a.set_defaults(func=cmd_bundle)
    a = sub.add_parser("plot")
    a.add_argument("--results", required=True)
    a.add_argument("--png", required=True)
    a.add_argument("--table", required=True)
    a.set_defaults(func=cmd_plot)
    args = p.parse_args()
    configure(args.tiny, args.continue_fraction, args.teacher_doc_share)
    args.func(args)


if __name__ == "__main__":
    main()
