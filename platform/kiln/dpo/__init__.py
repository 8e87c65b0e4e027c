"""DPO with the 3D-properties fixes (arXiv 2406.07327); the math is in `losses.py`."""

from kiln.dpo.losses import (
    DPOOutput,
    chosen_nll,
    dpo_loss,
    ipo_loss,
    nll_regularised_dpo_loss,
    sequence_logps,
)

__all__ = [
    "DPOOutput",
    "chosen_nll",
    "dpo_loss",
    "ipo_loss",
    "nll_regularised_dpo_loss",
    "sequence_logps",
]
