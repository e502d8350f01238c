"""SALA modules: configuration, the model (one file, HF convention), its hybrid cache, checkpoint checks."""
from sala.modeling.cache import SalaCache
from sala.modeling.configuration_sala import SalaConfig
from sala.modeling.modeling_sala import (SalaForCausalLM, SalaModel, SalaPreTrainedModel, cache_keyword,
                                         output_cache)

__all__ = ["SalaConfig", "SalaCache", "SalaForCausalLM", "SalaModel", "SalaPreTrainedModel",
           "cache_keyword", "output_cache"]
