"""Frozen pre-trained models as feature extractors, CLIP zero-shot scores, and the image-level
classifier that saves and reloads (what a server hosts).

A model is any folder on disk, recognised by its config:
- a `CLIPModel` folder: the projected image embedding (`get_image_features`);
- a diffusers `AutoencoderKL` folder: the encoder's posterior mean, flattened (diffusers is
  imported only when such a folder is used);
- any other Hugging Face image model `AutoModel` loads (ResNet, ViT, DINO, ...; a
  `...ForImageClassification` folder gives its trunk): its pooled output, flattened.
Pixels: a folder with an image processor (`preprocessor_config.json`, what a real checkpoint
such as openai/clip-vit-base-patch32 or facebook/dinov2-small ships) gets its images through
`AutoImageProcessor` (its resize, crop and mean/std). A folder without one gets kiln's
convention, [N, 3, H, W] in [-1, 1] at the input resolution (`kiln.pixels.to_pixels`), which is
what kiln's own models were trained on. Input images are uint8 [N, S, S, 3] with S the CLIP's
`image_size`, the resolution its vision tower (or its processor) expects.
A timm folder (a config.json with `architecture`) goes through transformers' `TimmWrapperModel`,
which needs the `timm` package: kiln does not depend on it (timm needs torchvision, and the
package index has no torchvision build that imports with this CPU torch), so that path is
untested here, and without timm transformers says to install it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from transformers import AutoImageProcessor, AutoModel, CLIPModel, CLIPTokenizer

from kiln.gp.ensemble import GPEnsemble, Prediction, fit_gp
from kiln.pixels import from_pixels, remap_colours, to_pixels

BATCH = 256


def pixel_preprocessor(path: Path) -> Callable[[np.ndarray], torch.Tensor]:
    """uint8 images [N, H, W, 3] -> the pixel_values of the model saved in `path` (see the
    module docstring: its own image processor when the folder has one, else [-1, 1])."""
    if (Path(path) / "preprocessor_config.json").is_file():
        processor = AutoImageProcessor.from_pretrained(path)
        return lambda images: processor(list(images), return_tensors="pt").pixel_values
    return to_pixels


def load_feature_model(path: Path) -> Callable[[np.ndarray], torch.Tensor]:
    """uint8 images [N, H, W, 3] -> features [N, D] of the model saved in `path`."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise ValueError(f"model {str(path)!r}: expected a saved model folder with config.json")
    config = json.loads(config_file.read_text())
    pixels = pixel_preprocessor(path)
    if config.get("_class_name") == "AutoencoderKL":
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(path).eval()
        return lambda images: vae.encode(pixels(images)).latent_dist.mean.flatten(1)
    if config.get("model_type") == "clip":
        clip = CLIPModel.from_pretrained(path).eval()
        return lambda images: clip.get_image_features(pixel_values=pixels(images)).pooler_output
    model = AutoModel.from_pretrained(path).eval()
    return lambda images: model(pixel_values=pixels(images)).pooler_output.flatten(1)


