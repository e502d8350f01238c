"""Training SALA models and dense baselines (see docs/training.md)."""
from sala.train.config import DataConfig, ModelConfig, OptimConfig, StageConfig, TrainConfig, load_config, validate
from sala.train.model_factory import build_model, load_model_dir, set_sparse_attention
from sala.train.schedule import schedule, stage_lr
from sala.train.trainer import Trainer, bf16_residual_stream, set_trainable

__all__ = ["DataConfig", "ModelConfig", "OptimConfig", "StageConfig", "TrainConfig", "load_config", "validate",
           "build_model", "load_model_dir", "set_sparse_attention", "schedule", "stage_lr", "Trainer",
           "bf16_residual_stream", "set_trainable"]
