"""Training configuration: dataclasses read from YAML/JSON plus `key=value` command-line overrides.

A config has a model, data, optimizer and one or more stages run back to back, e.g.

```yaml
model: {kind: sala, preset: sala-small, gradient_checkpointing: false}
data: {path: data/stdlib-bpe8k}
optim: {lr: 3.0e-3, weight_decay: 0.1}
stages:
  - {name: stable, steps: 800, seq_len: 4096, micro_batch: 8, warmup_steps: 100, sparse: false}
  - {name: decay, steps: 200, seq_len: 4096, micro_batch: 8, decay: exponential, lr_end: 1.5e-4}
out_dir: runs/sala-small
```

Overrides use dotted paths; list items by index: `optim.lr=1e-3 stages.1.steps=50 model.config.hidden_size=256`.
Values are parsed as YAML scalars/lists (`true`, `3e-4`, `[1, 2]`).
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from sala.utils.errors import UsageError

MODEL_KINDS = ("sala", "llama", "pretrained")
DECAYS = ("constant", "exponential", "linear", "cosine")
PRECISIONS = ("auto", "bf16", "bf16-residual", "bf16-pure", "fp32")


@dataclass
class ModelConfig:
    """Which model to train.

    kind: `sala` (a `SalaConfig` preset plus `config` fields), `llama` (transformers' LlamaForCausalLM,
    the dense baseline, from `config` fields) or `pretrained` (a model folder at `path`).
    """

    kind: str = "sala"
    preset: str | None = "sala-tiny"
    path: str | None = None
    config: dict = field(default_factory=dict)
    gradient_checkpointing: bool = False
    compile: bool = False
    fuse_projections: bool = False   # SALA: projections sharing an input as one GEMM (set_fused_projections)
    loss_chunk: int = 0   # SALA: > 0: LM head + cross-entropy over chunks of this many tokens, no full logits
    compile_loss: bool = False   # SALA, with compile: LM head + cross-entropy compiled as one function, no logits
    compile_blocks: bool = False   # SALA, with compile: each layer as 2 compiled regions around its attention op, not 6


@dataclass
class DataConfig:
    """A packed dataset folder made by `sala data prepare` (splits `train_split` and `val_split`)."""

    path: str = ""
    train_split: str = "train"
    val_split: str = "val"
    align_docs: bool = True
    seed: int = 0


@dataclass
class OptimConfig:
    """AdamW. `lr` is the default peak learning rate of every stage."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0


@dataclass
class StageConfig:
    """One training stage. Its LR: linear warmup over `warmup_steps` to `lr`, then held, then a decay of
    kind `decay` to `lr_end` over the last `decay_steps` steps (default: everything after warmup).

    `sparse` switches the sparse layers' top-k selection on/off (None = leave as is); `trainable` is
    a list of regular expressions over parameter names (None = all parameters train).
    Per optimizer step each rank processes `grad_accum` x `micro_batch` windows of `seq_len` tokens.
    """

    name: str = "stage"
    steps: int = 100
    seq_len: int = 1024
    micro_batch: int = 1
    grad_accum: int = 1
    lr: float | None = None
    lr_end: float | None = None
    warmup_steps: int = 0
    decay: str = "constant"
    decay_steps: int | None = None
    sparse: bool | None = None
    trainable: list[str] | None = None
    data: str | None = None


