"""SpikeZIP-TF (arXiv 2406.03470) on handwritten digits: FP ReLU ViT -> QANN -> exact SNN.

    python -m jobs.spikezip --preset tiny [--set levels=8 ...]
    python -m jobs.sweep spikezip   # ready sweep over L
        [--grid levels=4,8,16 --metric accuracy_snn --mode max]            # the same, spelt out

Three stages, each resumable: (1) `prepare` trains the full-precision ReLU ViT teacher through
the runner (`FP_JOB`, cached by config under $KILN_CACHE, so runs that differ only in `levels`
share it) and stores its logits on the training images; (2) the main run trains the QANN from
the teacher's weights by quantisation-aware distillation; (3) `evaluate` converts the QANN to
the SNN and compares all three on the held-out digits (scikit-learn's bundled 8x8 scans, no
download). The SNN/QANN comparison runs in float64: the two summation orders (one sum in the
QANN, step by step in the SNN) round differently, and a quantiser flips only for an activation
that close to a rounding boundary, ~1e-16 in float64 but ~1e-7 in float32 (where one flip in
360 images was measured, BENCHMARKS.md). summary.json reports accuracy_fp, accuracy_qann,
accuracy_snn, agreement_snn_qann, max_abs_diff_snn_qann, the steps to silence and the spikes.

Training recipe against the paper's ImageNet one (the model math is in kiln/snn/spikezip.py):
the runner's AdamW (betas 0.9/0.95, no weight decay), warm-up + cosine schedule and gradient
clipping; no mixup, cutmix, random erasing, drop-path or layer decay (8x8 digits, minutes on a
CPU); pixels scaled to [-1, 1] as the paper's mean/std 0.5.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from sklearn.datasets import load_digits

from jobs.runner import Job, SweepSpec, assets_dir, cached_run, main
from kiln import snn
from kiln.config import JobConfig, RunnerConfig, Section

# The CPU schedule of both stages: batches of 2 x 32 images; the whole tiny run is ~3 min.
_CPU_SCHEDULE = {"micro_batch_size": 32, "lr": 3e-3, "warmup_steps": 20, "log_every": 50}


class DigitsConfig(Section):
    """scikit-learn's 1797 handwritten 8x8 digits, split once into train and test."""

    test_size: int = Field(360, ge=10, le=1000, description="Held-out test images.")
    split_seed: int = Field(0, description="Seed of the train/test permutation.")


class TeacherConfig(JobConfig):
    """The full-precision ReLU ViT that the QANN is distilled from (stage 1)."""

    data: DigitsConfig = Field(default_factory=DigitsConfig, description="Dataset split.")
    model: snn.ViTConfig = Field(default_factory=snn.ViTConfig, description="Architecture.")


class SpikeZipConfig(JobConfig):
    """SpikeZIP-TF: FP ReLU ViT -> QANN by distillation -> exactly equivalent SNN, on digits."""

    data: DigitsConfig = Field(default_factory=DigitsConfig, description="Dataset split.")
    model: snn.ViTConfig = Field(
        default_factory=snn.ViTConfig, description="Architecture of teacher, QANN and SNN."
    )
    teacher_runner: RunnerConfig = Field(
        default_factory=RunnerConfig,
        description="Runner settings of the full-precision teacher stage (`runner` is the QANN's).",
    )
    levels: int = Field(
        16,
        description="Quantisation level count L (even, >= 4): signed quantisers cover "
        "-L/2..L/2-1 steps, unsigned ones 0..L-1; more levels, more time steps to silence.",
    )
    temperature: float = Field(2.0, gt=0, description="Distillation temperature T.")
    calibration_images: int = Field(
        256, ge=1, description="Training images that set the initial quantiser steps."
    )
    max_snn_steps: int = Field(
        512, ge=1, description="Most SNN time steps at evaluation (stops earlier at silence)."
    )

    @field_validator("levels")
    @classmethod
    def _levels_valid(cls, levels: int) -> int:
        return snn.check_levels(levels)

    presets = {
        "tiny": {
            "teacher_runner": {**_CPU_SCHEDULE, "max_steps": 1000},
            "runner": {**_CPU_SCHEDULE, "max_steps": 600},
        },
    }


def teacher_config(config: SpikeZipConfig) -> TeacherConfig:
    return TeacherConfig(data=config.data, model=config.model, runner=config.teacher_runner)


def digits(data: DigitsConfig, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [N, 1, 8, 8] scaled to [-1, 1] (the paper's mean/std 0.5) and labels [N]."""
    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32)[:, None] / 16 * 2 - 1
    labels = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(data.split_seed))
    chosen = order[: data.test_size] if split == "test" else order[data.test_size :]
    return images[chosen], labels[chosen]


class Examples(torch.utils.data.Dataset):
    """Equal-length tensors indexed together: item i is {name: tensor[i]}."""

    def __init__(self, **tensors: torch.Tensor):
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: tensor[index] for name, tensor in self.tensors.items()}


def _batch_metrics(
    logits: torch.Tensor, batch: dict[str, torch.Tensor], model: snn.ViTConfig
) -> dict[str, float]:
    accuracy = (logits.argmax(-1) == batch["label"]).float().mean().item()
    return {"train_accuracy": accuracy, "tokens": len(logits) * (model.num_patches + 1)}


