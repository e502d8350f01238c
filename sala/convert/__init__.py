"""Transformer -> SALA conversion (HALO-style): weight transfer, stage-1 alignment, layer selection,
stage-2 KL distillation. Entry point: `convert(ConvertOptions(...))` or `sala convert`."""
from sala.convert.families import SUPPORTED_MODEL_TYPES, read_teacher_spec, sala_config_for
from sala.convert.pipeline import ConvertOptions, convert
from sala.convert.transfer import expand_kv, transfer_state_dict

__all__ = ["SUPPORTED_MODEL_TYPES", "ConvertOptions", "convert", "expand_kv", "read_teacher_spec",
           "sala_config_for", "transfer_state_dict"]
