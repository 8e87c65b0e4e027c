"""Pretrain the diffusion base on the shapes world: CLIP, VAE, two detectors, a colour-invariant
CLIP, then the UNet.

    python -m jobs.pretrain_diffusion --preset tiny [--set schedules.unet.steps=4000 ...]
        [--output runs/diffusion]
    python -m jobs.pretrain_diffusion --preset tiny \
        --set 'stages=[vae,detector,invariant_detector,invariant_clip]'
        # the models the GP ensemble reads (not the CLIP, nor the UNet, the longest stage)

Each stage is its own run of the shared runner (Ray Train + DeepSpeed, resumable) in a
sub-folder of the run directory; a re-run skips finished stages and resumes an interrupted one.
The UNet stage encodes the images with the trained VAE and the captions with the trained CLIP
text encoder once, on the driver (both stay frozen, as in Stable Diffusion). The math is in
`kiln.diffusion.base`. The run directory ends up with:

    pipeline/    StableDiffusionPipeline.from_pretrained(...) loads it, no kiln import needed
    clip/model   CLIPModel + CLIPTokenizer (CLIP score, zero-shot classification)
    detector/model  ResNetForImageClassification, labels `attribute=value` (the ruler)
    invariant_detector/model  the same class over the colour-free attributes, trained on
                 randomly recoloured images (a palette-free feature extractor; the GP reads it)
    invariant_clip/model  a CLIPModel (patch 2) trained with half of each batch recoloured at
                 random and captioned without colours ("two stars", "a ring in a cup"): the GP
                 ensemble's prior and CLIP kernel, robust to the palette as web-scale CLIPs are
    samples.png  a grid: held-out prompts across concepts (rows, listed in samples.txt) x seeds
    summary.json per-stage summaries and the evaluation of the pipeline on held-out prompts
                 (detector concept accuracy, CLIP score, Fréchet distance) at each guidance,
                 with real images and chance as references
"""

from __future__ import annotations

import functools
import importlib
import json
import random
import sys
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from pydantic import Field, field_validator
from transformers import AutoModelForImageClassification, CLIPTextModel, CLIPTokenizer

from jobs.runner import Job, assets_dir, cached, check_config, cli, run
from kiln.config import JobConfig, Section, load_config
from kiln.diffusion import base
from kiln.diffusion.evaluate import Instrument, generate_images, save_grid
from kiln.pixels import from_pixels, remap_colours, to_pixels
from kiln.worlds.shapes import (
    ATTRIBUTES,
    Scene,
    ShapesWorld,
    ShapesWorldConfig,
    colour_free_caption,
)

STAGES = ("clip", "vae", "detector", "invariant_detector", "invariant_clip", "unet")
# Half of each invariant-CLIP batch is recoloured: the other half keeps the colour words' meaning.
RECOLOURED_FRACTION = 0.5


class Schedule(Section):
    """How long and how fast one stage trains."""

    steps: int = Field(ge=1, description="Optimizer steps.")
    lr: float = Field(gt=0, description="Peak learning rate (AdamW, warm-up then cosine).")
    batch_size: int = Field(ge=1, description="Images per worker per step.")


class Schedules(Section):
    """One schedule per stage."""

    clip: Schedule = Field(Schedule(steps=600, lr=2e-3, batch_size=64), description="CLIP.")
    vae: Schedule = Field(Schedule(steps=600, lr=2e-3, batch_size=32), description="VAE.")
    detector: Schedule = Field(
        Schedule(steps=1500, lr=2e-3, batch_size=64), description="Concept detector."
    )
    invariant_detector: Schedule = Field(
        Schedule(steps=1500, lr=2e-3, batch_size=64), description="Colour-invariant detector."
    )
    invariant_clip: Schedule = Field(
        Schedule(steps=3000, lr=2e-3, batch_size=32),
        description="Colour-invariant CLIP (patch 2 learns shape slowly: 5x the CLIP's steps).",
    )
    unet: Schedule = Field(Schedule(steps=3600, lr=1e-3, batch_size=32), description="UNet.")


