"""DPO, Flex-DPO, NLL-regularised DPO and IPO: the loss math, as small pure functions.

Papers: DPO, Rafailov et al., arXiv 2305.18290. The 3D-properties and their fixes: Yan et al.,
"3D-Properties: Identifying Challenges in DPO and Charting a Path Forward", arXiv 2406.07327.
DPO + NLL: Pang et al., Iterative RPO, arXiv 2404.19733. IPO: Azar et al., arXiv 2310.12036.

Notation. For prompt x, chosen response y_w and rejected y_l, log π⁺ = Σ_t log π_θ(y_w,t | x,
y_w,<t) summed over response tokens only (prompt and padding masked), log π⁻ likewise for y_l,
and log c⁺, log c⁻ the same sums under the frozen reference model.

    r⁺ = β⁺ (log π⁺ − log c⁺),   r⁻ = β⁻ (log π⁻ − log c⁻)         (implicit rewards)
    ℓ_DPO = −log σ(r⁺ − r⁻)                                       (β⁺ = β⁻ = β)
    ℓ_Flex = the same with β⁻ = beta_rejected ≤ β⁺ = beta          (damps the rejected push)
    ℓ_NLL  = ℓ_DPO + λ · mean over chosen tokens of −log π_θ(y_w,t | ·)
    ℓ_IPO  = ((log π⁺ − log c⁺) − (log π⁻ − log c⁻) − 1/(2β))²

Why Flex-DPO (the paper's Corollaries 1-2): in probability space
∂ℓ/∂π⁻ / ∂ℓ/∂π⁺ = −(β⁻/β⁺)(π⁺/π⁻), so once π⁻ < π⁺ the push down on the rejected response
dominates, and as π⁻ → 0 (β < 1) it diverges while the lift on the chosen one vanishes: the
drastic drop and the degradation into unlearning. A smaller β⁻ damps it; the NLL term keeps
lifting the chosen response.

Choices where the papers are silent (marked [reconstructed] in the brief):
- β⁻ is a static value (the paper's "adaptive β" has no stated rule; its sweep is static).
- The NLL term is the mean over every chosen token in the batch (TRL's "sft" loss term), not a
  per-sequence sum, so λ does not scale with response length.
- IPO takes whatever log-probs the caller passes: sums give the paper's form; per-token means
  give TRL's length-normalised variant.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class PairLogps(NamedTuple):
    chosen: torch.Tensor  # [batch], log π⁺ summed over response tokens
    rejected: torch.Tensor  # [batch], log π⁻
    chosen_token_logps: torch.Tensor  # [batch, width-1], per chosen token (0 off the response)
    chosen_token_mask: torch.Tensor  # [batch, width-1], 1 on chosen response tokens


class DPOOutput(NamedTuple):
    losses: torch.Tensor  # [batch], per example
    chosen_rewards: torch.Tensor  # [batch], r⁺ (detached: a diagnostic, not a loss path)
    rejected_rewards: torch.Tensor  # [batch], r⁻


def sequence_logps(
    logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs [batch] and per-token log-probs [batch, seq-1].

    `response_mask[b, t]` is 1 where token t belongs to the response (not prompt, not padding).
    Position t's log-prob comes from the logits at t-1, so the first token never counts.
    """
    targets = input_ids[:, 1:]
    per_token = torch.gather(logits[:, :-1].log_softmax(-1), 2, targets.unsqueeze(-1)).squeeze(-1)
    per_token = per_token * response_mask[:, 1:]
    return per_token.sum(-1), per_token


def pair_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> PairLogps:
    """Chosen and rejected through the model in one concatenated forward.

    `batch` holds right-padded `{chosen,rejected}_{ids,attention,response}` [batch, width]
    (see `kiln.dpo.data.tokenize_pairs`); columns past the longest sequence are cut first.
    """
    ids, attention, response = (
        torch.cat([batch[f"chosen_{key}"], batch[f"rejected_{key}"]])
        for key in ("ids", "attention", "response")
    )
    width = int(attention.sum(1).max())
    ids, attention, response = ids[:, :width], attention[:, :width], response[:, :width]
    logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
    # log-softmax in at least float32 (bf16 logits lose the small differences DPO reads).
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logps, token_logps = sequence_logps(logits, ids, response)
    chosen, rejected = logps.chunk(2)
    return PairLogps(chosen, rejected, token_logps.chunk(2)[0], response[:, 1:].chunk(2)[0])


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    beta_rejected: float | None = None,
) -> DPOOutput:
    """Sigmoid DPO per example; `beta_rejected` set gives Flex-DPO (β⁻ ≠ β⁺ = beta)."""
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps)
    rejected_beta = beta if beta_rejected is None else beta_rejected
    rejected_rewards = rejected_beta * (policy_rejected_logps - reference_rejected_logps)
    # −log σ(u) through logsigmoid: stable where σ(u) underflows (the drastic-drop regime).
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)
    return DPOOutput(losses, chosen_rewards.detach(), rejected_rewards.detach())


def chosen_nll(chosen_token_logps: torch.Tensor, chosen_mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood over every chosen-response token in the batch."""
    mask = chosen_mask.bool()
    return -chosen_token_logps[mask].sum() / mask.sum().clamp(min=1)


def nll_regularised_dpo_loss(
    dpo: DPOOutput,
    chosen_token_logps: torch.Tensor,
    chosen_mask: torch.Tensor,
    nll_weight: float,
) -> torch.Tensor:
    """Batch objective mean(ℓ_DPO) + λ · NLL(chosen); λ = 0 is plain (or Flex-) DPO."""
    loss = dpo.losses.mean()
    if nll_weight:
        loss = loss + nll_weight * chosen_nll(chosen_token_logps, chosen_mask)
    return loss


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> torch.Tensor:
    """IPO per example: the log-ratio margin regressed onto 1/(2β)."""
    margin = (policy_chosen_logps - reference_chosen_logps) - (
        policy_rejected_logps - reference_rejected_logps
    )
    return (margin - 1 / (2 * beta)) ** 2
