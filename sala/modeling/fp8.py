"""FP8 weights for a SALA model: the `Fp8Linear` module, `quantize_model_fp8`, and FP8 checkpoints.

    quantize_model_fp8(model)                       # projections + LM head -> Fp8Linear, in place
    save_fp8_checkpoint(model, "sala-9b-fp8")       # safetensors: <name>.weight fp8, <name>.weight_scale fp32
    model = load_fp8_checkpoint("sala-9b-fp8", "cuda")

Every nn.Linear inside the decoder layers (q/k/v/o, z, o_gate, the MLP's gate/up/down, and fused qkv / gate_up
projections where a model has them) and the LM head become `Fp8Linear`: weight float8_e4m3fn [out, in], one fp32
scale per output channel, activations quantized per token at run time (`sala.ops.fp8`). Embeddings, norms and
the lightning / sparse attention stay in the model dtype. Inference only: FP8 weights take no gradients.

Per-channel scales commute with stacking rows, so quantizing q, k, v separately and concatenating them (the
engine's fused projection) gives bit for bit the weights of quantizing the concatenation: fusing and quantizing
may come in either order. Format of the checkpoint: docs/fp8.md.
"""
from __future__ import annotations

import fnmatch
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from sala.ops.fp8 import (
    BACKENDS,
    FP8_DTYPE,
    SCALED_MM_ALIGN,
    dequantize_weight,
    fp8_linear,
    quantize_weight_per_channel,
)

logger = logging.getLogger(__name__)

QUANT_METHOD = "fp8"
# Tensor dtypes as safetensors headers spell them.
_SAFETENSORS_FP8 = "F8_E4M3"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 2**30
# Files of a model directory that `save_fp8_checkpoint(..., source_dir=...)` copies next to the weights.
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                "generation_config.json")


def fp8_quantization_config(modules_to_not_convert: Iterable[str] = ()) -> dict:
    """The `quantization_config` of config.json for this format (field names follow transformers' FP8 configs
    where they mean the same: quant_method, activation_scheme, weight_block_size, modules_to_not_convert)."""
    return {
        "quant_method": QUANT_METHOD,
        "fmt": "e4m3",
        "weight_dtype": "float8_e4m3fn",
        "weight_block": "per-channel",           # one fp32 scale per output row: <name>.weight_scale [out]
        "weight_block_size": None,               # no 2-D blocks (transformers' FineGrainedFP8 would use them)
        "activation_scheme": "dynamic",          # activations quantized at run time ...
        "activation_granularity": "per-token",   # ... with one scale per token
        "modules_to_not_convert": sorted(modules_to_not_convert),
    }


def is_fp8_config(config) -> bool:
    """Whether a config (object or dict) declares this FP8 format."""
    qc = config.get("quantization_config") if isinstance(config, dict) else getattr(config, "quantization_config", None)
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def _check_fp8_config(qc: dict, where: str) -> None:
    if qc.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"{where}: quantization_config.quant_method is {qc.get('quant_method')!r}, expected 'fp8'")
    want = {"fmt": "e4m3", "weight_block": "per-channel", "activation_scheme": "dynamic"}
    for key, value in want.items():
        if qc.get(key, value) != value:
            raise ValueError(f"{where}: quantization_config.{key} is {qc.get(key)!r}; this loader reads {key}="
                             f"{value!r} only")
    if qc.get("weight_block_size") is not None:
        raise ValueError(f"{where}: quantization_config.weight_block_size is {qc['weight_block_size']}: block-wise "
                         "FP8 checkpoints are not supported (per-channel only)")


