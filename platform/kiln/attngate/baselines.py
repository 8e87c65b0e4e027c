"""Training-free eviction baselines at a fixed KV budget, as `transformers` caches.

- StreamingLLM (Xiao et al., arXiv 2309.17453): keep the first `sinks` entries ("attention
  sinks") plus the most recent ones.
- H2O (Zhang et al., arXiv 2306.14048): keep the most recent half of the budget plus the
  "heavy hitters", the older entries with the largest attention accumulated over all queries so
  far, chosen per KV head.

Both run on the unmodified model. After every attention call a layer holds at most `budget`
entries per head: the new token attends to the budget and itself, then the layer trims.
Deviation from StreamingLLM: entries keep their original RoPE positions (no re-indexing inside
the cache); kiln's contexts are within the trained length, so there is nothing to extrapolate.
H2O needs the attention weights, so models must run with `attn_implementation="eager"` and
`observe_attention(model)` hooks installed.
"""

from __future__ import annotations

from typing import Literal

import torch
from transformers.cache_utils import Cache, DynamicLayer
from transformers.models.llama.modeling_llama import LlamaAttention

Policy = Literal["streaming", "h2o"]
STREAMING_SINKS = 4


class BudgetLayer(DynamicLayer):
    def __init__(self, policy: Policy, budget: int):
        super().__init__()
        self.policy, self.budget = policy, budget
        self.seen = 0
        self.scores: torch.Tensor | None = None  # H2O: accumulated attention per stored entry

    def update(self, key_states, value_states, *args, **kwargs):
        keys, values = super().update(key_states, value_states)
        new = torch.zeros(key_states.shape[:3], dtype=torch.float32, device=key_states.device)
        self.scores = new if self.scores is None else torch.cat([self.scores, new], dim=2)
        self.seen += key_states.shape[2]
        return keys, values

    def after_attention(self, weights: torch.Tensor | None) -> None:
        """Accumulate this step's attention (H2O), then trim to the budget."""
        if self.policy == "h2o":
            b, kv_heads, length = self.scores.shape
            received = weights.float().sum(dim=2).view(b, kv_heads, -1, length).sum(dim=2)
            self.scores += received
        length = self.keys.shape[2]
        if length <= self.budget:
            return
        if self.policy == "streaming":
            sinks = min(STREAMING_SINKS, self.budget // 2)
            window = self.budget - sinks
            index = torch.cat([torch.arange(sinks), torch.arange(length - window, length)])
            index = index.to(self.keys.device).expand(*self.keys.shape[:2], -1)
        else:
            recent = self.budget // 2
            heavy = self.budget - recent
            older = self.scores[:, :, : length - recent]
            top = older.topk(heavy, dim=2).indices
            latest = torch.arange(length - recent, length, device=self.keys.device)
            index = torch.cat([top, latest.expand(*top.shape[:2], -1)], dim=2).sort(dim=2).values
        gather = index[..., None].expand(-1, -1, -1, self.keys.shape[3])
        self.keys = self.keys.gather(2, gather)
        self.values = self.values.gather(2, gather)
        self.scores = self.scores.gather(2, index)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        stored = self.keys.shape[2] if self.is_initialized else 0
        return stored + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen


class BudgetCache(Cache):
    """StreamingLLM or H2O eviction: at most `budget` KV entries per layer and head."""

    def __init__(self, config, policy: Policy, budget: int):
        if policy not in ("streaming", "h2o"):
            raise ValueError(f"policy={policy!r}: expected 'streaming' or 'h2o'")
        if budget < 2:
            raise ValueError(f"budget={budget}: expected at least 2 KV entries per head")
        layers = [BudgetLayer(policy, budget) for _ in range(config.num_hidden_layers)]
        super().__init__(layers=layers)

    def eviction_ratio(self) -> float:
        """1 − stored / (layers × KV heads × tokens seen), as for GateCache."""
        stored = sum(layer.keys.shape[2] for layer in self.layers)
        return 1 - stored / (len(self.layers) * self.layers[0].seen)


def observe_attention(model) -> list:
    """Hooks that hand every attention call's weights to its BudgetCache layer; returns handles."""

    def hook(module, args, kwargs, output):
        cache = kwargs.get("cache")
        if isinstance(cache, BudgetCache):
            cache.layers[module.layer_idx].after_attention(output[1])

    attentions = [m for m in model.modules() if isinstance(m, LlamaAttention)]
    return [m.register_forward_hook(hook, with_kwargs=True) for m in attentions]
