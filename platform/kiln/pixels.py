"""kiln's pixel convention and its colour augmentation, with torch and numpy alone (no diffusers:
`kiln.gp` reads images this way too).

Images on disk and at the API are uint8 [N, H, W, 3]; models take float [N, 3, H, W] in [-1, 1]
(the diffusers convention). `remap_colours` recolours whole images (the shapes world's
colour-invariant models train on it, and the GP's prior averages over it).
"""

from __future__ import annotations

import numpy as np
import torch


def to_pixels(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1] (the diffusers convention)."""
    images = torch.as_tensor(np.asarray(images))
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != torch.uint8:
        raise ValueError(
            f"images: expected uint8 [N, H, W, 3], got {tuple(images.shape)} {images.dtype}"
        )
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1


def from_pixels(pixels: torch.Tensor) -> np.ndarray:
    """float [N, 3, H, W] in [-1, 1] -> uint8 [N, H, W, 3]; inverts `to_pixels` exactly."""
    pixels = ((pixels + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def remap_colours(
    pixels: torch.Tensor, generator: torch.Generator | None = None, shared: bool = False
) -> torch.Tensor:
    """A random colour map per image (or, `shared`, one for the whole batch), for pixels
    [N, 3, H, W] in [-1, 1].

    A map: a channel permutation, then per channel a gain of ±[0.4, 1.2] (negative with
    probability 0.3: an inversion) and an offset in [-0.4, 0.4]; greyscale with probability 0.2.
    Every pixel of an image goes through the same map, so shapes and layout are kept and pixels
    of one colour stay one colour; only which colour changes. Draws from `generator` (on the
    pixels' device), by default torch's global one for that device.
    """
    n = 1 if shared else len(pixels)
    draw = {"device": pixels.device, "generator": generator}
    order = torch.argsort(torch.rand(n, 3, **draw), dim=1)
    remapped = torch.gather(pixels, 1, order[:, :, None, None].expand_as(pixels))
    sign = torch.where(torch.rand(n, 3, 1, 1, **draw) < 0.3, -1.0, 1.0)
    gain = torch.empty(n, 3, 1, 1, device=pixels.device).uniform_(0.4, 1.2, generator=generator)
    offset = torch.empty(n, 3, 1, 1, device=pixels.device).uniform_(-0.4, 0.4, generator=generator)
    remapped = remapped * gain * sign + offset
    grey = torch.rand(n, 1, 1, 1, **draw) < 0.2
    remapped = torch.where(grey, remapped.mean(1, keepdim=True).expand_as(remapped), remapped)
    return remapped.clamp(-1, 1)
