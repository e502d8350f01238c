"""`sala convert`: a dense Transformer checkpoint -> a SALA hybrid checkpoint (HALO-style).

Stages (each resumable, under OUT/.stages/): weight transfer (no training) -> stage 1 hidden-state
alignment of the lightning students -> layer selection (HALO score, when --softmax-layers auto) ->
stage 2 KL distillation of the whole hybrid -> optional short continual training (CE) -> the checkpoint
in OUT (config.json, model.safetensors, tokenizer files, convert_report.json, layer_scores.json).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from sala.convert.data import TokenSource
from sala.convert.distill import run_distill, run_finetune
from sala.convert.families import read_teacher_spec, sala_config_for
from sala.convert.probes import RecallProbe
from sala.convert.selection import choose_softmax_layers, layer_swap_sweep, num_softmax_layers, parse_layer_list
from sala.convert.stage1 import build_students, run_stage1
from sala.convert.stagedir import StageDir
from sala.convert.teacher import Teacher
from sala.convert.transfer import lightning_layer_init
from sala.engine.loading import load_model_dir
from sala.eval.heldout import heldout_loss
from sala.utils.errors import ResumeMismatchError, UsageError, check_writable_dir

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "generation_config.json")


@dataclass
class ConvertOptions:
    teacher: str
    out: str
    softmax_layers: str = "auto"        # "auto" (HALO score), "none" (all lightning) or "i,j,k"
    softmax_fraction: float = 0.25
    stage1_tokens: int = 2_000_000
    stage2_tokens: int = 2_000_000
    finetune_tokens: int = 0            # continual training at finetune_seq_len (0: hand over to `sala train`)
    seq_len: int = 512
    finetune_seq_len: int = 2048
    batch_size: int = 8
    finetune_batch_size: int | None = None   # default: batch_size
    stage1_lr: float = 1e-3
    stage2_lr: float = 3e-4
    other_lr_ratio: float = 0.1
    finetune_lr: float = 1e-4
    keep_sparse_rope: bool = False
    sparse_preset: str = "minicpm-sala-9b"
    sparse_config: dict | None = None   # overrides of the preset's sparse_config fields
    data: str | None = None             # packed dataset folder, "random", or None (stdlib + teacher tokenizer)
    select_length: int | None = None    # recall-probe prompt length (default seq_len)
    select_samples: int = 4             # recall prompts per task
    heldout_windows: int = 8
    device: str = "auto"
    dtype: str = "auto"                 # saved dtype: auto (the teacher's), float32, bfloat16, float16
    seed: int = 0
    restart: bool = False
    progress: bool = True


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _save_students(students: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in students.state_dict().items()}, str(path))


def _tokenizer_for(opts: ConvertOptions, source: TokenSource, vocab_size: int):
    """The teacher's tokenizer (or the data's) when it fits the teacher vocabulary, else None."""
    from sala.modeling.tokenizer import load_tokenizer

    for cand in (Path(opts.teacher), source.tokenizer_dir):
        if cand is None or not ((cand / "tokenizer.json").is_file() or (cand / "tokenizer_config.json").is_file()):
            continue
        try:
            tok = load_tokenizer(cand)
        except (ValueError, FileNotFoundError):
            continue
        if tok.vocab_size <= vocab_size:
            return tok
    return None


def _prepare_default_data(opts: ConvertOptions, stages: Path, log: Callable[[str], None]) -> str:
    """No --data: tokenize the Python standard library with the teacher's tokenizer (cached in OUT/.stages)."""
    from sala.data.prepare import prepare

    target = stages / "data"
    if (target / "meta.json").is_file():
        return str(target)
    has_tok = any((Path(opts.teacher) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    if not has_tok:
        raise ValueError(f"teacher {opts.teacher} has no tokenizer files, so no training text can be tokenized; "
                         "pass --data PACKED_DIR (from `sala data prepare` with the teacher's tokenizer)")
    prepare(str(target), ["stdlib"], tokenizer=opts.teacher, max_docs=3000, log=log, show_progress=opts.progress)
    return str(target)


# Options that do not change the converted model: where it goes, how the run shows progress, resumes or runs.
_NON_DEFINING = ("out", "restart", "progress", "device")


def defining_options(opts: ConvertOptions) -> dict:
    """The options that define a conversion's result (JSON-ready; the teacher as an absolute path)."""
    d = {k: v for k, v in asdict(opts).items() if k not in _NON_DEFINING}
    d["teacher"] = os.path.abspath(opts.teacher)
    if d.get("data") not in (None, "random"):
        d["data"] = os.path.abspath(str(d["data"]))
    return json.loads(json.dumps(d))


def option_differences(saved: dict, current: dict) -> list[str]:
    """"name: saved -> current" for every defining option that differs (options only one side has are skipped)."""
    saved = {k: v for k, v in saved.items() if k not in _NON_DEFINING}
    if saved.get("teacher"):
        saved["teacher"] = os.path.abspath(saved["teacher"])
    if saved.get("data") not in (None, "random"):
        saved["data"] = os.path.abspath(str(saved["data"]))
    return [f"{k}: {saved[k]!r} -> {current[k]!r}" for k in sorted(set(saved) & set(current)) if saved[k] != current[k]]


def convert(opts: ConvertOptions, log: Callable[[str], None] | None = None) -> Path:
    """Run (or resume) the conversion; returns the output folder.

    An output folder holding a finished conversion with the same options is returned as it is; one made with other
    options is refused, listing them, unless `restart` (the new checkpoint replaces the old one when done)."""
    log = log or logger.info
    t_start = time.time()
    out = Path(opts.out)
    spec = read_teacher_spec(opts.teacher)          # clear errors before any work
    L = spec.num_layers
    explicit = parse_layer_list(opts.softmax_layers, L)
    if not 0.0 <= opts.softmax_fraction <= 1.0:
        raise UsageError(f"--softmax-fraction must be in [0, 1], got {opts.softmax_fraction}")
    for name in ("seq_len", "batch_size"):
        if getattr(opts, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(opts, name)}")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file: the converted checkpoint is a folder")
    check_writable_dir(out, "--out folder")
    report_file = out / "convert_report.json"
    if (out / "config.json").is_file() and report_file.is_file() and not opts.restart:
        try:
            saved = json.loads(report_file.read_text()).get("options") or {}
        except (OSError, ValueError) as e:
            raise UsageError(f"{report_file} cannot be read ({e}): pass --restart to redo the conversion") from None
        diffs = option_differences(saved, defining_options(opts))
        if diffs:
            raise ResumeMismatchError(f"{out} holds a conversion made with other options ({'; '.join(diffs)}): pass "
                                      f"--restart (or --overwrite) to redo it, or choose another --out")
        log(f"{out} already holds a finished conversion with these options (pass --restart to redo it)")
        return out
    stages = out / ".stages"
    if opts.restart and stages.exists():
        shutil.rmtree(stages)
    out.mkdir(parents=True, exist_ok=True)

    device = _device(opts.device)
    torch.manual_seed(opts.seed)
    data = opts.data if opts.data is not None else _prepare_default_data(opts, stages, log)
    source = TokenSource(None if data == "random" else data, spec.vocab_size, seed=opts.seed)
    log(f"teacher {opts.teacher}: {spec.model_type}, {L} layers, hidden {spec.hidden_size}, "
        f"heads {spec.num_heads}/{spec.num_kv_heads} x {spec.head_dim}; device {device}")
    if spec.qk_norm:
        log("note: the teacher's q/k norms go into the lightning layers; SALA's sparse layers have no QK-norm, "
            "so kept layers lose theirs (stage 2 recovers)")
    teacher = Teacher(opts.teacher, device)
    teacher_sd = teacher.state_dict()
    # a SalaConfig whose lightning fields fit the teacher (mixer types do not matter for building students)
    template = sala_config_for(spec, [], opts.keep_sparse_rope, opts.sparse_preset, sparse_overrides=opts.sparse_config)

    # ---- stage 1: alignment of lightning students (all candidate layers) ----------------------------
    if explicit is None:
        keep = {0, L - 1} if num_softmax_layers(L, opts.softmax_fraction) >= 2 else set()
        student_layers = [i for i in range(L) if i not in keep]
    else:
        student_layers = [i for i in range(L) if i not in explicit]
    s1 = StageDir(stages, "stage1", {"teacher": os.path.abspath(opts.teacher), "layers": student_layers,
                                     "tokens": opts.stage1_tokens, "seq_len": opts.seq_len, "lr": opts.stage1_lr,
                                     "batch": opts.batch_size, "data": str(data), "seed": opts.seed})

    def init(i: int, fresh: dict) -> dict:
        return lightning_layer_init(teacher_sd, spec, i, fresh)

    students = build_students(template, student_layers, init, device, seed=opts.seed)
    if s1.done():
        from safetensors.torch import load_file

        students.load_state_dict(load_file(str(s1.path / "students.safetensors")))
        log(f"stage 1: done earlier ({s1.path})")
    elif student_layers and opts.stage1_tokens > 0:
        t0 = time.time()
        hist = run_stage1(teacher, students, source, opts.stage1_tokens, opts.seq_len, opts.batch_size,
                          opts.stage1_lr, opts.progress)
        tmp = s1.begin()
        _save_students(students, tmp / "students.safetensors")
        s1.commit(tmp, {"history": hist, "seconds": time.time() - t0})
        log(f"stage 1: relative MSE {hist[0]['loss']:.4f} -> {hist[-1]['loss']:.4f} in {time.time() - t0:.0f}s")
    else:
        tmp = s1.begin()
        _save_students(students, tmp / "students.safetensors")
        s1.commit(tmp, {"history": [], "seconds": 0.0})

    # ---- layer selection ----------------------------------------------------------------------------
    heldout = source.heldout(opts.heldout_windows, opts.seq_len)
    scores_info: dict | None = None
    if explicit is None:
        sel = StageDir(stages, "selection", {**s1.options, "fraction": opts.softmax_fraction,
                                             "select_length": opts.select_length or opts.seq_len,
                                             "select_samples": opts.select_samples})
        if not sel.done():
            tok = _tokenizer_for(opts, source, spec.vocab_size)
            length = opts.select_length or opts.seq_len
            probe = (RecallProbe.from_tokenizer(tok, length, opts.select_samples, seed=opts.seed + 7) if tok is not None
                     else RecallProbe.associative(spec.vocab_size, length, 3 * opts.select_samples, seed=opts.seed + 7))
            t0 = time.time()
            sweep = layer_swap_sweep(teacher, students, probe, heldout, opts.progress)
            scores = {i: v["score"] for i, v in sweep["layers"].items()}
            chosen = choose_softmax_layers(scores, L, opts.softmax_fraction)
            tmp = sel.begin()
            info = {**sweep, "softmax_layers": chosen, "rule": "first and last layers kept; then highest HALO "
                    "score s_i = min(50, (R_max - R_i) / (C_max - C_i + 1e-10)); C = -held-out loss",
                    "seconds": time.time() - t0}
            (tmp / "scores.json").write_text(json.dumps(info, indent=1))
            sel.commit(tmp)
        scores_info = json.loads((sel.path / "scores.json").read_text())
        softmax_layers = list(scores_info["softmax_layers"])
        log(f"layer selection: softmax layers {softmax_layers} (scores in layer_scores.json)")
    else:
        softmax_layers = explicit

    # ---- assemble the hybrid ------------------------------------------------------------------------
    config = sala_config_for(spec, softmax_layers, opts.keep_sparse_rope, opts.sparse_preset,
                            sparse_overrides=opts.sparse_config)
    s2 = StageDir(stages, "stage2", {**s1.options, "softmax_layers": softmax_layers,
                                     "keep_sparse_rope": opts.keep_sparse_rope, "tokens": opts.stage2_tokens,
                                     "lr": opts.stage2_lr, "other_lr_ratio": opts.other_lr_ratio,
                                     "sparse_preset": opts.sparse_preset, "sparse_config": opts.sparse_config})
    model = _assemble(config, teacher_sd, spec, students, softmax_layers, opts.seed).to(device)
    del students
    histories: dict[str, list] = {}
    if s2.done():
        model = load_model_dir(s2.path / "model", device=device)
        log(f"stage 2: done earlier ({s2.path})")
    elif opts.stage2_tokens > 0:
        t0 = time.time()
        histories["stage2"] = run_distill(teacher, model, source, opts.stage2_tokens, opts.seq_len, opts.batch_size,
                                          opts.stage2_lr, opts.other_lr_ratio, opts.progress)
        tmp = s2.begin()
        model.save_pretrained(str(tmp / "model"))
        s2.commit(tmp, {"history": histories["stage2"], "seconds": time.time() - t0})
        log(f"stage 2: KL {histories['stage2'][0]['kl']:.4f} -> {histories['stage2'][-1]['kl']:.4f} "
            f"in {time.time() - t0:.0f}s")

    if opts.finetune_tokens > 0:
        ft = StageDir(stages, "finetune", {**s2.options, "ft_tokens": opts.finetune_tokens,
                                           "ft_seq_len": opts.finetune_seq_len, "ft_lr": opts.finetune_lr})
        if ft.done():
            model = load_model_dir(ft.path / "model", device=device)
        else:
            t0 = time.time()
            histories["finetune"] = run_finetune(model, source, opts.finetune_tokens, opts.finetune_seq_len,
                                                 opts.finetune_batch_size or opts.batch_size, opts.finetune_lr,
                                                 device, opts.progress)
            tmp = ft.begin()
            model.save_pretrained(str(tmp / "model"))
            ft.commit(tmp, {"history": histories["finetune"], "seconds": time.time() - t0})

    # ---- final checkpoint -----------------------------------------------------------------------------
    def logits_of(m):
        def fn(ids):
            from sala.convert.optim import autocast, norms_keep_input_dtype
            with autocast(device), norms_keep_input_dtype(m):
                return m(input_ids=ids.to(device), use_cache=False).logits.float()
        return fn

    model.eval()
    with torch.no_grad():
        t_loss = heldout_loss(logits_of(teacher.model), heldout)
        s_loss = heldout_loss(logits_of(model), heldout)
    dtype = {"auto": spec.torch_dtype, "float32": "float32", "bfloat16": "bfloat16",
             "float16": "float16"}.get(opts.dtype)
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16; got {opts.dtype!r}")
    final = model.to("cpu", getattr(torch, dtype))
    final.config.use_sparse_attention = True
    final.save_pretrained(str(out))
    for name in TOKENIZER_FILES:
        src = Path(opts.teacher) / name
        if src.is_file() and name != "generation_config.json":
            shutil.copy2(src, out / name)
    if scores_info is not None:
        (out / "layer_scores.json").write_text(json.dumps(scores_info, indent=1))
    report = {"teacher": os.path.abspath(opts.teacher), "teacher_model_type": spec.model_type,
              "softmax_layers": softmax_layers, "mixer_types": config.mixer_types,
              "options": asdict(opts), "heldout_loss": {"teacher": t_loss, "sala": s_loss, "seq_len": opts.seq_len},
              "tokens": {"stage1": opts.stage1_tokens if student_layers else 0, "stage2": opts.stage2_tokens,
                         "finetune": opts.finetune_tokens},
              "seconds": time.time() - t_start,
              "next": f"sala train CONFIG.yaml model.kind=pretrained model.path={out} (continual training with "
                      "sparse attention at long lengths)"}
    (out / "convert_report.json").write_text(json.dumps(report, indent=1))
    log(f"held-out loss at {opts.seq_len}: teacher {t_loss:.4f}, SALA {s_loss:.4f}")
    log(f"wrote {out}; continue training with: {report['next']}")
    return out


def _assemble(config, teacher_sd, spec, students, softmax_layers, seed):
    """A SalaForCausalLM with transferred weights and the stage-1 students in its lightning layers."""
    from sala.convert.transfer import transfer_state_dict
    from sala.modeling.modeling_sala import SalaForCausalLM

    torch.manual_seed(seed + 1)
    model = SalaForCausalLM(config)
    overrides = {}
    for key, mod in students.items():
        i = int(key)
        if i not in softmax_layers:
            overrides[i] = {k: v.detach().cpu() for k, v in mod.state_dict().items()}
    sd = transfer_state_dict(teacher_sd, spec, config, model.state_dict(), overrides)
    model.load_state_dict(sd, strict=True)
    return model
