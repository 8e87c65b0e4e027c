"""DPO with the 3D-properties fixes (arXiv 2406.07327).

The math is in `losses.py`; preference data (world pairs, on-policy sampling, files) in
`data.py`; the diagnostics figure in `plots.py`.
"""

from kiln.dpo.losses import (
    DPOOutput,
    PairLogps,
    chosen_nll,
    dpo_loss,
    ipo_loss,
    nll_regularised_dpo_loss,
    pair_logps,
    sequence_logps,
)

__all__ = [
    "DPOOutput",
    "PairLogps",
    "chosen_nll",
    "dpo_loss",
    "ipo_loss",
    "nll_regularised_dpo_loss",
    "pair_logps",
    "sequence_logps",
]
