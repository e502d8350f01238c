"""sala: MiniCPM-SALA (InfLLM-V2 sparse + Lightning linear attention) for million-token contexts.

`import sala` registers `SalaConfig` / `SalaForCausalLM` with transformers' Auto classes under
model_type "minicpm_sala", so `AutoModelForCausalLM.from_pretrained(dir)` loads the released checkpoint
without `trust_remote_code`.
"""
from __future__ import annotations

__version__ = "0.1.0"

from sala.modeling import SalaCache, SalaConfig, SalaForCausalLM, SalaModel


def _register_with_transformers() -> None:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    try:
        AutoConfig.register("minicpm_sala", SalaConfig, exist_ok=True)
        AutoModel.register(SalaConfig, SalaModel, exist_ok=True)
        AutoModelForCausalLM.register(SalaConfig, SalaForCausalLM, exist_ok=True)
    except TypeError:  # older transformers without exist_ok
        AutoConfig.register("minicpm_sala", SalaConfig)
        AutoModel.register(SalaConfig, SalaModel)
        AutoModelForCausalLM.register(SalaConfig, SalaForCausalLM)


_register_with_transformers()

__all__ = ["SalaConfig", "SalaCache", "SalaForCausalLM", "SalaModel", "__version__"]
