"""Attention-Gate (arXiv 2410.12876): learned KV-cache eviction; the math is in `gate.py`."""

from kiln.attngate.baselines import BudgetCache, observe_attention
from kiln.attngate.gate import (
    GateCache,
    GateConfig,
    attach,
    eviction_loss,
    gated_layers,
    key_weights,
    load_gated,
    retention,
)

__all__ = [
    "BudgetCache",
    "GateCache",
    "GateConfig",
    "attach",
    "eviction_loss",
    "gated_layers",
    "key_weights",
    "load_gated",
    "observe_attention",
    "retention",
]
