"""AdaMoE (arXiv 2406.13233): null experts make a Mixtral model's per-token compute adaptive.

The method is in `kiln.adamoe.model`; `kiln.adamoe.analytics` measures routing (true experts per
token and per token type, MoE FLOPs) and plots it. Importing this package registers the
`adamoe` model type, so `AutoModelForCausalLM.from_pretrained` reloads a converted model.
"""

from kiln.adamoe.model import (
    AdaMoEConfig,
    AdaMoEForCausalLM,
    convert,
    null_aware_balance_loss,
    route,
    true_experts_per_token,
)

__all__ = [
    "AdaMoEConfig",
    "AdaMoEForCausalLM",
    "convert",
    "null_aware_balance_loss",
    "route",
    "true_experts_per_token",
]