class Evaluation(Section):
    """How the finished pipeline is measured on held-out prompts."""

    prompts: int = Field(
        64, ge=1, description="Held-out (test-split) prompts evaluated (all when fewer)."
    )
    images_per_prompt: int = Field(4, ge=1, description="Images generated per prompt.")
    steps: int = Field(25, ge=1, description="DDIM sampling steps.")
    guidance: list[float] = Field(
        [1.0, 5.0], min_length=1, description="Classifier-free guidance scales to compare."
    )


class PretrainDiffusionConfig(JobConfig):
    """Train the shapes-world diffusion base: CLIP, VAE, the detectors, the colour-invariant CLIP
    and the latent UNet."""

    world: ShapesWorldConfig = Field(default_factory=ShapesWorldConfig, description="World.")
    clip: base.ClipArch = Field(default_factory=base.ClipArch, description="Tiny CLIP.")
    vae: base.VaeArch = Field(default_factory=base.VaeArch, description="Tiny AutoencoderKL.")
    unet: base.UNetArch = Field(default_factory=base.UNetArch, description="Tiny UNet.")
    detector: base.DetectorArch = Field(
        default_factory=base.DetectorArch,
        description="Concept detector (the colour-invariant detector has the same architecture).",
    )
    invariant_clip_patch_size: int = Field(
        2,
        ge=1,
        description="Vision patch size of the colour-invariant CLIP (otherwise the CLIP's "
        "architecture): 4-pixel patches left shape unlearnt in its budget.",
    )
    schedules: Schedules = Field(default_factory=Schedules, description="Per-stage schedules.")
    stages: list[
        Literal["clip", "vae", "detector", "invariant_detector", "invariant_clip", "unet"]
    ] = Field(
        list(STAGES),
        min_length=1,
        description="Stages to train. 'unet' needs 'clip' and 'vae'; without it no pipeline is "
        "assembled or evaluated (the GP ensemble reads every stage but the CLIP and the "
        "UNet).",
    )
    evaluation: Evaluation = Field(default_factory=Evaluation, description="Final evaluation.")

    @field_validator("stages")
    @classmethod
    def _trainable(cls, stages: list[str]) -> list[str]:
        if "unet" in stages and not {"clip", "vae"} <= set(stages):
            raise ValueError(f"stages={stages}: 'unet' trains on the clip and vae stages' models")
        return [stage for stage in STAGES if stage in stages]  # training order, no repeats

    presets = {
        # The CPU base every diffusion method starts from (trained once, then cached).
        "tiny": {"runner": {"warmup_steps": 50, "log_every": 50, "checkpoint_every": 500}},
    }


def _stage_config(config: PretrainDiffusionConfig, stage: str) -> PretrainDiffusionConfig:
    schedule = getattr(config.schedules, stage)
    runner = config.runner.model_copy(
        update={
            "max_steps": schedule.steps,
            "lr": schedule.lr,
            "micro_batch_size": schedule.batch_size,
        }
    )
    return config.model_copy(update={"runner": runner})


# ---- the world, shared by every stage (written once under <run>/assets) ----


def _world_dir(stage_dir: Path) -> Path:
    return assets_dir(stage_dir.parent)


def prepare_world(config: PretrainDiffusionConfig, stage_dir: Path) -> None:
    folder = _world_dir(stage_dir)
    if (folder / "world.npz").is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    world = ShapesWorld(config.world)
    scenes = world.scenes("train")
    captions = sorted({scene.caption for scene in scenes})
    index = {caption: i for i, caption in enumerate(captions)}
    base.build_tokenizer(captions, config.clip.max_caption_tokens).save_pretrained(
        folder / "tokenizer"
    )
    (folder / "captions.json").write_text(json.dumps(captions))
    labels = [[ATTRIBUTES[k].index(s.attributes[k]) for k in ATTRIBUTES] for s in scenes]
    with (folder / "world.partial.npz").open("wb") as partial:
        np.savez(
            partial,
            images=world.images(scenes),
            caption_ids=np.array([index[s.caption] for s in scenes]),
            labels=np.array(labels),
        )
    (folder / "world.partial.npz").replace(folder / "world.npz")


