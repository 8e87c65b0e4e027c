"""Turn logits into tokens: greedy, temperature, top-k and top-p, with per-request RNGs.

`probs_from_logits` is the single definition of a request's sampling distribution; speculative
verification must use it too, because lossless rejection sampling compares the draft against
the target distribution *after* temperature, top-k and top-p (Leviathan et al., arXiv
2211.17192; Chen et al., arXiv 2302.01318).

Every request draws from its own `torch.Generator`, so a seeded request produces the same tokens
whatever else is in the batch. Sampling uses the exponential race (argmax p(x) / E_x with
E_x ~ Exp(1), which picks x with probability p(x)) as vLLM does: one draw per vocabulary entry,
no cumulative sums, and zero-probability tokens can never win.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.engine.params import SamplingParams


def probs_from_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[n, vocab] float32 logits -> the request's sampling distribution [n, vocab].

    Greedy requests (temperature 0) get a one-hot distribution on the argmax.
    """
    logits = logits.float()
    if params.greedy:
        return F.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    if params.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the token crossing it included).
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample_from_probs(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per row of [n, vocab] `probs`, drawn with `generator` (exponential race)."""
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / noise).argmax(dim=-1)


def sample(
    logits: list[torch.Tensor],
    params: list[SamplingParams],
    generators: list[torch.Generator],
    return_probs: bool = False,
) -> tuple[list[int], list[torch.Tensor] | None]:
    """Sample the next token of each request from its last logits row ([>=1, vocab] each).

    Returns the tokens and, when asked, each request's distribution [vocab] they came from.
    """
    if not return_probs and all(p.greedy for p in params):  # common serving case: one argmax
        return torch.stack([row[-1] for row in logits]).argmax(dim=-1).tolist(), None
    tokens, all_probs = [], []
    for row, p, generator in zip(logits, params, generators):
        probs = probs_from_logits(row[-1:], p)
        token = probs.argmax(-1) if p.greedy else sample_from_probs(probs, generator)
        tokens.append(int(token))
        all_probs.append(probs[0])
    return tokens, (all_probs if return_probs else None)
