"""Speculative decoding: drafts (n-gram prompt lookup, a draft model), verification with exact acceptance
(greedy prefix match; rejection sampling that keeps the target distribution), exact cache rollback and an
adaptive number of draft tokens per request."""
from sala.engine.speculative.accept import accept_drafts, target_probs
from sala.engine.speculative.adaptive import AdaptiveK
from sala.engine.speculative.drafts import (
    Drafter,
    ModelDrafter,
    NgramDrafter,
    make_drafter,
)
from sala.engine.speculative.verify import (
    LightningInputs,
    SpecStats,
    rollback_row,
    snapshot_row,
    verify_row,
)

__all__ = [
    "AdaptiveK",
    "Drafter",
    "LightningInputs",
    "ModelDrafter",
    "NgramDrafter",
    "SpecStats",
    "accept_drafts",
    "make_drafter",
    "rollback_row",
    "snapshot_row",
    "target_probs",
    "verify_row",
]