@functools.cache
def _load_world(folder: Path) -> dict[str, np.ndarray]:
    with np.load(folder / "world.npz") as data:
        return {key: data[key] for key in data.files}


class WorldImages(torch.utils.data.Dataset):
    """The training images with their caption tokens and attribute labels."""

    def __init__(self, stage_dir: Path):
        folder = _world_dir(stage_dir)
        world = _load_world(folder)
        self.pixels = to_pixels(world["images"])
        self.caption_ids = torch.as_tensor(world["caption_ids"])
        self.labels = torch.as_tensor(world["labels"])
        captions = json.loads((folder / "captions.json").read_text())
        self.tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        tokens = self.tokenizer(
            captions, padding="max_length", truncation=True, return_tensors="pt"
        )
        self.input_ids, self.attention_mask = tokens.input_ids, tokens.attention_mask

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        caption = self.caption_ids[i]
        return {
            "pixel_values": self.pixels[i],
            "caption_ids": caption,
            "input_ids": self.input_ids[caption],
            "attention_mask": self.attention_mask[caption],
            "labels": self.labels[i],
        }


def world_images(config: PretrainDiffusionConfig, stage_dir: Path) -> WorldImages:
    return WorldImages(stage_dir)


def save_model(model, config: PretrainDiffusionConfig, stage_dir: Path, out_dir: Path) -> None:
    model.save_pretrained(out_dir)


# ---- CLIP ----


def build_clip(config: PretrainDiffusionConfig, stage_dir: Path):
    tokenizer = CLIPTokenizer.from_pretrained(_world_dir(stage_dir) / "tokenizer")
    return base.build_clip(config.clip, tokenizer, config.world.image_size)


def clip_step(model, batch, config: PretrainDiffusionConfig):
    captions = batch["caption_ids"]
    loss = base.clip_loss(
        model,
        batch["pixel_values"],
        batch["input_ids"],
        batch["attention_mask"],
        captions[:, None] == captions[None, :],
    )
    return loss, {}


def export_clip(model, config: PretrainDiffusionConfig, stage_dir: Path, out_dir: Path) -> None:
    model.save_pretrained(out_dir)
    CLIPTokenizer.from_pretrained(_world_dir(stage_dir) / "tokenizer").save_pretrained(out_dir)


def evaluate_clip(config: PretrainDiffusionConfig, stage_dir: Path) -> dict:
    """Zero-shot caption retrieval on held-out images, over every test-split caption."""
    world = ShapesWorld(config.world)
    scenes = world.scenes("test")
    instrument = Instrument.load(stage_dir / "model", detector_dir=None)
    return caption_retrieval(instrument, world, scenes, world.images(scenes))


def caption_retrieval(
    instrument: Instrument, world: ShapesWorld, scenes: list[Scene], images: np.ndarray
) -> dict:
    """Zero-shot retrieval of each scene's caption among every test-split caption."""
    prompts = world.prompts("test")
    scores = instrument.caption_scores(images, prompts)
    truth = torch.tensor([prompts.index(s.caption) for s in scenes])
    return {"zero_shot_caption_accuracy": (scores.argmax(1) == truth).float().mean().item(),
            "zero_shot_chance": 1 / len(prompts)}  # fmt: skip


# ---- VAE ----


def build_vae(config: PretrainDiffusionConfig, stage_dir: Path):
    return base.build_vae(config.vae, config.world.image_size)


def vae_step(model, batch, config: PretrainDiffusionConfig):
    # encode/decode are methods of the module, not its forward (ZeRO-2 keeps whole parameters).
    vae = getattr(model, "module", model)
    loss, mse, kl = base.vae_loss(vae, batch["pixel_values"], config.vae.kl_weight)
    return loss, {"mse": mse.item(), "kl": kl.item()}


