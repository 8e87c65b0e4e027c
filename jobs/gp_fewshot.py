"""Low-shot shape classification on the shapes world: the GP ensemble (arXiv 2404.00312) against
zero-shot CLIP, a linear probe, Tip-Adapter, kNN, a zero-mean GP, single-model GPs and the
ensemble without its leave-one-out temperature (`gp_ensemble_untempered`, τ = 1).

    python -m jobs.gp_fewshot --preset tiny [--set base_run=/path/to/pretrain_diffusion/run]
        [--set shots=[1,4] --set seeds=2] [--output runs/gp_fewshot]

Not a Ray Train job: every fit is an exact GP on at most 16 shots x 6 classes, on features of
frozen models computed once on the driver. The classes are the world's `shape` attribute (five
shapes and the face, 6 classes; the world's container scenes count as the shape they hold).
Shots are drawn from `pool_size` training-split images, nested across shot counts (seed s, k
shots = the first k of a per-class permutation); every method sees the same shots. Test images
are the world's test split, and the "shifted" split is the same scenes drawn with
`shifted_palette` (colours and backgrounds drawn in no training image; the invariant
detector's random recolouring of its training images is not aimed at them, though it spans
colours like them, as colour augmentation does). Zero-shot prompts for a
class (`prompts`), embedded by the CLIP text tower and averaged: by default its colour-free
captions ("one star", "two stars", "three stars", "a star in a box", "a star in a cup"; "a
face"), which the default prior, the colour-invariant CLIP, was trained on; with `captions`, the
world's captions of one object of that shape over every colour and background (24 per class),
for a CLIP trained on those alone. Chosen on the validation split (512 images and their shifted
copy; zero-shot accuracy): the base's plain CLIP scores 0.367 / 0.281 with colour-free prompts
and 0.479 / 0.256 with captions; a first colour-invariant CLIP 0.436 / 0.502 and 0.320 / 0.334;
the landed one ties at 0.555 / 0.557 (BENCHMARKS.md, GP section).
The zero-shot scores (the prior, zero-shot CLIP and Tip-Adapter read them) are averaged over the
image and `prior_views` fixed recolourings of it (`kiln.pixels.remap_colours`, the augmentation
the colour-invariant CLIP trained on). Chosen on the validation split (1024 images and their
shifted copy; zero-shot accuracy): 0.556 / 0.537 with no views, 0.558 / 0.553 with 4, 0.556 /
0.548 with 8 and 0.555 / 0.546 with 16: 4, the best of them on both splits and the cheapest
(the three are within noise of one another).

The run directory gets:

    summary.json           rows {method, shots, split, accuracy, ece, nll}: means over seeds
                           (plus the GP ensemble's mean kernel weights per shot count, and
                           each method's mean drop from the test to the shifted split with
                           its standard error over test images)
    results.md             the same table, accuracy ± std over seeds, and the accuracy drop
                           from the test to the shifted split (mean ± standard error, and
                           paired against the GP ensemble)
    accuracy_vs_shots.png  one panel per split
    reliability.png        per method, test split, pooled over seeds and shot counts
    classifier/            the GP ensemble fitted at the largest shot count (seed 0):
                           `kiln.gp.FewShotClassifier.load(path)` serves it
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Literal, get_args

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from pydantic import Field, field_validator, model_validator
from tqdm.auto import tqdm

from jobs.runner import check_config, cli
from kiln.config import ConfigError, JobConfig
from kiln.gp import FeatureExtractor, FewShotClassifier, GPEnsemble, fit_gp
from kiln.gp import baselines as bl
from kiln.worlds.shapes import (
    ATTRIBUTES,
    BACKGROUNDS,
    COLOURS,
    CONTAINERS,
    ShapesWorld,
    ShapesWorldConfig,
    colour_free_caption,
)
from kiln.worlds.shapes import caption as world_caption

ATTRIBUTE = "shape"
PromptKind = Literal["colour_free", "captions"]
# Unseen hues, each far from its default and readable on every shifted background.
SHIFTED_PALETTE = {
    "black": (20, 30, 90),
    "white": (250, 200, 215),
    "gray": (0, 128, 128),
    "brown": (100, 110, 30),
    "red": (160, 20, 60),
    "green": (120, 230, 60),
    "blue": (120, 160, 255),
    "yellow": (200, 200, 140),
    "purple": (170, 90, 250),
    "orange": (150, 80, 20),
}


class GPFewShotConfig(JobConfig):
    """Low-shot shape classification: the GP ensemble of pre-trained models vs baselines.

    Runs on the driver: the inherited `runner` section is not used.
    """

    base_run: Path | None = Field(
        None,
        description="Run directory of jobs.pretrain_diffusion (the `models`); default: the "
        "cached `tiny` base.",
    )
    models: dict[str, str] = Field(
        {
            "clip": "invariant_clip/model",
            "vae": "vae/model",
            "detector": "detector/model",
            "invariant_detector": "invariant_detector/model",
        },
        min_length=1,
        description="Kernel name -> model folder (relative to base_run, or absolute): a "
        "CLIPModel, a diffusers AutoencoderKL or any Hugging Face image model. 'clip' is also "
        "the prior (its zero-shot logits) and Tip-Adapter's model; by default the base's "
        "colour-invariant CLIP.",
    )
    world: ShapesWorldConfig = Field(
        default_factory=ShapesWorldConfig, description="The world the images come from."
    )
    shots: list[int] = Field([1, 2, 4, 8, 16], min_length=1, description="Shots per class.")
    seeds: int = Field(5, ge=1, description="Independent draws of the shots per shot count.")
    pool_size: int = Field(2000, ge=1, description="Training-split images the shots come from.")
    test_size: int = Field(
        2048,
        ge=2,
        description="Test-split images (each also shifted; at least 2, for the drop's standard "
        "error). The drop to the shifted split is a difference of two accuracies: at 512 "
        "images its standard error (0.004-0.014 by method) was as large as the gaps between "
        "methods.",
    )
    shifted_palette: dict[str, tuple[int, int, int]] = Field(
        SHIFTED_PALETTE, description="RGB per colour/background name for the shifted split."
    )
    prompts: PromptKind = Field(
        "colour_free",
        description="Zero-shot prompts per class: colour-free captions ('two stars', 'a star in "
        "a cup'; what the colour-invariant CLIP learnt) or full captions over every colour and "
        "background (for a CLIP trained on captions alone, e.g. the base's clip/model).",
    )
    prior_views: int = Field(
        4,
        ge=0,
        description="Recoloured views of each image (kiln.pixels.remap_colours) the zero-shot "
        "scores are averaged over, with the image as drawn: the prior, zero-shot and "
        "Tip-Adapter read them. For a CLIP trained on those recolourings (the default); 0 for "
        "a CLIP of natural photos.",
    )
    gp_iterations: int = Field(100, ge=1, description="L-BFGS iterations of each GP fit.")
    probe_models: list[str] | None = Field(
        None,
        description="Models whose features the linear probe and kNN read (default: all of "
        "`models`, the GP ensemble's inputs).",
    )

    presets = {"tiny": {}}

    @field_validator("shots")
    @classmethod
    def _positive(cls, shots: list[int]) -> list[int]:
        if min(shots) < 1:
            raise ValueError(f"expected positive shot counts, got {shots}")
        return sorted(set(shots))

    @model_validator(mode="after")
    def _known_models(self) -> GPFewShotConfig:
        if "clip" not in self.models:
            raise ValueError(
                "models: expected a 'clip' entry (the prior; Tip-Adapter caches its features)"
            )
        unknown = set(self.probe_models or []) - set(self.models)
        if unknown or self.probe_models == []:
            raise ValueError(
                f"probe_models={self.probe_models}: expected names from {list(self.models)}"
            )
        return self


def class_prompts(kind: PromptKind = "colour_free") -> dict[str, list[str]]:
    """Per shape, `colour_free`: its colour-free captions (counts 1-3 and each container; the
    face has one); `captions`: one object of that shape over every colour and background."""
    if kind not in get_args(PromptKind):
        raise ValueError(f"prompts={kind!r}: expected one of {list(get_args(PromptKind))}")
    prompts = {}
    for shape in ATTRIBUTES[ATTRIBUTE]:
        scene = {"background": "black", "shape": shape, "colour": "red", "count": "1",
                 "container": "none", "container_colour": "none"}  # fmt: skip
        if kind == "captions":
            prompts[shape] = [
                world_caption(scene | {"background": background, "colour": colour})
                for background in BACKGROUNDS
                for colour in COLOURS
            ]
        elif shape == "face":
            prompts[shape] = [colour_free_caption(scene)]
        else:
            counts = [scene | {"count": count} for count in ATTRIBUTES["count"]]
            held = [scene | {"container": c, "container_colour": "red"} for c in CONTAINERS]
            prompts[shape] = [colour_free_caption(s) for s in counts + held]
    return prompts


def model_folders(config: GPFewShotConfig, base_run: Path) -> dict[str, Path]:
    folders = {name: base_run / path for name, path in config.models.items()}
    for name, folder in folders.items():
        if not (folder / "config.json").is_file():
            hint = (
                " (a base from before the invariant_clip stage: train that stage, or use its "
                "CLIP with --set models.clip=clip/model --set prompts=captions)"
                if name == "clip"
                else ""
            )
            raise ConfigError(
                f"models.{name}: expected a saved model folder at {str(folder)!r}{hint}"
            )
    return folders


def world_splits(config: GPFewShotConfig) -> dict[str, tuple[np.ndarray, torch.Tensor]]:
    """pool / test / shifted: images uint8 [N, H, W, 3] and shape labels [N]."""
    world = ShapesWorld(config.world)
    shifted = ShapesWorld(config.world.model_copy(update={"palette": config.shifted_palette}))
    pool = world.scenes("train", config.pool_size)
    test = world.scenes("test", config.test_size)
    values = ATTRIBUTES[ATTRIBUTE]

    def labels(scenes) -> torch.Tensor:
        return torch.tensor([values.index(s.attributes[ATTRIBUTE]) for s in scenes])

    return {
        "pool": (world.images(pool), labels(pool)),
        "test": (world.images(test), labels(test)),
        "shifted": (shifted.images(test), labels(test)),
    }


def draw_shots(labels: torch.Tensor, shots: list[int], seed: int) -> dict[int, torch.Tensor]:
    """Nested few-shot index sets: the first k of each class's seeded permutation."""
    generator = torch.Generator().manual_seed(seed)
    per_class = []
    for c in range(len(ATTRIBUTES[ATTRIBUTE])):
        members = (labels == c).nonzero().flatten()
        if len(members) < max(shots):
            raise ConfigError(
                f"pool_size={len(labels)}: only {len(members)} images of "
                f"{ATTRIBUTES[ATTRIBUTE][c]!r}, fewer than shots={max(shots)}; raise pool_size"
            )
        per_class.append(members[torch.randperm(len(members), generator=generator)])
    return {k: torch.cat([members[:k] for members in per_class]) for k in shots}


