"""The shapes world's measuring instrument for text-to-image models.

`evaluate(pipeline, prompts, instrument)` generates images for prompts written by the world's
captioner and reports what every diffusion method of kiln reports:

- concept accuracy: the fraction of images in which the detector finds every concept the
  prompt asks for (and the same per attribute);
- CLIP score: 100 · max(cos(image, prompt), 0) with the tiny CLIP, averaged (Hessel et al.,
  arXiv 2104.08718, with w = 100 as in torchmetrics);
- a Fréchet distance between Gaussians fitted to tiny-CLIP image features of the generated and
  of real world images (FID, Heusel et al., arXiv 1706.08500, with the tiny CLIP in place of
  Inception, which does not exist at 32 px):
      FD = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁^½ Σ₂ Σ₁^½)^½).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import AutoModelForImageClassification, CLIPModel, CLIPTokenizer

from kiln.diffusion.base import attribute_logits
from kiln.pixels import to_pixels
from kiln.worlds.shapes import ATTRIBUTES, CAPTIONED, parse_caption


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """FD between Gaussians fitted to two [N, D] feature sets (float64 throughout)."""
    a, b = features_a.double(), features_b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    # Tr((Σa^½ Σb Σa^½)^½) via eigenvalues of a symmetric PSD matrix (stable, no complex sqrtm).
    vals, vecs = torch.linalg.eigh(cov_a)
    root_a = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


def generate_images(
    pipeline,
    prompts: list[str],
    images_per_prompt: int = 1,
    steps: int = 25,
    guidance: float = 5.0,
    seed: int = 0,
    prompts_per_batch: int = 16,
    progress: bool = True,
) -> np.ndarray:
    """uint8 [len(prompts) * images_per_prompt, H, W, 3], prompt-major; deterministic in seed."""
    pipeline.set_progress_bar_config(disable=True)
    chunks = []
    batches = range(0, len(prompts), prompts_per_batch)
    for start in tqdm(batches, desc="generating", unit="batch", disable=not progress):
        images = pipeline(
            prompt=prompts[start : start + prompts_per_batch],
            num_images_per_prompt=images_per_prompt,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=torch.Generator().manual_seed(seed + start),
            output_type="np",
        ).images
        chunks.append((np.asarray(images) * 255).round().clip(0, 255).astype(np.uint8))
    return np.concatenate(chunks)


def save_grid(images: np.ndarray, columns: int, path: Path, scale: int = 4) -> None:
    """Tile uint8 [N, H, W, 3] images row by row, enlarged `scale`x (nearest), as a PNG."""
    rows = -(-len(images) // columns)
    height, width = images.shape[1:3]
    grid = np.zeros((rows * height, columns * width, 3), np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * height : (r + 1) * height, c * width : (c + 1) * width] = image
    picture = Image.fromarray(grid)
    picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST).save(path)


class Instrument:
    """Detector + tiny CLIP + real-image feature statistics: scores images against prompts."""

    def __init__(
        self,
        clip: CLIPModel | None = None,
        tokenizer: CLIPTokenizer | None = None,
        detector=None,
        reference_images: np.ndarray | None = None,
    ):
        self.clip = clip.eval() if clip is not None else None
        self.tokenizer = tokenizer
        self.detector = detector.eval() if detector is not None else None
        self.reference = (
            self.image_features(reference_images) if reference_images is not None else None
        )

    @classmethod
    def load(
        cls,
        clip_dir: Path | None,
        detector_dir: Path | None,
        reference_images: np.ndarray | None = None,
    ) -> Instrument:
        clip = CLIPModel.from_pretrained(clip_dir) if clip_dir else None
        tokenizer = CLIPTokenizer.from_pretrained(clip_dir) if clip_dir else None
        detector = (
            AutoModelForImageClassification.from_pretrained(detector_dir) if detector_dir else None
        )
        return cls(clip, tokenizer, detector, reference_images)

    def _need(self, part: str):
        if getattr(self, part) is None:
            raise ValueError(f"this Instrument was built without a {part}")
        return getattr(self, part)

    @torch.no_grad()
    def detect(self, images: np.ndarray) -> dict[str, list[str]]:
        """The detector's reading of each image: attribute -> predicted value per image."""
        detector = self._need("detector")
        logits = torch.cat([detector(pixel_values=x).logits for x in to_pixels(images).split(512)])
        return {
            name: [ATTRIBUTES[name][i] for i in block.argmax(1).tolist()]
            for name, block in attribute_logits(logits).items()
        }

    def concept_accuracy(self, images: np.ndarray, prompts: list[str]) -> dict[str, float]:
        """prompts[i] is the prompt of images[i]; every captioned concept must be detected."""
        asked = [parse_caption(prompt) for prompt in prompts]
        seen = self.detect(images)
        hits = {name: [seen[name][i] == a[name] for i, a in enumerate(asked)] for name in CAPTIONED}
        result = {f"concept_accuracy/{name}": float(np.mean(h)) for name, h in hits.items()}
        result["concept_accuracy"] = float(np.mean(np.all(list(hits.values()), axis=0)))
        return result

    @torch.no_grad()
    def image_features(self, images: np.ndarray) -> torch.Tensor:
        clip = self._need("clip")
        pixels = to_pixels(images).split(512)
        return torch.cat([clip.get_image_features(pixel_values=x).pooler_output for x in pixels])

    @torch.no_grad()
    def caption_scores(self, images: np.ndarray, captions: list[str]) -> torch.Tensor:
        """Cosine similarity [n_images, n_captions] in the tiny CLIP's joint space."""
        clip, tokenizer = self._need("clip"), self._need("tokenizer")
        tokens = tokenizer(captions, padding="max_length", truncation=True, return_tensors="pt")
        text = clip.get_text_features(**tokens).pooler_output
        image = self.image_features(images)
        return (
            torch.nn.functional.normalize(image, dim=-1)
            @ torch.nn.functional.normalize(text, dim=-1).T
        )

    def clip_score(self, images: np.ndarray, prompts: list[str]) -> float:
        unique = sorted(set(prompts))
        scores = self.caption_scores(images, unique)
        own = scores[torch.arange(len(prompts)), torch.tensor([unique.index(p) for p in prompts])]
        return float(100 * own.clamp(min=0).mean())

    def frechet_distance(self, images: np.ndarray) -> float:
        """FD of `images` to the reference (real) images, in tiny-CLIP feature space."""
        if self.reference is None:
            raise ValueError("this Instrument was built without reference_images")
        return frechet_distance(self.image_features(images), self.reference)

    def score(self, images: np.ndarray, prompts: list[str]) -> dict[str, float]:
        result = self.concept_accuracy(images, prompts)
        result["clip_score"] = self.clip_score(images, prompts)
        if self.reference is not None:
            result["frechet_distance"] = self.frechet_distance(images)
        return result


def evaluate(
    pipeline,
    prompts: list[str],
    instrument: Instrument,
    images_per_prompt: int = 4,
    steps: int = 25,
    guidance: float = 5.0,
    seed: int = 0,
) -> dict[str, float]:
    """Generate `images_per_prompt` images per prompt and score them (see the module doc)."""
    images = generate_images(pipeline, prompts, images_per_prompt, steps, guidance, seed)
    return instrument.score(images, [p for p in prompts for _ in range(images_per_prompt)])