def evaluate_vae(config: PretrainDiffusionConfig, stage_dir: Path) -> dict:
    vae = AutoencoderKL.from_pretrained(stage_dir / "model").eval()
    world = ShapesWorld(config.world)
    pixels = to_pixels(world.images(world.scenes("test")))
    with torch.no_grad():
        reconstruction = vae.decode(vae.encode(pixels).latent_dist.mode()).sample
    return {"test_reconstruction_mse": torch.nn.functional.mse_loss(reconstruction, pixels).item()}


# ---- concept detector ----


def build_detector(config: PretrainDiffusionConfig, stage_dir: Path):
    return base.build_detector(config.detector)


def detector_step(model, batch, config: PretrainDiffusionConfig):
    logits = model(pixel_values=batch["pixel_values"]).logits
    return base.detector_loss(logits, batch["labels"]), {}


def evaluate_detector(config: PretrainDiffusionConfig, stage_dir: Path) -> dict:
    """Per-attribute accuracy on real held-out images (the ruler must be right on real data)."""
    world = ShapesWorld(config.world)
    scenes = world.scenes("test")
    instrument = Instrument.load(clip_dir=None, detector_dir=stage_dir / "model")
    predicted = instrument.detect(world.images(scenes))
    accuracy = {
        f"test_accuracy/{name}": float(
            np.mean([p == s.attributes[name] for p, s in zip(values, scenes)])
        )
        for name, values in predicted.items()
    }
    return accuracy | {"test_accuracy/min": min(accuracy.values())}


# ---- colour-invariant detector ----


def build_invariant_detector(config: PretrainDiffusionConfig, stage_dir: Path):
    return base.build_detector(config.detector, base.COLOUR_FREE)


def invariant_detector_step(model, batch, config: PretrainDiffusionConfig):
    logits = model(pixel_values=remap_colours(batch["pixel_values"])).logits
    return base.detector_loss(logits, batch["labels"], base.COLOUR_FREE), {}


def evaluate_invariant_detector(config: PretrainDiffusionConfig, stage_dir: Path) -> dict:
    """Per-attribute accuracy on real held-out images, as drawn and recoloured at random."""
    world = ShapesWorld(config.world)
    scenes = world.scenes("test")
    pixels = to_pixels(world.images(scenes))
    model = AutoModelForImageClassification.from_pretrained(stage_dir / "model").eval()
    truth = {
        name: torch.tensor([ATTRIBUTES[name].index(s.attributes[name]) for s in scenes])
        for name in base.COLOUR_FREE
    }
    with torch.random.fork_rng():  # a fixed recolouring, without touching the caller's RNG
        torch.manual_seed(0)
        recoloured = remap_colours(pixels)
    accuracy = {}
    with torch.no_grad():
        for view, images in (("", pixels), ("recoloured_", recoloured)):
            blocks = base.attribute_logits(model(pixel_values=images).logits, base.COLOUR_FREE)
            for name, block in blocks.items():
                correct = (block.argmax(1) == truth[name]).float().mean().item()
                accuracy[f"{view}test_accuracy/{name}"] = correct
    return accuracy


# ---- colour-invariant CLIP ----


class WorldImagesWithColourFreeCaptions(WorldImages):
    """Also each image's colour-free caption (`free_caption_ids` index the distinct ones)."""

    def __init__(self, stage_dir: Path):
        super().__init__(stage_dir)
        names = list(ATTRIBUTES)
        free = [
            colour_free_caption({name: ATTRIBUTES[name][v] for name, v in zip(names, row)})
            for row in self.labels.tolist()
        ]
        unique = sorted(set(free))
        tokens = self.tokenizer(unique, padding="max_length", truncation=True, return_tensors="pt")
        self.free_input_ids, self.free_attention_mask = tokens.input_ids, tokens.attention_mask
        self.free_index = torch.tensor([unique.index(caption) for caption in free])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        free = self.free_index[i]
        return super().__getitem__(i) | {
            "free_caption_ids": free,
            "free_input_ids": self.free_input_ids[free],
            "free_attention_mask": self.free_attention_mask[free],
        }