@dataclass
class TrainConfig:
    """Everything of a run. precision: "auto" (bf16 autocast over fp32 weights on CUDA, fp32 on CPU),
    "bf16" (autocast), "bf16-residual" (autocast, and the embedding output cast to bf16 so the residual
    stream between layers is bf16 instead of fp32: fewer casts and half the traffic of the adds; weights,
    gradients and AdamW state stay fp32), "bf16-pure" (weights, gradients and AdamW state in bf16: half the
    memory, for models whose ops do not run under autocast), "fp32"."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])
    out_dir: str = "runs/train"
    seed: int = 0
    precision: str = "auto"
    device: str = "auto"
    log_every: int = 10
    eval_every: int = 0
    eval_windows: int = 16
    save_every: int = 0
    keep_checkpoints: int = 2
    keep_stage_ends: bool = False   # also keep each stage's last checkpoint, as out_dir/stage_ends/<i>_<name>
    resume: bool = True
    resume_from: str | None = None   # a checkpoint folder to start from when out_dir has none (branching a run)
    stop_after: int | None = None
    time_limit_s: float | None = None   # wall-clock budget: past it, stop after the current step and save
    max_nonfinite_steps: int = 10   # steps with a non-finite loss or gradient are skipped; more in a row stop the run
    peak_tflops: float | None = None
    progress: bool = True
    save_final: bool = True

    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check/convert a parsed value to the annotated type `tp`, raising ValueError naming `where`."""
    origin = get_origin(tp)
    args = get_args(tp)
    if tp is Any:
        return value
    if origin is None and dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, where)
    if type(None) in args:  # Optional[...]
        if value is None:
            return None
        rest = [a for a in args if a is not type(None)]
        return _convert(value, rest[0], where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        return [_convert(v, args[0], f"{where}.{i}") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_convert(v, a, f"{where}.{i}") for i, (v, a) in enumerate(zip(value, args)))
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML 1.1 reads "3e-4" as a string
            try:
                return float(value)
            except (TypeError, ValueError):
                raise ValueError(f"{where}: expected a number, got {value!r}") from None
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _from_dict(cls: type, data: Any, where: str) -> Any:
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ValueError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ValueError(f"{where or 'config'}: unknown key(s) {', '.join(map(repr, unknown))}; "
                         f"allowed: {', '.join(names)}")
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def parse_value(text: str) -> Any:
    """A command-line value as YAML (numbers, booleans, null, lists, mappings), else the raw string."""
    import yaml

    try:
        v = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(v, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", v):
        return float(v)
    return v


def apply_override(data: dict, key: str, value: Any) -> None:
    """Set `data[key]` for a dotted `key` (list items by index; missing mappings are created)."""
    parts = key.split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ValueError(f"override {key}: {'.'.join(parts[:i])} has {len(node)} items, no item {part!r}")
            node = node[int(part)]
        else:
            if part not in node or node[part] is None:
                node[part] = {}
            node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ValueError(f"override {key}: the list has {len(node)} items, no item {last!r}")
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ValueError(f"override {key}: {'.'.join(parts[:-1])} is not a mapping or list")


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = (),
                base: dict | None = None) -> TrainConfig:
    """Read a YAML/JSON config (or start from `base` / the defaults), apply `key=value` overrides, validate."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"training config {path} does not exist")
        if not p.is_file():
            raise UsageError(f"training config {path} is a directory, not a YAML/JSON file")
        text = p.read_text()
        if p.suffix == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise UsageError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        else:
            import yaml

            try:
                data = yaml.safe_load(text) or {}
            except yaml.YAMLError as e:
                mark = getattr(e, "problem_mark", None)
                where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
                problem = getattr(e, "problem", None) or str(e).splitlines()[0]
                raise UsageError(f"{path}: invalid YAML{where}: {problem}; fix the file (YAML mappings look like "
                                 f"`key: value`)") from None
        if not isinstance(data, dict):
            raise UsageError(f"{path}: the top level must be a mapping (key: value lines), got {type(data).__name__}")
    if base:
        data = {**base, **data}
    data = json.loads(json.dumps(data))  # deep copy, tuples -> lists
    data.setdefault("stages", [dataclasses.asdict(StageConfig())])
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, _, raw = item.partition("=")
        apply_override(data, key.strip(), parse_value(raw))
    cfg = _from_dict(TrainConfig, data, "")
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Raise ValueError naming the first invalid field."""
    m = cfg.model
    if m.kind not in MODEL_KINDS:
        raise ValueError(f"model.kind must be one of {MODEL_KINDS}, got {m.kind!r}")
    if m.kind == "pretrained" and not m.path:
        raise ValueError("model.kind=pretrained needs model.path (a model folder)")
    if m.loss_chunk < 0:
        raise ValueError(f"model.loss_chunk must be >= 0 (0: the plain loss), got {m.loss_chunk}")
    if m.compile_loss and not m.compile:
        raise ValueError("model.compile_loss compiles the loss with the model: it needs model.compile: true")
    if m.compile_blocks and not m.compile:
        raise ValueError("model.compile_blocks chooses how the model is compiled: it needs model.compile: true")
    if m.compile_loss and m.loss_chunk:
        raise ValueError(f"model.compile_loss and model.loss_chunk ({m.loss_chunk}) are two ways to compute the loss "
                         f"without stored logits: choose one")
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {cfg.precision!r}")
    if not cfg.stages:
        raise ValueError("stages: at least one stage is needed")
    if not cfg.data.path and not all(s.data for s in cfg.stages):
        raise ValueError("data.path is empty: give a packed dataset folder (make one with `sala data prepare`)")
    o = cfg.optim
    if o.lr <= 0:
        raise ValueError(f"optim.lr must be > 0, got {o.lr}")
    if not all(0 <= b < 1 for b in o.betas):
        raise ValueError(f"optim.betas must be in [0, 1), got {o.betas}")
    for i, s in enumerate(cfg.stages):
        w = f"stages.{i} ({s.name})"
        for name in ("steps", "seq_len", "micro_batch", "grad_accum"):
            if getattr(s, name) < 1:
                raise ValueError(f"{w}: {name} must be >= 1, got {getattr(s, name)}")
        if s.seq_len < 2:
            raise ValueError(f"{w}: seq_len must be >= 2, got {s.seq_len}")
        if s.decay not in DECAYS:
            raise ValueError(f"{w}: decay must be one of {DECAYS}, got {s.decay!r}")
        if not 0 <= s.warmup_steps <= s.steps:
            raise ValueError(f"{w}: warmup_steps must be in [0, steps={s.steps}], got {s.warmup_steps}")
        if s.decay != "constant":
            if s.lr_end is None:
                raise ValueError(f"{w}: decay={s.decay} needs lr_end")
            if s.decay == "exponential" and s.lr_end <= 0:
                raise ValueError(f"{w}: exponential decay needs lr_end > 0, got {s.lr_end}")
        if s.decay_steps is not None and not 0 < s.decay_steps <= s.steps - s.warmup_steps:
            raise ValueError(f"{w}: decay_steps must be in (0, steps - warmup_steps = {s.steps - s.warmup_steps}], "
                             f"got {s.decay_steps}")
        for pat in s.trainable or []:
            try:
                re.compile(pat)
            except re.error as e:
                raise ValueError(f"{w}: trainable pattern {pat!r} is not a valid regular expression ({e})") from None
    for name in ("log_every", "keep_checkpoints", "eval_windows"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.eval_every < 0 or cfg.save_every < 0:
        raise ValueError("eval_every and save_every must be >= 0 (0 = only at stage ends)")
    if cfg.max_nonfinite_steps < 0:
        raise ValueError(f"max_nonfinite_steps must be >= 0 (0: stop at the first non-finite step), "
                         f"got {cfg.max_nonfinite_steps}")


# Fields that may change between a run and its resumption: how long it trains, how it logs, saves and stops.
# Every other field defines the run (model, data, optimizer, stage shapes, seed, precision).
RESUMABLE_CHANGES = frozenset({
    "out_dir", "log_every", "eval_every", "eval_windows", "save_every", "keep_checkpoints", "keep_stage_ends",
    "resume", "resume_from", "stop_after", "time_limit_s", "max_nonfinite_steps", "peak_tflops", "progress",
    "save_final", "device"})
RESUMABLE_STAGE_CHANGES = frozenset({"steps", "warmup_steps", "decay", "decay_steps", "lr_end"})


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out or {prefix: {}}
    if isinstance(value, (list, tuple)) and prefix.split(".")[-1] == "stages":
        out = {f"{prefix}.count": len(value)}
        for i, v in enumerate(value):
            out.update(_flatten(v, f"{prefix}.{i}"))
        return out
    return {prefix: list(value) if isinstance(value, tuple) else value}


def run_differences(saved: dict, current: dict) -> list[str]:
    """The fields defining a run (`TrainConfig.to_dict()` form) that differ between a checkpoint's config and this
    one, as "field: saved -> current" lines; [] when this config may resume that checkpoint. Fields only one side
    has (a checkpoint written before a field existed) are not compared."""
    a, b = _flatten(json.loads(json.dumps(saved))), _flatten(json.loads(json.dumps(current)))
    out = []
    for key in sorted(set(a) & set(b),
                      key=lambda k: [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in k.split(".")]):
        parts = key.split(".")
        if parts[0] in RESUMABLE_CHANGES:
            continue
        if parts[0] == "stages" and len(parts) == 3 and parts[2] in RESUMABLE_STAGE_CHANGES:
            continue
        if key == "data.path" and a.get(key) and b.get(key) and \
                Path(str(a[key])).expanduser().resolve() == Path(str(b[key])).expanduser().resolve():
            continue
        if a[key] != b[key]:
            out.append(f"{key}: {a[key]!r} -> {b[key]!r}")
    return out
