"""Checks a checkpoint directory against a model class before loading, with errors that name the problem.

A SALA checkpoint is the released layout: `config.json` + `model.safetensors` or shards listed in
`model.safetensors.index.json` (`weight_map`: tensor name -> shard file). Reading only the safetensors
headers makes the check cheap even for the 19 GB release.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

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


def expected_tensor_shapes(config, model_cls) -> dict[str, tuple[int, ...]]:
    """{parameter name: shape} of `model_cls(config)`, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = model_cls(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def validate_checkpoint_dir(path: str | os.PathLike, config, model_cls) -> None:
    """Raise FileNotFoundError / ValueError naming file, key and both shapes on any mismatch."""
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