def export(model: snn.ViT, config, run_dir: Path, out_dir: Path) -> None:
    snn.save_pretrained(model, out_dir)


# Stage 1: the full-precision teacher


def _nothing_to_prepare(config: TeacherConfig, run_dir: Path) -> None:
    """The digits ship with scikit-learn; every worker loads them itself."""


def build_teacher(config: TeacherConfig, run_dir: Path) -> snn.ViT:
    return snn.ViT(config.model)


def teacher_dataset(config: TeacherConfig, run_dir: Path) -> Examples:
    images, labels = digits(config.data, "train")
    return Examples(image=images, label=labels)


def teacher_step(model, batch: dict[str, torch.Tensor], config: TeacherConfig):
    logits = model(batch["image"])
    return F.cross_entropy(logits, batch["label"]), _batch_metrics(logits, batch, config.model)


@torch.no_grad()
def evaluate_teacher(config: TeacherConfig, run_dir: Path) -> dict[str, float]:
    model = snn.load_pretrained(run_dir / "model", levels=None)
    images, labels = digits(config.data, "test")
    return {"accuracy": (model(images).argmax(-1) == labels).float().mean().item()}


FP_JOB = Job(
    name="spikezip_fp",
    config_cls=TeacherConfig,
    prepare=_nothing_to_prepare,
    build_model=build_teacher,
    build_dataset=teacher_dataset,
    step=teacher_step,
    export=export,
    evaluate=evaluate_teacher,
)

# Stage 2: the QANN, distilled from the teacher; stage 3 (SNN) in `evaluate`


def prepare(config: SpikeZipConfig, run_dir: Path) -> None:
    """Train (or find) the teacher; keep a copy of it and its logits on the training images."""
    assets = assets_dir(run_dir)
    if (assets / "teacher_logits.pt").is_file():
        return
    teacher_run = cached_run(FP_JOB, teacher_config(config))
    shutil.copytree(teacher_run / "model", assets / "teacher", dirs_exist_ok=True)
    teacher = snn.load_pretrained(assets / "teacher", levels=None)
    images, _ = digits(config.data, "train")
    partial = assets / "teacher_logits.pt.partial"
    with torch.no_grad():
        torch.save(teacher(images), partial)
    partial.replace(assets / "teacher_logits.pt")


def build_model(config: SpikeZipConfig, run_dir: Path) -> snn.ViT:
    """The QANN: the teacher's weights, quantiser steps set on a fixed calibration batch."""
    qann = snn.ViT(config.model, config.levels)
    teacher = snn.load_pretrained(assets_dir(run_dir) / "teacher", levels=None)
    qann.load_state_dict(teacher.state_dict(), strict=False)  # only the steps are new
    images, _ = digits(config.data, "train")
    snn.calibrate(qann, images[: config.calibration_images])
    return qann


def build_dataset(config: SpikeZipConfig, run_dir: Path) -> Examples:
    images, labels = digits(config.data, "train")
    teacher_logits = torch.load(assets_dir(run_dir) / "teacher_logits.pt")
    return Examples(image=images, label=labels, teacher_logits=teacher_logits)


def step(model, batch: dict[str, torch.Tensor], config: SpikeZipConfig):
    logits = model(batch["image"])
    loss = snn.distillation_loss(
        logits, batch["teacher_logits"], batch["label"], config.temperature
    )
    return loss, _batch_metrics(logits, batch, config.model)


@torch.no_grad()
def evaluate(config: SpikeZipConfig, run_dir: Path) -> dict[str, float]:
    images, labels = digits(config.data, "test")
    teacher = snn.load_pretrained(assets_dir(run_dir) / "teacher", levels=None)
    qann = snn.load_pretrained(run_dir / "model", levels=config.levels).double()
    qann_logits = qann(images.double())
    spiking = snn.convert(qann).run(images.double(), config.max_snn_steps)
    fp_pred, qann_pred = teacher(images).argmax(-1), qann_logits.argmax(-1)
    snn_pred = spiking.output.argmax(-1)
    count = len(labels)
    return {
        "levels": config.levels,
        "accuracy_fp": (fp_pred == labels).float().mean().item(),
        "accuracy_qann": (qann_pred == labels).float().mean().item(),
        "accuracy_snn": (snn_pred == labels).float().mean().item(),
        "agreement_snn_qann": (snn_pred == qann_pred).float().mean().item(),
        "max_abs_diff_snn_qann": (spiking.output - qann_logits).abs().max().item(),
        "snn_converged": spiking.converged,
        "steps_to_silence": spiking.steps,
        "steps_to_silence_mean": spiking.steps_per_sample.double().mean().item(),
        "spikes_per_image": sum(spiking.spikes_per_layer.values()) / count,
        **{f"spikes_per_image/{k}": v / count for k, v in spiking.spikes_per_layer.items()},
    }


JOB = Job(
    name="spikezip",
    config_cls=SpikeZipConfig,
    prepare=prepare,
    build_model=build_model,
    build_dataset=build_dataset,
    step=step,
    export=export,
    evaluate=evaluate,
    # The paper's knob: accuracy against time steps and spikes (the energy proxy) per level.
    sweep=SweepSpec(
        grid={"levels": [4, 8, 16]},
        metrics=("accuracy_snn", "steps_to_silence_mean", "spikes_per_image"),
        mode="max",
    ),
)

if __name__ == "__main__":
    main(JOB)
