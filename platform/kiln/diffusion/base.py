"""The diffusion base: a tiny CLIP, VAE, latent UNet and concept detector, all standard classes.

Stable Diffusion (Rombach et al., arXiv 2112.10752) at toy scale, built from the same classes
real checkpoints use, so every later method runs unchanged on SD-v1.x from a local path:

- `CLIPModel` (transformers; Radford et al., arXiv 2103.00020) trained contrastively. Captions
  repeat in this world, so two images with the same caption are both positives: the target of
  row i is uniform over the batch entries whose caption equals caption i (plain CLIP's identity
  target would push apart identical pairs).
      L_clip = ½ [CE(s·I·Tᵀ, P) + CE(s·T·Iᵀ, Pᵀ)],  P_ij = [text j describes image i],
  each CE's target row normalised to sum to 1; here P_ij = [caption_i = caption_j].
- `AutoencoderKL` (diffusers) with latents at 1/4 resolution:
      L_vae = ‖D(z) − x‖² + β_kl · KL(q(z|x) ‖ N(0, I)),  z ~ q(z|x)
  Deviation from SD: no perceptual or adversarial loss (flat-colour shapes reconstruct well
  with MSE alone). The latent scaling factor is set to 1/std of the training latents, as SD did.
- `UNet2DConditionModel` (diffusers) predicting the noise ε (Ho et al., arXiv 2006.11239) on
  latents z₀ = scaling · E(x), conditioned on the frozen CLIP text encoder's last hidden state
  (computed with the attention mask, as CLIP was trained; the pipeline's text encoder carries
  `use_attention_mask=True` so diffusers computes the same states at inference):
      L_unet = ‖ε − ε_θ(√ᾱ_t z₀ + √(1−ᾱ_t) ε, t, c)‖²,
  with c replaced by the empty caption's embedding with probability `uncond_prob`, which is
  what classifier-free guidance needs (Ho & Salimans, arXiv 2207.12598). SD's noise schedule
  (scaled-linear β from 0.00085 to 0.012, 1000 steps); sampling uses DDIM.
- A concept detector: `ResNetForImageClassification` (transformers) with one logit per
  attribute value, trained with one softmax cross-entropy per attribute of the shapes world
  (the label names are `attribute=value`, so the folder is self-describing).
- A colour-invariant detector: the same ResNet predicting only the attributes that name no
  colour (`COLOUR_FREE`), trained on images whose colours are remapped at random
  (`kiln.pixels.remap_colours`). It is a feature extractor, not a ruler: its features carry
  shape, count and layout but not the palette, as colour-jittered self-supervised models do
  (SimCLR, arXiv 2002.05709). Why: every other model here encodes the palette, so a low-shot
  classifier built on them (the GP ensemble) fails on unseen colours (BENCHMARKS.md, GP section).
- A colour-invariant CLIP: the same CLIP (with 2-pixel patches) and L_clip, where a random half
  R of each batch is recoloured by `kiln.pixels.remap_colours` and captioned without colours or
  background (`kiln.worlds.shapes.colour_free_caption`: "two stars", "a ring in a cup"). A
  colour-free text describes every image with that colour-free caption, recoloured or not; a full
  caption only the images it was drawn for, unrecoloured:
      P_ij = [j ∈ R] [free_i = free_j] + [j ∉ R] [i ∉ R] [caption_i = caption_j]
  Why: web-scale CLIPs, whose zero-shot logits are the GP ensemble's prior, are robust to
  colour; the tiny CLIP reads the palette, so a prior made from it fails on unseen colours.

The tokenizer is a `CLIPTokenizer` whose BPE is fitted on the world's captions (every caption
word becomes one token; unknown words fall back to characters).
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from pydantic import Field
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTokenizer,
    ResNetConfig,
    ResNetForImageClassification,
)

from kiln.config import Section
from kiln.worlds.shapes import ATTRIBUTES

# The attributes whose values name no colour: what the colour-invariant detector predicts.
COLOUR_FREE = tuple(name for name in ATTRIBUTES if "colour" not in name and name != "background")

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# SD-v1's noise schedule.
NOISE_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
}


class ClipArch(Section):
    """Architecture of the tiny CLIP (both towers share width and depth)."""

    hidden_size: int = Field(64, ge=8, description="Width of the text and vision transformers.")
    num_layers: int = Field(2, ge=1, description="Transformer layers per tower.")
    num_heads: int = Field(4, ge=1, description="Attention heads per layer.")
    patch_size: int = Field(4, ge=1, description="Vision patch size in pixels.")
    projection_dim: int = Field(64, ge=8, description="Dimension of the joint embedding space.")
    max_caption_tokens: int = Field(
        16, ge=4, description="Tokenizer max length (the UNet cross-attends over this many)."
    )


class VaeArch(Section):
    """Architecture of the tiny AutoencoderKL."""

    channels: list[int] = Field(
        [32, 64, 64],
        min_length=2,
        description="Channels per encoder level; len-1 halvings (3 levels: latents at 1/4).",
    )
    latent_channels: int = Field(4, ge=1, description="Channels of the latent.")
    kl_weight: float = Field(1e-4, ge=0, description="β_kl, weight of the KL term.")


class UNetArch(Section):
    """Architecture of the tiny UNet2DConditionModel."""

    channels: list[int] = Field([64, 128], min_length=2, description="Channels per level.")
    layers_per_block: int = Field(1, ge=1, description="ResNet layers per level.")
    attention_head_dim: int = Field(8, ge=1, description="Channels per cross-attention head.")
    uncond_prob: float = Field(
        0.1, ge=0, lt=1, description="Probability a caption is dropped (classifier-free guidance)."
    )


class DetectorArch(Section):
    """Architecture of the concept detector (a small ResNet)."""

    channels: list[int] = Field([32, 64, 128], min_length=1, description="Channels per stage.")


def build_tokenizer(captions: list[str], max_length: int) -> CLIPTokenizer:
    fitter = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    fitter.normalizer = normalizers.Lowercase()
    fitter.pre_tokenizer = pre_tokenizers.Whitespace()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    fitter.train_from_iterator(
        captions,
        trainers.BpeTrainer(
            vocab_size=len(alphabet) * 2 + 1000,
            end_of_word_suffix="</w>",
            initial_alphabet=alphabet,
            special_tokens=[BOS, EOS],
            show_progress=False,
        ),
    )
    fitted = json.loads(fitter.to_str())["model"]
    vocab = dict(fitted["vocab"])
    # Word-final characters too, so an unseen word still encodes (CLIP's vocab has both).
    for char in sorted(alphabet):
        vocab.setdefault(char + "</w>", len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[tuple(m) for m in fitted["merges"]])
    tokenizer.model_max_length = max_length
    return tokenizer


def build_clip(arch: ClipArch, tokenizer: CLIPTokenizer, image_size: int) -> CLIPModel:
    shared = {
        "hidden_size": arch.hidden_size,
        "intermediate_size": 4 * arch.hidden_size,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_heads,
    }
    config = CLIPConfig(
        text_config={
            **shared,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": arch.max_caption_tokens,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={**shared, "image_size": image_size, "patch_size": arch.patch_size},
        projection_dim=arch.projection_dim,
    )
    return CLIPModel(config)


def clip_loss(
    model: CLIPModel,
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positives: torch.Tensor,
) -> torch.Tensor:
    """positives [B, B] bool: text j describes image i (the diagonal at least)."""
    out = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
    positives = positives.float()
    logits = out.logits_per_image  # logits_per_text is its transpose
    return 0.5 * (
        F.cross_entropy(logits, positives / positives.sum(1, keepdim=True))
        + F.cross_entropy(logits.T, positives.T / positives.T.sum(1, keepdim=True))
    )


def recoloured_positives(
    caption_ids: torch.Tensor, free_caption_ids: torch.Tensor, recoloured: torch.Tensor
) -> torch.Tensor:
    """The colour-invariant CLIP's P (module docstring): text j is entry j's colour-free caption
    where recoloured[j], its full caption otherwise."""
    same_free = free_caption_ids[:, None] == free_caption_ids[None, :]
    same_full = caption_ids[:, None] == caption_ids[None, :]
    return torch.where(recoloured[None, :], same_free, same_full & ~recoloured[:, None])


def build_vae(arch: VaeArch, image_size: int) -> AutoencoderKL:
    levels = len(arch.channels)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(arch.channels),
        latent_channels=arch.latent_channels,
        norm_num_groups=min(16, *arch.channels),
        sample_size=image_size,
    )


def vae_loss(vae: AutoencoderKL, pixels: torch.Tensor, kl_weight: float) -> tuple:
    posterior = vae.encode(pixels).latent_dist
    reconstruction = vae.decode(posterior.sample()).sample
    mse = F.mse_loss(reconstruction, pixels)
    kl = posterior.kl().mean() / pixels[0].numel()  # per pixel, like the MSE
    return mse + kl_weight * kl, mse, kl


def build_unet(
    arch: UNetArch, latent_size: int, latent_channels: int, text_width: int
) -> UNet2DConditionModel:
    levels = len(arch.channels)
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        block_out_channels=tuple(arch.channels),
        layers_per_block=arch.layers_per_block,
        cross_attention_dim=text_width,
        attention_head_dim=arch.attention_head_dim,
        norm_num_groups=min(32, *arch.channels),
    )


def training_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**NOISE_SCHEDULE)


def sampling_scheduler() -> DDIMScheduler:
    return DDIMScheduler(**NOISE_SCHEDULE, set_alpha_to_one=False, steps_offset=1)


def diffusion_loss(
    unet: UNet2DConditionModel,
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    caption_embeds: torch.Tensor,
    null_embeds: torch.Tensor,
    uncond_prob: float,
) -> torch.Tensor:
    noise = torch.randn_like(latents)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),))
    noisy = scheduler.add_noise(latents, noise, t)
    drop = torch.rand(len(latents)) < uncond_prob
    condition = torch.where(drop[:, None, None], null_embeds, caption_embeds)
    prediction = unet(noisy, t, encoder_hidden_states=condition).sample
    return F.mse_loss(prediction, noise)


def build_detector(
    arch: DetectorArch, attributes: tuple[str, ...] = tuple(ATTRIBUTES)
) -> ResNetForImageClassification:
    labels = [f"{name}={value}" for name in attributes for value in ATTRIBUTES[name]]
    config = ResNetConfig(
        embedding_size=arch.channels[0],
        hidden_sizes=list(arch.channels),
        depths=[1] * len(arch.channels),
        layer_type="basic",
        downsample_in_first_stage=False,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    return ResNetForImageClassification(config)


def attribute_logits(
    logits: torch.Tensor, attributes: tuple[str, ...] = tuple(ATTRIBUTES)
) -> dict[str, torch.Tensor]:
    """Split a detector's logits into one block per attribute it predicts."""
    return dict(zip(attributes, logits.split([len(ATTRIBUTES[a]) for a in attributes], dim=1)))


def detector_loss(
    logits: torch.Tensor, labels: torch.Tensor, attributes: tuple[str, ...] = tuple(ATTRIBUTES)
) -> torch.Tensor:
    """labels: [N, len(ATTRIBUTES)] value indices; one cross-entropy per predicted attribute."""
    columns = list(ATTRIBUTES)
    blocks = attribute_logits(logits, attributes)
    return sum(F.cross_entropy(block, labels[:, columns.index(a)]) for a, block in blocks.items())
