"""Speculative decoding: drafts (n-gram prompt lookup, a draft model), verification with exact acceptance
(greedy prefix match; rejection sampling that keeps the target distribution), exact cache rollback and an
adaptive number of draft tokens per request."""
from sala.engine.speculative.accept import accept_drafts, accept_greedy
from sala.engine.speculative.adaptive import COST_PER_DRAFT, AdaptiveK, StepCosts, expected_tokens
from sala.engine.speculative.drafts import (
    Drafter,
    DraftState,
    ModelDrafter,
    NgramDrafter,
    NgramIndex,
    make_drafter,
)
from sala.engine.speculative.verify import SpecStats, VerifyStep

__all__ = [
    "COST_PER_DRAFT",
    "AdaptiveK",
    "StepCosts",
    "expected_tokens",
    "DraftState",
    "Drafter",
    "ModelDrafter",
    "NgramIndex",
    "NgramDrafter",
    "SpecStats",
    "accept_drafts",
    "accept_greedy",
    "VerifyStep",
    "make_drafter",
]
