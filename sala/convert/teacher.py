"""Running the dense teacher: logits, and the input/output of each layer's attention block.

Llama / Qwen2 / Qwen3 load through transformers' own classes; MiniCPM (not in transformers) runs as an
exact SALA emulation (`families.teacher_emulation_config`). Either way `attention_modules[i]` is the
module whose input is the normed layer input x_i [B, T, hidden] and whose output (first element when a
tuple) is the attention block's output after o_proj, y_i [B, T, hidden].
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from sala.convert.families import TeacherSpec, read_teacher_spec, teacher_emulation_config


def load_state_dict_dir(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors checkpoint folder (single file or shards), on the CPU."""
    from safetensors.torch import load_file

    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights found (pytorch_model.bin is not supported; "
                                "re-save the teacher with save_pretrained(safe_serialization=True))")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(f)))
    return sd


class Teacher:
    """A frozen dense teacher in eval mode on `device`."""

    def __init__(self, path: str | Path, device: torch.device | str = "cpu") -> None:
        self.path = Path(path)
        self.spec: TeacherSpec = read_teacher_spec(path)
        self.device = torch.device(device)
        if self.spec.model_type == "minicpm":
            from sala.modeling.modeling_sala import SalaForCausalLM

            model = SalaForCausalLM(teacher_emulation_config(self.spec))
            sd = load_state_dict_dir(path)
            if "lm_head.weight" not in sd:
                sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
            model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        self.model: nn.Module = model.to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        layers = self.model.model.layers
        self.attention_modules: list[nn.Module] = [layer.self_attn for layer in layers]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The teacher's weights in the shared checkpoint layout (fp32, CPU); tied heads made explicit."""
        sd = {k: v.detach().float().cpu() for k, v in self.model.state_dict().items()}
        if "lm_head.weight" not in sd:
            sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
        return sd

    def logits(self, input_ids: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """fp32 logits [B, T, V] (or [B, 1, V] with `last_only`)."""
        kwargs = {"logits_to_keep": 1} if last_only else {}
        return self.model(input_ids=input_ids, use_cache=False, **kwargs).logits.float()

    @contextlib.contextmanager
    def capture(self, layers: list[int] | None = None) -> Iterator[dict[int, tuple[torch.Tensor, torch.Tensor]]]:
        """Within the block, every forward records {layer: (x_i, y_i)} (detached) into the yielded dict."""
        store: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        handles = []
        for i in (range(len(self.attention_modules)) if layers is None else layers):
            def hook(mod, args, kwargs, output, i=i):
                store[i] = (_attn_input(args, kwargs).detach(), _attn_output(output).detach())
            handles.append(self.attention_modules[i].register_forward_hook(hook, with_kwargs=True))
        try:
            yield store
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def swapped(self, layer: int, replacement: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
        """Within the block, attention block `layer` outputs replacement(x_layer) instead (one-layer swap)."""
        def hook(mod, args, kwargs, output):
            y = replacement(_attn_input(args, kwargs)).to(_attn_output(output).dtype)
            return (y,) + tuple(output[1:]) if isinstance(output, tuple) else y
        h = self.attention_modules[layer].register_forward_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            h.remove()


def _attn_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _attn_output(output: object) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output   # type: ignore[index]