class FeatureExtractor:
    """Images -> (features of every model, CLIP zero-shot cosine scores of every class).

    `class_prompts` maps each class name to the captions whose text embeddings, normalised and
    averaged, represent it (CLIP's prompt ensembling, arXiv 2103.00020).
    `prior_views` > 0 averages the zero-shot scores over the image as given and that many
    recolourings of it (`kiln.pixels.remap_colours`; view v is one fixed map, drawn from seed v,
    so an image's scores do not depend on the batch it comes in): test-time augmentation that
    marginalises colour out of the prior. It suits a CLIP trained on those recolourings (the
    shapes world's colour-invariant CLIP); 0 for a CLIP of natural photos, whose colours carry
    meaning and which never saw inverted or channel-swapped images.
    """

    def __init__(
        self,
        clip_dir: Path,
        models: dict[str, Path],
        class_prompts: dict[str, list[str]],
        prior_views: int = 0,
    ):
        if prior_views < 0:
            raise ValueError(f"prior_views={prior_views}: expected 0 or more recoloured views")
        self.clip_dir, self.model_dirs = Path(clip_dir), {k: Path(v) for k, v in models.items()}
        self.class_prompts, self.prior_views = class_prompts, prior_views
        self.clip = CLIPModel.from_pretrained(clip_dir).eval()
        self.image_size = self.clip.config.vision_config.image_size
        self.logit_scale = self.clip.logit_scale.exp().item()
        self.models = {name: load_feature_model(path) for name, path in self.model_dirs.items()}
        self.clip_pixels = pixel_preprocessor(clip_dir)
        tokenizer = CLIPTokenizer.from_pretrained(clip_dir)
        with torch.no_grad():
            heads = []
            for name, prompts in class_prompts.items():
                if not prompts:
                    raise ValueError(f"class_prompts[{name!r}]: expected at least one prompt")
                tokens = tokenizer(
                    prompts, padding="max_length", truncation=True, return_tensors="pt"
                )
                text = self.clip.get_text_features(**tokens).pooler_output
                heads.append(torch.nn.functional.normalize(text, dim=-1).mean(0))
            self.class_embeddings = torch.nn.functional.normalize(torch.stack(heads), dim=-1)

    @property
    def class_names(self) -> list[str]:
        return list(self.class_prompts)

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        size, images = self.image_size, np.asarray(images)
        if images.shape[1:] != (size, size, 3) or images.dtype != np.uint8:
            raise ValueError(
                f"images: expected uint8 [N, {size}, {size}, 3] (the CLIP's image_size), got "
                f"{tuple(images.shape)} {images.dtype}"
            )
        chunks = [images[start : start + BATCH] for start in range(0, len(images), BATCH)]
        features = {name: torch.cat([f(x) for x in chunks]) for name, f in self.models.items()}
        zero_shot = []
        for chunk in chunks:
            pixels, views = to_pixels(chunk), [chunk]
            for seed in range(self.prior_views):
                colour_map = torch.Generator().manual_seed(seed)
                views.append(from_pixels(remap_colours(pixels, colour_map, shared=True)))
            scores = []
            for view in views:
                embeddings = self.clip.get_image_features(pixel_values=self.clip_pixels(view))
                normalised = torch.nn.functional.normalize(embeddings.pooler_output, dim=-1)
                scores.append(normalised @ self.class_embeddings.T)
            zero_shot.append(torch.stack(scores).mean(0))
        return features, torch.cat(zero_shot)


class FewShotClassifier:
    """A fitted GP ensemble plus the models it reads: images in, `Prediction` out."""

    def __init__(self, extractor: FeatureExtractor, gp: GPEnsemble):
        self.extractor, self.gp = extractor, gp.eval()

    @classmethod
    def fit(
        cls, extractor: FeatureExtractor, images: np.ndarray, labels: torch.Tensor, **fit_options
    ) -> FewShotClassifier:
        """labels: class indices into `extractor.class_names`, at least one image per class."""
        features, zero_shot = extractor(images)
        gp = fit_gp(features, zero_shot, labels, extractor.class_names, **fit_options)
        return cls(extractor, gp)

    def predict(self, images: np.ndarray) -> Prediction:
        features, zero_shot = self.extractor(images)
        return self.gp.predict(features, zero_shot)

    def save(self, folder: Path) -> None:
        """The GP (`gp.safetensors`, `gp.json`) and `classifier.json` (models, class prompts)."""
        self.gp.save(folder)
        meta = {
            "clip": str(self.extractor.clip_dir.resolve()),
            "models": {k: str(v.resolve()) for k, v in self.extractor.model_dirs.items()},
            "class_prompts": self.extractor.class_prompts,
            "prior_views": self.extractor.prior_views,
        }
        (folder / "classifier.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, folder: Path) -> FewShotClassifier:
        meta = json.loads((Path(folder) / "classifier.json").read_text())
        extractor = FeatureExtractor(
            meta["clip"], meta["models"], meta["class_prompts"], meta.get("prior_views", 0)
        )
        return cls(extractor, GPEnsemble.load(Path(folder)))