def world_images_with_colour_free_captions(
    config: PretrainDiffusionConfig, stage_dir: Path
) -> WorldImagesWithColourFreeCaptions:
    return WorldImagesWithColourFreeCaptions(stage_dir)


def build_invariant_clip(config: PretrainDiffusionConfig, stage_dir: Path):
    tokenizer = CLIPTokenizer.from_pretrained(_world_dir(stage_dir) / "tokenizer")
    arch = config.clip.model_copy(update={"patch_size": config.invariant_clip_patch_size})
    return base.build_clip(arch, tokenizer, config.world.image_size)


def invariant_clip_step(model, batch, config: PretrainDiffusionConfig):
    """CLIP's loss with a random RECOLOURED_FRACTION of the images recoloured and paired with
    their colour-free captions (a recoloured image's colour words would be wrong); the targets
    are `base.recoloured_positives`."""
    pixels = batch["pixel_values"]
    recolour = torch.rand(len(pixels), device=pixels.device) < RECOLOURED_FRACTION
    row = recolour[:, None]
    loss = base.clip_loss(
        model,
        torch.where(row[:, :, None, None], remap_colours(pixels), pixels),
        torch.where(row, batch["free_input_ids"], batch["input_ids"]),
        torch.where(row, batch["free_attention_mask"], batch["attention_mask"]),
        base.recoloured_positives(batch["caption_ids"], batch["free_caption_ids"], recolour),
    )
    return loss, {}


def evaluate_invariant_clip(config: PretrainDiffusionConfig, stage_dir: Path) -> dict:
    """CLIP's caption retrieval, and colour-free caption retrieval on the test images as drawn
    (what the GP's prior sees) and recoloured at random."""
    world = ShapesWorld(config.world)
    scenes = world.scenes("test")
    free = [colour_free_caption(scene.attributes) for scene in scenes]
    prompts = sorted(set(free))
    truth = torch.tensor([prompts.index(caption) for caption in free])
    drawn = world.images(scenes)
    with torch.random.fork_rng():  # a fixed recolouring, without touching the caller's RNG
        torch.manual_seed(0)
        recoloured = remap_colours(to_pixels(drawn))
    instrument = Instrument.load(stage_dir / "model", None)
    results = caption_retrieval(instrument, world, scenes, drawn)
    results["colour_free_chance"] = 1 / len(prompts)
    for view, images in (("", drawn), ("recoloured_", from_pixels(recoloured))):
        scores = instrument.caption_scores(images, prompts)
        results[f"{view}colour_free_accuracy"] = (scores.argmax(1) == truth).float().mean().item()
    return results


# ---- UNet ----


def prepare_unet(config: PretrainDiffusionConfig, stage_dir: Path) -> None:
    """Encode the images (VAE posterior mean) and the captions (CLIP text encoder) once."""
    assets = assets_dir(stage_dir)
    if (assets / "latents.pt").is_file():
        return
    assets.mkdir(parents=True, exist_ok=True)
    root = stage_dir.parent
    vae = AutoencoderKL.from_pretrained(root / "vae" / "model").eval()
    text_encoder = CLIPTextModel.from_pretrained(root / "clip" / "model").eval()
    tokenizer = CLIPTokenizer.from_pretrained(root / "clip" / "model")
    world = _load_world(_world_dir(stage_dir))
    captions = json.loads((_world_dir(stage_dir) / "captions.json").read_text())
    with torch.no_grad():
        pixels = to_pixels(world["images"])
        latents = torch.cat([vae.encode(chunk).latent_dist.mode() for chunk in pixels.split(512)])
        tokens = tokenizer(
            ["", *captions], padding="max_length", truncation=True, return_tensors="pt"
        )
        embeds = text_encoder(**tokens).last_hidden_state
    scaling = 1 / latents.std().item()
    torch.save({"latents": latents * scaling, "embeds": embeds}, assets / "latents.pt.partial")
    (assets / "scaling.json").write_text(json.dumps({"scaling_factor": scaling}))
    (assets / "latents.pt.partial").replace(assets / "latents.pt")


