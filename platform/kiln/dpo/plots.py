"""Figures of the 3D-properties (arXiv 2406.07327) from a DPO run's metrics rows.

Rows are metrics.jsonl dicts; step 0 is the SFT model before any update. Keys read:
`probe/train_{chosen,rejected}_logp` and `probe/train_other_mass` (a fixed set of training
pairs), `probe/heldout_{correct,wrong}_logp` and `probe/heldout_other_mass` (held-out prompts
with a correct and a wrong response, never trained on), and the per-step batch metrics
`reward_chosen`, `reward_rejected`, `reward_accuracy`.
"""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(rows: list[dict], key: str, relative: bool = False) -> tuple[list, list]:
    points = [(r["step"], r[key]) for r in rows if key in r]
    if relative and points:
        start = points[0][1]
        points = [(s, v - start) for s, v in points]
    return [s for s, _ in points], [v for _, v in points]


def plot_3d_properties(rows: list[dict], path: str | Path, title: str) -> None:
    """Four panels: drastic drop, degradation, dispersion, mass off both responses."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    (drop, rewards), (dispersion, mass) = axes

    drop.plot(*_series(rows, "probe/train_chosen_logp", True), label="chosen  Δlog π⁺")
    drop.plot(*_series(rows, "probe/train_rejected_logp", True), label="rejected  Δlog π⁻")
    drop.set_title("Drastic drop (fixed training pairs)")
    drop.set_ylabel("change in sequence log-prob")

    rewards.plot(*_series(rows, "reward_chosen"), label="chosen reward r⁺")
    rewards.plot(*_series(rows, "reward_rejected"), label="rejected reward r⁻")
    accuracy = rewards.twinx()
    accuracy.plot(*_series(rows, "reward_accuracy"), color="grey", alpha=0.5, lw=1)
    accuracy.set_ylabel("reward accuracy (grey)")
    accuracy.set_ylim(0, 1.05)
    rewards.set_title("Degradation: the margin grows by pushing r⁻ down")
    rewards.set_ylabel("implicit reward (batch mean)")

    dispersion.plot(*_series(rows, "probe/heldout_correct_logp", True), label="held-out correct")
    dispersion.plot(*_series(rows, "probe/heldout_wrong_logp", True), label="held-out wrong")
    dispersion.set_title("Dispersion (held-out responses never trained on)")
    dispersion.set_ylabel("change in sequence log-prob")

    mass.plot(*_series(rows, "probe/train_other_mass"), label="training prompts: 1 − π⁺ − π⁻")
    mass.plot(*_series(rows, "probe/heldout_other_mass"), label="held-out: 1 − π(right) − π(wrong)")
    mass.set_title("Probability mass on neither response")
    mass.set_ylabel("probability")
    mass.set_ylim(bottom=0)

    for ax in axes.flat:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_variants(runs: dict[str, list[dict]], path: str | Path) -> None:
    """One line per run in three panels: Δlog π⁺, Δlog π⁻, Δlog π(held-out correct)."""
    plt = _pyplot()
    keys = {
        "probe/train_chosen_logp": "chosen Δlog π⁺ (training pairs)",
        "probe/train_rejected_logp": "rejected Δlog π⁻ (training pairs)",
        "probe/heldout_correct_logp": "held-out correct Δlog π",
    }
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4))
    for ax, (key, label) in zip(axes, keys.items()):
        for name, rows in runs.items():
            ax.plot(*_series(rows, key, True), label=name)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("change in sequence log-prob")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
