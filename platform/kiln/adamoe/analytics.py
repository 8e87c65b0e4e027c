"""Routing analytics for AdaMoE: true experts per token (overall and per token type), MoE FLOPs
relative to the fixed top-k model, and the plots of both.

Token types come from the text world: the prompt, and the completion of each task, with
arithmetic's worked answer split into *copied* tokens (operand digits, operators, punctuation,
all readable from the context) and *computed* ones (column results, carry/borrow marks, the
final answer). Adaptive routing has something to adapt to if computed tokens draw more experts.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from kiln.adamoe.model import AdaMoEConfig, true_experts_per_token
from kiln.worlds.text import Example

TOKEN_TYPES = ("prompt", "copied", "computed", "recall", "copy")
# Column results after '=', carry/borrow marks (`c1`, `b1 17`) and the answer after '####'.
_COMPUTED = re.compile(r"(?<==)-?\d+|[cb]1(?: \d+)?|(?<=#### )-?\d+")


def char_types(example: Example) -> list[int]:
    """The TOKEN_TYPES index of every character of `example.text`."""
    prompt, completion = example.prompt, example.completion
    if example.task == "arithmetic":
        types = [TOKEN_TYPES.index("copied")] * len(completion)
        for match in _COMPUTED.finditer(completion):
            types[match.start() : match.end()] = [TOKEN_TYPES.index("computed")] * len(match[0])
    else:
        types = [TOKEN_TYPES.index(example.task)] * len(completion)
    return [TOKEN_TYPES.index("prompt")] * len(prompt) + types


def moe_flops_ratio(mean_true_experts: float, config: AdaMoEConfig) -> float:
    """MoE-layer FLOPs per token (router + expert SwiGLUs) relative to the model's base top-k."""
    hidden, width = config.hidden_size, config.intermediate_size
    experts = config.num_local_experts
    expert_flops = 2 * 3 * hidden * width  # gate, up and down projections, 2 FLOPs per MAC
    router_flops = 2 * hidden * (experts + config.num_null_experts)
    baseline = 2 * hidden * experts + config.base_top_k * expert_flops
    return (router_flops + mean_true_experts * expert_flops) / baseline


def routing_counts(
    router_logits: tuple[torch.Tensor, ...],
    num_experts: int,
    top_k: int,
    token_types: torch.Tensor,
    attention_mask: torch.Tensor,
) -> dict[str, float]:
    """Sums that average exactly across micro-batches and ranks (the runner averages metrics).

    `true_experts_per_token`: mean |S_T| over real tokens and layers; per type, the sum of |S_T|
    (`routing/true_slots/<type>`) and the token count (`routing/tokens/<type>`), always present
    so every rank logs the same keys even when a batch lacks a type.
    """
    per_token = (
        torch.stack(
            [true_experts_per_token(logits, num_experts, top_k) for logits in router_logits]
        )
        .float()
        .mean(dim=0)
    )
    real = attention_mask.reshape(-1).bool()
    types = token_types.reshape(-1)
    metrics = {"true_experts_per_token": per_token[real].mean().item()}
    for index, name in enumerate(TOKEN_TYPES):
        chosen = real & (types == index)
        metrics[f"routing/true_slots/{name}"] = per_token[chosen].sum().item()
        metrics[f"routing/tokens/{name}"] = int(chosen.sum())
    return metrics


def per_type_means(counts: dict[str, float]) -> dict[str, float]:
    """`true_experts/<type>` from routing_counts' sums (types with no tokens are left out)."""
    return {
        f"true_experts/{name}": counts[f"routing/true_slots/{name}"]
        / counts[f"routing/tokens/{name}"]
        for name in TOKEN_TYPES
        if counts.get(f"routing/tokens/{name}")
    }


def plot_routing(rows: list[dict], path: Path, title: str) -> None:
    """True experts per token (overall, per token type) and MoE FLOPs ratio over training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [row["step"] for row in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(steps, [row["true_experts_per_token"] for row in rows], "k-", lw=2, label="all")
    for name in TOKEN_TYPES:
        points = [(row["step"], per_type_means(row).get(f"true_experts/{name}")) for row in rows]
        points = [(step, value) for step, value in points if value is not None]
        if points:
            left.plot(*zip(*points), label=name, alpha=0.8)
    left.set(xlabel="step", ylabel="true experts per token", title="routing load")
    left.legend(fontsize=8)
    right.plot(steps, [row["moe_flops_ratio"] for row in rows], "C3-")
    right.axhline(1.0, color="gray", ls="--", lw=1, label="fixed top-k")
    right.set(xlabel="step", ylabel="MoE FLOPs / top-k FLOPs", title="MoE-layer FLOPs")
    right.legend(fontsize=8)
    for axis in (left, right):
        axis.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_pareto(points: list[dict], path: Path) -> None:
    """Held-out accuracy against MoE FLOPs ratio, one point per (m, k'); the frontier joined.

    Each point: {"label", "flops", "accuracy"}. A point is on the frontier when no other point
    has fewer (or equal) FLOPs and higher accuracy.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ordered = sorted(points, key=lambda p: (p["flops"], -p["accuracy"]))
    frontier, best = [], float("-inf")
    for point in ordered:
        if point["accuracy"] > best:
            frontier.append(point)
            best = point["accuracy"]
    fig, axis = plt.subplots(figsize=(6, 4.5))
    axis.scatter([p["flops"] for p in points], [p["accuracy"] for p in points], color="C0")
    for point in points:
        axis.annotate(point["label"], (point["flops"], point["accuracy"]), fontsize=8,
                      xytext=(4, 4), textcoords="offset points")  # fmt: skip
    axis.plot([p["flops"] for p in frontier], [p["accuracy"] for p in frontier], "C1--",
              label="Pareto frontier")  # fmt: skip
    axis.set(xlabel="MoE-layer FLOPs / fixed top-k FLOPs", ylabel="held-out accuracy",
             title="AdaMoE: accuracy vs MoE FLOPs")  # fmt: skip
    axis.grid(alpha=0.3)
    axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