class EncodedWorld(torch.utils.data.Dataset):
    """Scaled VAE latents with their caption's and the empty caption's text embeddings."""

    def __init__(self, stage_dir: Path):
        encoded = torch.load(assets_dir(stage_dir) / "latents.pt")
        self.latents, self.embeds = encoded["latents"], encoded["embeds"]
        self.caption_ids = torch.as_tensor(_load_world(_world_dir(stage_dir))["caption_ids"])

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "latents": self.latents[i],
            "caption_embeds": self.embeds[1 + self.caption_ids[i]],
            "null_embeds": self.embeds[0],
        }


def encoded_world(config: PretrainDiffusionConfig, stage_dir: Path) -> EncodedWorld:
    return EncodedWorld(stage_dir)


def build_unet(config: PretrainDiffusionConfig, stage_dir: Path):
    levels = len(config.vae.channels) - 1
    return base.build_unet(
        config.unet,
        config.world.image_size >> levels,
        config.vae.latent_channels,
        config.clip.hidden_size,
    )


def unet_step(model, batch, config: PretrainDiffusionConfig):
    loss = base.diffusion_loss(
        model,
        _training_scheduler(),
        batch["latents"],
        batch["caption_embeds"],
        batch["null_embeds"],
        config.unet.uncond_prob,
    )
    return loss, {}


@functools.cache
def _training_scheduler():
    return base.training_scheduler()


def _no_evaluation(config: PretrainDiffusionConfig, stage_dir: Path) -> dict:
    return {}  # the UNet is evaluated as a whole pipeline, after assembly


def _stage_job(stage: str, **hooks) -> Job:
    return Job(
        name=f"pretrain_diffusion.{stage}",
        config_cls=PretrainDiffusionConfig,
        prepare=hooks.pop("prepare", prepare_world),
        export=hooks.pop("export", save_model),
        **hooks,
    )


JOBS = {
    "clip": _stage_job(
        "clip",
        build_model=build_clip,
        build_dataset=world_images,
        step=clip_step,
        export=export_clip,
        evaluate=evaluate_clip,
    ),
    "vae": _stage_job(
        "vae",
        build_model=build_vae,
        build_dataset=world_images,
        step=vae_step,
        evaluate=evaluate_vae,
    ),
    "detector": _stage_job(
        "detector",
        build_model=build_detector,
        build_dataset=world_images,
        step=detector_step,
        evaluate=evaluate_detector,
    ),
    "invariant_detector": _stage_job(
        "invariant_detector",
        build_model=build_invariant_detector,
        build_dataset=world_images,
        step=invariant_detector_step,
        evaluate=evaluate_invariant_detector,
    ),
    "invariant_clip": _stage_job(
        "invariant_clip",
        build_model=build_invariant_clip,
        build_dataset=world_images_with_colour_free_captions,
        step=invariant_clip_step,
        export=export_clip,
        evaluate=evaluate_invariant_clip,
    ),
    "unet": _stage_job(
        "unet",
        prepare=prepare_unet,
        build_model=build_unet,
        build_dataset=encoded_world,
        step=unet_step,
        evaluate=_no_evaluation,
    ),
}


# ---- the whole base: stages, pipeline, evaluation ----


