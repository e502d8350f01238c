"""SALA modules: configuration, the model (one file, HF convention, the only forward), the context that tells its
layers which mode they run in (`ForwardContext`), its hybrid cache, checkpoint checks."""
from sala.modeling.cache import SalaCache
from sala.modeling.configuration_sala import SalaConfig
from sala.modeling.context import ForwardContext
from sala.modeling.modeling_sala import SalaForCausalLM, SalaModel, SalaPreTrainedModel, cache_keyword, output_cache

__all__ = ["SalaConfig", "SalaCache", "ForwardContext", "SalaForCausalLM", "SalaModel", "SalaPreTrainedModel",
           "cache_keyword", "output_cache"]
