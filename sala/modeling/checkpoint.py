"""Checks a checkpoint directory against a model class before loading, with errors that name the problem.

A SALA checkpoint is the released layout: `config.json` + `model.safetensors` or shards listed in
`model.safetensors.index.json` (`weight_map`: tensor name -> shard file). Names and shapes come from the
safetensors headers; the values are then read once, one tensor at a time, to refuse weights holding NaN or
infinity (which would otherwise load silently and generate nothing).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from sala.utils.errors import UsageError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def checkpoint_tensor_shapes(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], str]]:
    """{tensor name: (shape, file name)} for a safetensors checkpoint directory (single file or sharded)."""
    path = Path(path)
    index = path / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: not a valid safetensors index (needs a 'weight_map'): {e}") from None
        files = sorted(set(weight_map.values()))
    elif (path / SINGLE_NAME).exists():
        weight_map, files = None, [SINGLE_NAME]
    else:
        raise FileNotFoundError(f"{path}: no {SINGLE_NAME} or {INDEX_NAME} found")
    missing = [f for f in files if not (path / f).exists()]
    if missing:
        raise FileNotFoundError(f"{path}: shard file(s) listed in {INDEX_NAME} are missing: {', '.join(missing)}")
    found: dict[str, tuple[tuple[int, ...], str]] = {}
    for f in files:
        try:
            with safe_open(str(path / f), framework="pt") as st:
                for name in st.keys():
                    found[name] = (tuple(st.get_slice(name).get_shape()), f)
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise ValueError(f"{path / f}: cannot read safetensors header: {e}") from None
    if weight_map is not None:
        for name, f in weight_map.items():
            if name not in found:
                raise ValueError(f"{path / f}: tensor {name!r} is listed in {INDEX_NAME} but not stored in the shard")
    return found


def check_config_json(path: str | os.PathLike) -> dict:
    """Read `path`/config.json (or the file `path`), raising UsageError naming the file and the line, column or
    field when it is not valid JSON, not an object, or (for model_type minicpm_sala) not a valid SalaConfig.
    Returns the parsed mapping."""
    path = Path(path)
    f = path / "config.json" if path.is_dir() else path
    if not f.is_file():
        raise FileNotFoundError(f"{path} is not a model directory: no config.json in it")
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise UsageError(f"{f} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"{f}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}; fix or replace the "
                         f"file") from None
    if not isinstance(data, dict):
        raise UsageError(f"{f}: expected a JSON object ({{\"model_type\": ...}}), got {type(data).__name__}")
    if data.get("model_type", "minicpm_sala") == "minicpm_sala":
        from sala.modeling.configuration_sala import SalaConfig

        fields = {k: v for k, v in data.items() if k not in ("model_type", "transformers_version", "architectures")}
        try:
            SalaConfig(**fields)
        except (ValueError, TypeError, KeyError) as e:
            raise UsageError(f"{f}: {e}") from None
    return data


def check_finite_tensors(path: str | os.PathLike, files: list[str] | None = None) -> None:
    """Raise ValueError naming the file and the first tensor holding NaN or infinity (floating-point tensors of
    the checkpoint directory `path`, read one at a time)."""
    path = Path(path)
    if files is None:
        files = sorted({f for _, f in checkpoint_tensor_shapes(path).values()})
    for f in files:
        with safe_open(str(path / f), framework="pt") as st:
            for name in st.keys():
                t = st.get_tensor(name)
                if not t.is_floating_point():
                    continue
                finite = torch.isfinite(t)
                if not bool(finite.all()):
                    bad = int((~finite).sum())
                    kinds = [k for k, m in (("NaN", torch.isnan(t)), ("inf", torch.isinf(t))) if bool(m.any())]
                    raise ValueError(f"{path / f}: tensor {name!r} holds {bad:,} non-finite values "
                                     f"({' and '.join(kinds)}) of {t.numel():,}: the checkpoint is corrupt (or was "
                                     f"saved from a diverged run); use another checkpoint")


def expected_tensor_shapes(config, model_cls) -> dict[str, tuple[int, ...]]:
    """{parameter name: shape} of `model_cls(config)`, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = model_cls(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def validate_checkpoint_dir(path: str | os.PathLike, config, model_cls, check_values: bool = True) -> None:
    """Raise FileNotFoundError / ValueError naming file, key and both shapes on any mismatch, and (check_values)
    naming the tensor when a weight is NaN or infinite."""
    found = checkpoint_tensor_shapes(path)
    expected = expected_tensor_shapes(config, model_cls)
    problems: list[str] = []
    for name, shape in expected.items():
        if name not in found:
            problems.append(f"missing tensor {name!r} (expected shape {list(shape)})")
        elif found[name][0] != shape:
            problems.append(f"{found[name][1]}: tensor {name!r} has shape {list(found[name][0])}, "
                            f"the config expects {list(shape)}")
    unexpected = sorted(set(found) - set(expected))
    for name in unexpected[:5]:
        problems.append(f"{found[name][1]}: unexpected tensor {name!r} (shape {list(found[name][0])}) "
                        f"not in {model_cls.__name__}")
    if len(unexpected) > 5:
        problems.append(f"... and {len(unexpected) - 5} more unexpected tensors")
    if problems:
        shown = problems[:10] + ([f"... and {len(problems) - 10} more problems"] if len(problems) > 10 else [])
        raise ValueError(f"checkpoint {path} does not fit the model:\n  " + "\n  ".join(shown))
    if check_values:
        check_finite_tensors(path, sorted({f for _, f in found.values()}))
