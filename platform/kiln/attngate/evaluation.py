"""Greedy task accuracy under a KV-eviction policy, with the eviction ratio it reached.

Fixed-budget caches read the prompt one token at a time, so they never hold more than their
budget, not even during the prompt (a parallel prefill would let the first answer token see the
whole prompt). The gate's ratio and the baselines' use one definition:
1 − stored entries / (layers × KV heads × tokens seen), at the end of each example.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from kiln.attngate.baselines import BudgetCache
from kiln.attngate.gate import GateCache
from kiln.worlds.text import Example, extract_answer

Method = Literal["full", "gate", "streaming", "h2o"]


@torch.no_grad()
def greedy_decode(model, cache, prompt: list[int], max_new_tokens: int, eos: int) -> list[int]:
    """Greedy continuation of `prompt` through `cache`.

    A fixed-budget cache reads the prompt one token at a time, so it never holds more than its
    budget; the full cache and the gate's cache read it in one forward (for the gate this is
    exactly equivalent, see tests/test_attngate.py).
    """
    device = next(model.parameters()).device
    stepwise = isinstance(cache, BudgetCache)
    chunks = [[token] for token in prompt] if stepwise else [prompt]
    for chunk in chunks:
        logits = model(torch.tensor([chunk], device=device), cache=cache, use_cache=True).logits
    generated: list[int] = []
    for _ in range(max_new_tokens):
        token = int(logits[0, -1].argmax())
        if token == eos:
            break
        generated.append(token)
        logits = model(torch.tensor([[token]], device=device), cache=cache, use_cache=True).logits
    return generated


def make_cache(model: PreTrainedModel, method: Method, keep_fraction: float, length: int):
    """A fresh cache for one example of `length` tokens; fixed budgets keep that fraction."""
    if method == "full":
        return DynamicCache(config=model.config)
    if method == "gate":
        return GateCache(model.config)
    return BudgetCache(model.config, method, max(2, math.ceil(keep_fraction * length)))


def accuracy_under_eviction(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    new_cache: Callable[[int], object],
) -> dict[str, float]:
    """Exact-answer accuracy and mean eviction ratio; `new_cache(length)` per example.

    `length` is the prompt plus the reference completion: what a correct answer decodes, so a
    fixed budget of keep_fraction·length evicts the fraction the gate is compared at.
    """
    was_training = model.training
    model.eval()
    hits, ratios = [], []
    for example in examples:
        prompt = tokenizer(example.prompt).input_ids
        answer = len(tokenizer(example.completion, add_special_tokens=False).input_ids)
        cache = new_cache(len(prompt) + answer)
        completion = greedy_decode(model, cache, prompt, answer + 4, tokenizer.eos_token_id)
        hits.append(extract_answer(tokenizer.decode(completion)) == example.answer)
        ratios.append(0.0 if isinstance(cache, DynamicCache) else cache.eviction_ratio())
    model.train(was_training)
    return {"accuracy": sum(hits) / len(hits), "eviction": sum(ratios) / len(ratios)}