def _subset(features: dict[str, torch.Tensor], names) -> dict[str, torch.Tensor]:
    return {name: features[name] for name in names}


def evaluate_methods(
    encoded: dict,
    labels: torch.Tensor,
    chosen: torch.Tensor,
    shots: int,
    config: GPFewShotConfig,
    extractor: FeatureExtractor,
) -> tuple[dict[str, dict[str, torch.Tensor]], GPEnsemble]:
    """Every method fitted on the `chosen` pool images: probabilities per method and split."""
    classes = extractor.class_names
    pool_features, pool_scores = encoded["pool"]
    train = {name: block[chosen] for name, block in pool_features.items()}
    train_scores, train_labels = pool_scores[chosen], labels[chosen]
    gps = {"gp_ensemble": (list(train), False), "gp_zero_mean": (list(train), True)}
    gps |= {f"gp_only_{name}": ([name], False) for name in train}
    fitted = {
        method: fit_gp(_subset(train, names), train_scores, train_labels, classes, zero_mean,
                       config.gp_iterations)
        for method, (names, zero_mean) in gps.items()
    }  # fmt: skip
    probed = config.probe_models or list(train)
    train_flat = bl.concatenated(_subset(train, probed))
    results = {}
    for split in ("test", "shifted"):
        features, scores = encoded[split]
        flat = bl.concatenated(_subset(features, probed))
        results[split] = {
            "zero_shot": bl.zero_shot(scores, extractor.logit_scale),
            "linear_probe": bl.linear_probe(train_flat, train_labels, flat, len(classes)),
            "tip_adapter": bl.tip_adapter(
                train["clip"], train_labels, features["clip"], scores, extractor.logit_scale
            ),
            "knn": bl.knn(train_flat, train_labels, flat, len(classes), k=shots),
        }
        for method, (names, _) in gps.items():
            prediction = fitted[method].predict(_subset(features, names), scores)
            results[split][method] = prediction.probabilities
        # The same fit with τ = 1, so the table shows what the leave-one-out temperature buys.
        untempered = fitted["gp_ensemble"].predict(features, scores, temperature=1.0)
        results[split]["gp_ensemble_untempered"] = untempered.probabilities
    return results, fitted["gp_ensemble"]