# ----------------------------------------------------------------------------- the module
class Fp8Linear(nn.Module):
    """y = x W^T (+ b) with W = weight (float8_e4m3fn [out, in]) * weight_scale (fp32 [out]) and x quantized per
    token at run time; x [..., in] -> y [..., out] in x.dtype.

    `compute_dtype`: the dtype of the Linear it replaced (the model's activations); `backend`, `fast_accum`: see
    `sala.ops.fp8.fp8_linear`. Moving the module (`.to(device)`) moves the FP8 weight and its scales but never
    changes their dtypes; a dtype cast (`.to(torch.bfloat16)`) changes the bias and `compute_dtype` only.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *,
                 device: torch.device | str | None = None, compute_dtype: torch.dtype = torch.bfloat16,
                 backend: str = "auto", fast_accum: bool = False) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"Fp8Linear: unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        self.backend = backend
        self.fast_accum = fast_accum
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=FP8_DTYPE, device=device),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.ones(out_features, dtype=torch.float32, device=device),
                                         requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=compute_dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, backend: str = "auto", fast_accum: bool = False) -> "Fp8Linear":
        """The FP8 version of an nn.Linear (per-channel scales), on its device; the Linear is left unchanged."""
        w = linear.weight.detach()
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta",
                     compute_dtype=w.dtype, backend=backend, fast_accum=fast_accum)
        q, scale = quantize_weight_per_channel(w)
        module.weight = nn.Parameter(q, requires_grad=False)
        module.weight_scale = nn.Parameter(scale, requires_grad=False)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return module

    @classmethod
    def concat(cls, linears: list["Fp8Linear"]) -> "Fp8Linear":
        """One module for several that share their input (`concat_fp8_linears`); what fusing projections calls."""
        return concat_fp8_linears(linears)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.weight_scale, self.bias, backend=self.backend,
                          fast_accum=self.fast_accum)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """weight * weight_scale [out, in] in `dtype` (default compute_dtype)."""
        return dequantize_weight(self.weight, self.weight_scale, dtype or self.compute_dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weight=float8_e4m3fn per-channel, compute_dtype={self.compute_dtype}, backend={self.backend}")

    def _apply(self, fn, recurse: bool = True):
        # nn.Module._apply would cast the float8 weight and fp32 scales with a dtype change (model.to(bf16)):
        # probe where `fn` sends a tensor and move them there in their own dtypes instead.
        # (a float64 probe: every cast to a model dtype changes it, a move alone does not)
        probe = fn(torch.zeros((), dtype=torch.float64, device=self.weight.device))
        if probe.dtype in (torch.bfloat16, torch.float16, torch.float32):
            self.compute_dtype = probe.dtype
        for name in ("weight", "weight_scale"):
            p = getattr(self, name)
            moved = torch.empty_like(p, device=probe.device) if p.is_meta else p.detach().to(probe.device)
            setattr(self, name, nn.Parameter(moved, requires_grad=False))
        if self.bias is not None:
            self.bias = nn.Parameter(fn(self.bias.detach()), requires_grad=False)
        return self


def concat_fp8_linears(linears: list[Fp8Linear]) -> Fp8Linear:
    """One Fp8Linear computing [l(x) for l in linears] concatenated along the output (weights and scales stacked:
    exact, per-channel scales are per row). Each module's weight and scale become views into the result, so no
    memory is added."""
    if not linears or not all(isinstance(m, Fp8Linear) for m in linears):
        raise ValueError("concat_fp8_linears: expects a non-empty list of Fp8Linear modules")
    if len({m.in_features for m in linears}) != 1:
        raise ValueError(f"concat_fp8_linears: in_features differ: {[m.in_features for m in linears]}")
    if any(m.bias is not None for m in linears):
        raise ValueError("concat_fp8_linears: fused projections need bias-free layers (attention_bias=False)")
    first = linears[0]
    fused = Fp8Linear(first.in_features, sum(m.out_features for m in linears), device="meta",
                      compute_dtype=first.compute_dtype, backend=first.backend, fast_accum=first.fast_accum)
    weight = torch.cat([m.weight.detach() for m in linears])
    scale = torch.cat([m.weight_scale.detach() for m in linears])
    fused.weight = nn.Parameter(weight, requires_grad=False)
    fused.weight_scale = nn.Parameter(scale, requires_grad=False)
    o = 0
    for m in linears:
        m.weight = nn.Parameter(weight[o:o + m.out_features], requires_grad=False)
        m.weight_scale = nn.Parameter(scale[o:o + m.out_features], requires_grad=False)
        o += m.out_features
    return fused


# ----------------------------------------------------------------------------- quantizing a model
def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, f"*.{p}") for p in patterns)


def fp8_target_names(model: nn.Module, *, include_lm_head: bool = True, skip: Iterable[str] = ()
                     ) -> tuple[list[str], list[str]]:
    """(names of the nn.Linear modules `quantize_model_fp8` converts, names of those it leaves: skipped by a
    pattern). Candidates: every nn.Linear under model.model.layers, and the LM head (model.lm_head)."""
    skip = list(skip)
    candidates = [f"model.layers.{name}" for name, m in model.model.layers.named_modules()
                  if isinstance(m, nn.Linear)]
    if include_lm_head and isinstance(getattr(model, "lm_head", None), nn.Linear):
        candidates.append("lm_head")
    chosen = [n for n in candidates if not _matches(n, skip)]
    return chosen, [n for n in candidates if n not in chosen]


@torch.no_grad()
def quantize_model_fp8(model: nn.Module, *, include_lm_head: bool = True, skip: Iterable[str] = (),
                       backend: str = "auto", fast_accum: bool = False) -> list[str]:
    """Replace the projection Linears of the decoder layers (and the LM head) by Fp8Linear, in place, one at a time
    (the bf16 weight of each is freed as it goes). `skip`: fnmatch patterns of module names left unchanged
    ("lm_head", "*.o_proj", "model.layers.0.*"). backend: "auto" (torch._scaled_mm on GPUs that run FP8, an
    error elsewhere at the first forward) or "reference" (dequantize + matmul: CPU tests); fast_accum: the
    tensor cores' reduced-precision accumulation (`sala.ops.fp8.fp8_linear_scaled_mm`). Quantizing itself
    runs anywhere (it only needs the weights). Sets model.config.quantization_config; returns the converted names.

    Call it before a `SalaEngine` is built over the model (the engine stacks each layer's projections once); with
    models whose projections are already fused into single Linears, those are converted as they are."""
    if backend not in BACKENDS:
        raise ValueError(f"quantize_model_fp8: unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    names, left = fp8_target_names(model, include_lm_head=include_lm_head, skip=skip)
    if backend != "reference":
        bad = [f"{n} (in_features {model.get_submodule(n).in_features})" for n in names
               if model.get_submodule(n).in_features % SCALED_MM_ALIGN]
        if bad:
            raise ValueError(f"quantize_model_fp8: torch._scaled_mm needs in_features divisible by {SCALED_MM_ALIGN}; "
                             f"{', '.join(bad[:4])} {'is' if len(bad) == 1 else 'are'} not: skip them (skip=...)")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Fp8Linear.from_linear(getattr(parent, child), backend=backend, fast_accum=fast_accum))
    model.config.quantization_config = fp8_quantization_config(left)
    logger.info("FP8: %d linear layers quantized, %d left unquantized", len(names), len(left))
    return names


def fp8_modules(model: nn.Module) -> dict[str, Fp8Linear]:
    """{name: module} of the model's Fp8Linear modules."""
    return {n: m for n, m in model.named_modules() if isinstance(m, Fp8Linear)}


def set_fp8_backend(model: nn.Module, backend: str) -> None:
    """Set the GEMM backend of every Fp8Linear ("auto", "scaled_mm", "reference")."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown FP8 backend {backend!r}; choose from {', '.join(BACKENDS)}")
    for m in fp8_modules(model).values():
        m.backend = backend


# ----------------------------------------------------------------------------- checkpoints
def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _write_atomic_dir(out_dir: Path, write, overwrite: bool) -> None:
    """Write a directory through `write(tmp_dir)` into a temporary sibling, then rename it to `out_dir`. An existing
    `out_dir` is refused unless `overwrite`, and then replaced only once the new one is complete."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists: refusing to overwrite it (pass overwrite=True / --overwrite)")
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        write(tmp)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.rename(out_dir, old / "dir")
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_fp8_checkpoint(model: nn.Module, out_dir: str | os.PathLike, *, overwrite: bool = False,
                        source_dir: str | os.PathLike | None = None,
                        max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Save a model quantized by `quantize_model_fp8` as an FP8 checkpoint directory (docs/fp8.md): config.json
    with `quantization_config`, safetensors shards (+ index when more than one) holding `<name>.weight`
    float8_e4m3fn and `<name>.weight_scale` fp32 for each Fp8Linear, the other tensors in their dtype. Written to a
    temporary directory, then renamed; an existing out_dir only with overwrite=True. `source_dir`: tokenizer and
    generation-config files are copied from it. Returns out_dir."""
    from safetensors.torch import save_file

    if not fp8_modules(model):
        raise ValueError("save_fp8_checkpoint: the model has no Fp8Linear modules (run quantize_model_fp8 first)")
    config = model.config
    if not is_fp8_config(config):
        raise ValueError("save_fp8_checkpoint: model.config has no fp8 quantization_config")
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        if shards[-1] and size + _tensor_bytes(t) > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += _tensor_bytes(t)
    compute_dtype = next(iter(fp8_modules(model).values())).compute_dtype

    def write(tmp: Path) -> None:
        cfg = config.to_dict()
        cfg["quantization_config"] = dict(config.quantization_config)
        cfg["dtype"] = str(compute_dtype).removeprefix("torch.")
        cfg.pop("torch_dtype", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        meta = {"format": "pt", "quantization": QUANT_METHOD}
        if len(shards) == 1:
            save_file(shards[0], str(tmp / WEIGHTS_NAME), metadata=meta)
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata=meta)
                weight_map.update({k: fname for k in shard})
            total = sum(_tensor_bytes(t) for t in state.values())
            (tmp / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                     indent=2) + "\n")
        if source_dir is not None:
            for fname in COPIED_FILES:
                src = Path(source_dir) / fname
                if src.is_file():
                    shutil.copy2(src, tmp / fname)

    _write_atomic_dir(Path(out_dir), write, overwrite)
    return Path(out_dir)


def _header_dtypes(path: Path, files: Iterable[str]) -> dict[str, str]:
    """{tensor name: safetensors dtype string ("F8_E4M3", "BF16", "F32", ...)} from the headers only."""
    out = {}
    for f in files:
        with open(path / f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        out.update({k: v["dtype"] for k, v in header.items() if k != "__metadata__"})
    return out


def load_fp8_checkpoint(path: str | os.PathLike, device: torch.device | str | None = None,
                        dtype: torch.dtype | None = None, *, backend: str = "auto"):
    """A `SalaForCausalLM` with Fp8Linear modules from an FP8 checkpoint directory (`save_fp8_checkpoint`), on
    `device` (default: CUDA when present); tensors that are not FP8 in `dtype` (default: bf16 on CUDA, fp32
    elsewhere). Checks every tensor's name, shape and, for the FP8 ones, dtype against the config from the
    safetensors headers before reading any weight; errors name the file, the tensor and both shapes."""
    from safetensors import safe_open

    from sala.modeling.checkpoint import checkpoint_tensor_shapes
    from sala.modeling.configuration_sala import SalaConfig
    from sala.modeling.modeling_sala import SalaForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model directory: no config.json in it")
    raw = json.loads((path / "config.json").read_text())
    if not is_fp8_config(raw):
        raise ValueError(f"{path}/config.json has no fp8 quantization_config: not an FP8 checkpoint (load it in bf16, "
                         "or quantize it at load time)")
    _check_fp8_config(raw["quantization_config"], f"{path}/config.json")
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available()
                                                                          else "cpu")
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = SalaConfig.from_pretrained(str(path))
    found = checkpoint_tensor_shapes(path)
    quantized = sorted(n[:-len(".weight_scale")] for n in found if n.endswith(".weight_scale"))

    with torch.device("meta"):
        model = SalaForCausalLM(config)
    for name in quantized:
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{path}: tensor {name}.weight_scale belongs to no module of SalaForCausalLM") from None
        if not isinstance(lin, nn.Linear):
            raise ValueError(f"{path}: tensor {name}.weight_scale: {name} is a {type(lin).__name__}, not a Linear")
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child,
                Fp8Linear(lin.in_features, lin.out_features, bias=lin.bias is not None, device="meta",
                          compute_dtype=dtype, backend=backend))

    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = []
    for name, shape in expected.items():
        if name not in found:
            problems.append(f"missing tensor {name!r} (expected shape {list(shape)})")
        elif found[name][0] != shape:
            problems.append(f"{found[name][1]}: tensor {name!r} has shape {list(found[name][0])}, the config "
                            f"expects {list(shape)}")
    for name in sorted(set(found) - set(expected)):
        problems.append(f"{found[name][1]}: unexpected tensor {name!r} (shape {list(found[name][0])})")
    dtypes = _header_dtypes(path, sorted({f for _, f in found.values()}))
    for name in quantized:
        if dtypes.get(f"{name}.weight") != _SAFETENSORS_FP8:
            problems.append(f"tensor {name + '.weight'!r} is {dtypes.get(f'{name}.weight')}, expected F8_E4M3 "
                            "(float8_e4m3fn)")
        if dtypes.get(f"{name}.weight_scale") != "F32":
            problems.append(f"tensor {name + '.weight_scale'!r} is {dtypes.get(f'{name}.weight_scale')}, expected F32")
    if problems:
        shown = problems[:10] + ([f"... and {len(problems) - 10} more problems"] if len(problems) > 10 else [])
        raise ValueError(f"FP8 checkpoint {path} does not fit the model:\n  " + "\n  ".join(shown))

    keep = {f"{n}.weight" for n in quantized} | {f"{n}.weight_scale" for n in quantized}
    state: dict[str, torch.Tensor] = {}
    for fname in sorted({f for _, f in found.values()}):
        with safe_open(str(path / fname), framework="pt", device=str(device)) as st:
            for name in st.keys():
                t = st.get_tensor(name)
                state[name] = t if name in keep else t.to(dtype)
    model.load_state_dict(state, strict=True, assign=True)
    for m in model.modules():   # assign=True takes the tensors' requires_grad: FP8 modules take no gradients
        if isinstance(m, Fp8Linear):
            m.requires_grad_(False)
    meta_left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta_left:
        raise ValueError(f"FP8 checkpoint {path}: tensors not loaded: {meta_left[:5]}")
    logger.info("loaded FP8 checkpoint %s: %d FP8 linear layers", path, len(quantized))
    return model.eval()