def assemble_pipeline(run_dir: Path) -> Path:
    """The Stable Diffusion folder: our VAE, CLIP text encoder, tokenizer, UNet and DDIM."""
    out = run_dir / "pipeline"
    if out.is_dir():
        return out
    vae = AutoencoderKL.from_pretrained(run_dir / "vae" / "model")
    scaling = json.loads((assets_dir(run_dir / "unet") / "scaling.json").read_text())
    vae.register_to_config(**scaling)
    text_encoder = CLIPTextModel.from_pretrained(run_dir / "clip" / "model")
    # The UNet was conditioned on states computed with the attention mask (padding masked, as
    # in CLIP's own training); diffusers' SD pipelines pass the mask when this flag is set.
    text_encoder.config.use_attention_mask = True
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(run_dir / "clip" / "model"),
        unet=UNet2DConditionModel.from_pretrained(run_dir / "unet" / "model"),
        scheduler=base.sampling_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(run_dir / "pipeline.partial")
    (run_dir / "pipeline.partial").replace(out)
    return out


def evaluate_base(config: PretrainDiffusionConfig, run_dir: Path) -> dict:
    """Held-out prompts at each guidance scale, two references, and the sample grid.

    The references are real validation images scored against their own captions (what a
    perfect generator would get: the ruler's own error, and the Fréchet distance between two
    real samples) and against other images' captions (chance: an image of the world that
    ignores its prompt).
    """
    ev = config.evaluation
    world = ShapesWorld(config.world)
    instrument = Instrument.load(
        run_dir / "clip" / "model",
        run_dir / "detector" / "model",
        world.images(world.scenes("test")),
    )
    prompts = world.prompts("test")
    if len(prompts) > ev.prompts:  # a fixed random subset, so every scene kind stays in
        prompts = sorted(random.Random(0).sample(prompts, ev.prompts))
    asked = [p for p in prompts for _ in range(ev.images_per_prompt)]
    pipeline = StableDiffusionPipeline.from_pretrained(run_dir / "pipeline")
    results: dict = {"held_out_prompts": len(prompts)}
    for guidance in ev.guidance:
        images = generate_images(pipeline, prompts, ev.images_per_prompt, ev.steps, guidance)
        results[f"guidance_{guidance:g}"] = instrument.score(images, asked)
        print(f"[pretrain_diffusion] guidance {guidance:g}: {results[f'guidance_{guidance:g}']}",
              file=sys.stderr)  # fmt: skip
        if guidance == max(ev.guidance):
            rows = [i * len(prompts) // 8 for i in range(min(8, len(prompts)))]
            grid = [
                images[r * ev.images_per_prompt + c]
                for r in rows
                for c in range(ev.images_per_prompt)
            ]
            save_grid(np.stack(grid), ev.images_per_prompt, run_dir / "samples.png")
            (run_dir / "samples.txt").write_text("\n".join(prompts[r] for r in rows) + "\n")
    real = world.scenes("validation")
    real_images, captions = world.images(real), [scene.caption for scene in real]
    results["real_images"] = instrument.score(real_images, captions)
    results["chance"] = instrument.concept_accuracy(real_images, captions[1:] + captions[:1])
    return results


def train(config: PretrainDiffusionConfig, run_dir: str | Path) -> dict:
    """Run the stages (resuming where a previous attempt stopped); with the UNet, assemble the
    pipeline and evaluate it."""
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    check_config(config, run_dir)
    summary_file = run_dir / "summary.json"
    if summary_file.is_file():
        return json.loads(summary_file.read_text())
    summary = {
        stage: run(JOBS[stage], _stage_config(config, stage), run_dir / stage)
        for stage in config.stages
    }
    if "unet" in config.stages:
        assemble_pipeline(run_dir)
        summary["evaluation"] = evaluate_base(config, run_dir)
    summary_file.write_text(json.dumps(summary, indent=2))
    return summary


def pretrained_diffusion(preset: str = "tiny") -> Path:
    """The run directory of `preset` (pipeline/ and every stage's model), trained once."""
    config = load_config(PretrainDiffusionConfig, preset)
    return cached("pretrain_diffusion", config, lambda run_dir: train(config, run_dir))


if __name__ == "__main__":
    # The stage hooks must pickle by reference to jobs.pretrain_diffusion, not __main__.
    module = importlib.import_module("jobs.pretrain_diffusion")
    cli("pretrain_diffusion", PretrainDiffusionConfig, module.train)
