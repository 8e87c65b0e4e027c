"""The 3D-properties on the embedded world: plain DPO against its fixes, one run each.

    python benchmarks/dpo_3d.py [--set key=value ...] [--output runs/bench/dpo_3d]

Runs `jobs.dpo --preset tiny` (2 Ray Train workers) for each variant from the same SFT model:
plain DPO on offline pairs, Flex-DPO (β⁻ < β⁺), DPO + λ·NLL, IPO, and plain DPO on on-policy
and mixed pairs. Prints a markdown table (the figures BENCHMARKS.md keeps) and writes
`variants.png` (Δlog π⁺, Δlog π⁻ and held-out Δlog π per variant) next to every run's own
`3d_properties.png`. `--set` overrides apply to every variant.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jobs.dpo import JOB
from jobs.runner import connect_ray, run
from kiln.config import load_config
from kiln.dpo.plots import plot_variants
from kiln.tracking import read_metrics

VARIANTS = {
    "DPO (offline)": [],
    "Flex-DPO β⁻=0.05": ["beta_rejected=0.05"],
    "DPO + NLL λ=1": ["nll_weight=1.0"],
    "IPO": ["loss_type=ipo"],
    "DPO (on-policy)": ["pairs=on_policy"],
    "DPO (mixed)": ["pairs=mixed"],
}
COLUMNS = {
    "accuracy_before": "acc. before",
    "accuracy_after": "acc. after",
    "chosen_logp_drop": "Δ log π⁺ (train, drop)",
    "rejected_logp_drop": "Δ log π⁻ (train, drop)",
    "heldout_correct_logp_drop": "held-out correct drop",
    "heldout_wrong_logp_drop": "held-out wrong drop",
    "train_other_mass_end": "mass off both (end)",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--output", default="runs/bench/dpo_3d")
    args = parser.parse_args()
    out = Path(args.output).resolve()
    connect_ray()
    summaries, histories = {}, {}
    for index, (name, overrides) in enumerate(VARIANTS.items()):
        config = load_config(JOB.config_cls, "tiny", None, [*overrides, *args.set])
        run_dir = out / f"variant_{index}"
        summaries[name] = run(JOB, config, run_dir)
        initial = json.loads((run_dir / "assets/data.json").read_text())["initial_probe"]
        histories[name] = [{"step": 0, **initial}, *read_metrics(run_dir)]
    plot_variants(histories, out / "variants.png")

    first = next(iter(summaries.values()))
    print(f"start: train mass off both responses {first['train_other_mass_start']:.3f}")
    print("| variant | " + " | ".join(COLUMNS.values()) + " |")
    print("| --- " * (len(COLUMNS) + 1) + "|")
    for name, summary in summaries.items():
        cells = [f"{summary[key]:.3f}" for key in COLUMNS]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(json.dumps({"output": str(out), "summaries": summaries}, indent=2, default=str))


if __name__ == "__main__":
    main()
