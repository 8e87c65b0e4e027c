"""Image classifiers behind one small protocol, so a serving app holds any of them.

A `Classifier` is loaded from a folder of fitted weights and maps a batch of images
[batch, channels, height, width] in [-1, 1] (kiln's convention, see `jobs/spikezip.py`) to
class probabilities plus what that model alone can say (`extras`: the SNN's time steps and
spike counts; the GP's uncertainty). `CLASSIFIERS` maps a config's `kind` to its loader.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, Protocol

import torch

from kiln import gp, snn
from kiln.pixels import from_pixels


class Classified(NamedTuple):
    probabilities: torch.Tensor  # [batch, classes]
    per_image: dict[str, list]  # one value per image, e.g. time steps until silence
    per_batch: dict[str, object]  # one value for the batch, e.g. spikes per layer


class Classifier(Protocol):
    input_shape: tuple[int, int, int]  # channels, height, width

    def classify(self, images: torch.Tensor) -> Classified: ...


class SNNClassifier:
    """SpikeZIP-TF: the QANN saved by `jobs.spikezip`, converted to its spiking network.

    Probabilities are the softmax of the time-summed output (equal to the QANN's logits once
    the network is silent); extras are the steps each image needed and the spikes emitted.
    """

    def __init__(self, folder: str | Path, levels: int, max_steps: int = 64):
        qann = snn.load_pretrained(folder, levels=levels)
        config = qann.config
        self.input_shape = (config.channels, config.image_size, config.image_size)
        self.network = snn.convert(qann)
        self.max_steps = max_steps

    def classify(self, images: torch.Tensor) -> Classified:
        run = self.network.run(images, self.max_steps)
        return Classified(
            probabilities=run.output.softmax(-1),
            per_image={"time_steps": run.steps_per_sample.tolist()},
            per_batch={
                "converged": run.converged,
                "spikes": sum(run.spikes_per_layer.values()),
                "spikes_per_layer": run.spikes_per_layer,
            },
        )


class GPClassifier:
    """The GP ensemble of pre-trained models (`kiln.gp.FewShotClassifier`, fitted and saved by
    `jobs.gp_fewshot`): RGB images at its CLIP's resolution. Extras: the latent posterior
    variance of each image (its uncertainty: large far from the few labelled shots) and the
    class names the probabilities refer to."""

    def __init__(self, folder: str | Path):
        self.model = gp.FewShotClassifier.load(Path(folder))
        size = self.model.extractor.image_size
        self.input_shape = (3, size, size)

    def classify(self, images: torch.Tensor) -> Classified:
        # Back to the uint8 [N, H, W, 3] the extractor takes (exact for 8-bit inputs).
        prediction = self.model.predict(from_pixels(images))
        return Classified(
            probabilities=prediction.probabilities,
            per_image={"variance": prediction.variance.tolist()},
            per_batch={"classes": self.model.extractor.class_names},
        )


CLASSIFIERS: dict[str, Callable[..., Classifier]] = {"snn": SNNClassifier, "gp": GPClassifier}