def plot_accuracy(rows: list[dict], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5), sharey=True)
    others = [m for m in dict.fromkeys(row["method"] for row in rows) if m != "gp_ensemble"]
    # More methods than colours: the second ten are dashed; the ensemble is black, on top.
    styles = {
        m: {"color": f"C{i % 10}", "ls": "-" if i < 10 else "--"} for i, m in enumerate(others)
    }
    styles["gp_ensemble"] = {"color": "black", "linewidth": 2.5, "zorder": 3}
    for ax, split in zip(axes, ("test", "shifted")):
        for method, style in styles.items():
            mine = [r for r in rows if r["method"] == method and r["split"] == split]
            ax.plot([r["shots"] for r in mine], [r["accuracy"] for r in mine], marker="o",
                    label=method, **{"linewidth": 1.2} | style)  # fmt: skip
        ax.set(xscale="log", xlabel="shots per class", title=f"{split} split")
        shots = sorted({r["shots"] for r in rows})
        ax.set_xticks(shots, [str(k) for k in shots])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (mean over seeds)")
    axes[1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_reliability(pooled: dict[str, tuple[torch.Tensor, torch.Tensor]], path: Path) -> None:
    fig, axes = plt.subplots(2, (len(pooled) + 1) // 2, figsize=(16, 7), sharex=True, sharey=True)
    centres = (np.arange(bl.ECE_BINS) + 0.5) / bl.ECE_BINS
    for ax, (method, (probabilities, labels)) in zip(axes.flat, pooled.items()):
        bins = bl.calibration_bins(probabilities, labels)
        ece = bl.scores(probabilities, labels)["ece"]
        ax.bar(centres, np.nan_to_num(bins["accuracy"]), width=1 / bl.ECE_BINS, alpha=0.7,
               edgecolor="k", label="accuracy")  # fmt: skip
        ax.plot([0, 1], [0, 1], "r--", label="perfect calibration")
        ax.set_title(f"{method}  ECE {ece:.3f}", fontsize=9)
    for ax in axes.flat[len(pooled) :]:
        ax.axis("off")
    axes[0, 0].legend(fontsize=7)
    fig.supxlabel("confidence (top class)")
    fig.supylabel("accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def standard_error(per_image: torch.Tensor) -> float:
    return (per_image.std() / len(per_image) ** 0.5).item()


def write_results(rows: list[dict], spread: dict, mean_drop: dict, path: Path) -> None:
    shots = sorted({r["shots"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    table = {(r["method"], r["shots"], r["split"]): r for r in rows}
    lines = ["# Low-shot shape classification (mean over seeds)", ""]
    for split in ("test", "shifted"):
        for metric in ("accuracy", "ece", "nll"):
            lines += [f"## {metric}, {split} split", ""]
            lines += ["| method | " + " | ".join(f"{k} shots" for k in shots) + " |"]
            lines += ["| --- |" + " --- |" * len(shots)]
            for m in methods:
                cells = []
                for k in shots:
                    cell = f"{table[m, k, split][metric]:.3f}"
                    if metric == "accuracy":
                        cell += f" ± {spread[m, k, split]:.3f}"
                    cells.append(cell)
                lines += [f"| {m} | " + " | ".join(cells) + " |"]
            lines += [""]
    lines += ["## accuracy drop, test -> shifted", ""]
    lines += ["The mean's ± is its standard error over test images (each image's drop averaged "
              "over seeds and shot counts); the last column is the method's mean drop minus "
              "the GP ensemble's, ± the standard error of that paired difference.", ""]  # fmt: skip
    lines += ["| method | " + " | ".join(f"{k} shots" for k in shots) + " | mean | - gp_ensemble |"]
    lines += ["| --- |" + " --- |" * (len(shots) + 2)]
    for m in methods:
        drops = [
            table[m, k, "test"]["accuracy"] - table[m, k, "shifted"]["accuracy"] for k in shots
        ]
        drop = mean_drop[m]
        mean = f"{drop['mean']:.3f} ± {drop['stderr']:.3f}"
        gap = f"{drop['minus_gp_ensemble']:.3f} ± {drop['minus_gp_ensemble_stderr']:.3f}"
        lines += [f"| {m} | " + " | ".join(f"{d:.3f}" for d in drops) + f" | {mean} | {gap} |"]
    path.write_text("\n".join(lines) + "\n")


def train(config: GPFewShotConfig, run_dir: str | Path) -> dict:
    started = time.perf_counter()
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    check_config(config, run_dir)
    if config.base_run is None:
        from jobs.pretrain_diffusion import pretrained_diffusion

        base_run = pretrained_diffusion("tiny")
    else:
        base_run = config.base_run
    model_dirs = model_folders(config, base_run)
    extractor = FeatureExtractor(
        model_dirs["clip"], model_dirs, class_prompts(config.prompts), config.prior_views
    )
    data = world_splits(config)
    encoded = {split: extractor(images) for split, (images, _) in data.items()}
    pool_labels = data["pool"][1]
    per_seed = defaultdict(list)  # (method, shots, split) -> one score dict per seed
    pooled = defaultdict(list)  # method -> test-split (probabilities, labels) over all runs
    weights = defaultdict(list)  # shots -> GP ensemble kernel weights per seed
    drops = defaultdict(list)  # method -> per-image (test hit - shifted hit) per run
    progress = tqdm(total=config.seeds * len(config.shots), desc="seeds x shots", unit="fit")
    for seed in range(config.seeds):
        for shots, chosen in draw_shots(pool_labels, config.shots, seed).items():
            results, ensemble = evaluate_methods(
                encoded, pool_labels, chosen, shots, config, extractor
            )
            weights[shots].append(ensemble.kernel_weights)
            for split, by_method in results.items():
                for method, probabilities in by_method.items():
                    labels = data[split][1]
                    per_seed[method, shots, split].append(bl.scores(probabilities, labels))
                    if split == "test":
                        pooled[method].append((probabilities, labels))
            for method in results["test"]:
                test, shifted = (
                    (results[split][method].argmax(1) == data[split][1]).double()
                    for split in ("test", "shifted")
                )
                drops[method].append(test - shifted)
            if seed == 0 and shots == max(config.shots):
                FewShotClassifier(extractor, ensemble).save(run_dir / "classifier")
            progress.update()
    progress.close()
    rows, spread = [], {}
    for (method, shots, split), runs in per_seed.items():
        mean = {m: float(np.mean([r[m] for r in runs])) for m in ("accuracy", "ece", "nll")}
        rows.append({"method": method, "shots": shots, "split": split, **mean})
        spread[method, shots, split] = float(np.std([r["accuracy"] for r in runs]))
    rows.sort(key=lambda r: (r["split"], r["method"], r["shots"]))
    # The test images are the sampling unit: they are shared by every seed and shot count, and
    # by every method, so a method's gap to the GP ensemble is a paired difference per image.
    per_image = {m: torch.stack(d).mean(0) for m, d in drops.items()}
    mean_drop = {
        m: {"mean": d.mean().item(), "stderr": standard_error(d),
            "minus_gp_ensemble": (d - per_image["gp_ensemble"]).mean().item(),
            "minus_gp_ensemble_stderr": standard_error(d - per_image["gp_ensemble"])}
        for m, d in per_image.items()
    }  # fmt: skip
    write_results(rows, spread, mean_drop, run_dir / "results.md")
    plot_accuracy(rows, run_dir / "accuracy_vs_shots.png")
    plot_reliability(
        {m: (torch.cat([p for p, _ in runs]), torch.cat([y for _, y in runs]))
         for m, runs in pooled.items()},
        run_dir / "reliability.png",
    )  # fmt: skip
    summary = {
        "rows": rows,
        "classes": extractor.class_names,
        "kernel_weights": {
            k: {name: float(np.mean([w[name] for w in ws])) for name in ws[0]}
            for k, ws in weights.items()
        },
        "mean_drop": mean_drop,
        "base_run": str(base_run),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"[gp_fewshot] wrote {run_dir / 'results.md'}", file=sys.stderr)
    return summary


if __name__ == "__main__":
    torch.set_num_threads(1)  # matrices of at most ~100 x 100: extra threads only contend
    cli("gp_fewshot", GPFewShotConfig, train)
