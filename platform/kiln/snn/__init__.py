"""Spiking neural networks: SpikeZIP-TF (arXiv 2406.03470); the math is in `spikezip.py`."""

from kiln.snn.spikezip import (
    Quantiser,
    SpikingOutput,
    SpikingViT,
    STBIFNeuron,
    Telescoping,
    ViT,
    ViTConfig,
    calibrate,
    check_levels,
    convert,
    distillation_loss,
    load_pretrained,
    save_pretrained,
)

__all__ = [
    "Quantiser",
    "STBIFNeuron",
    "SpikingOutput",
    "SpikingViT",
    "Telescoping",
    "ViT",
    "ViTConfig",
    "calibrate",
    "check_levels",
    "convert",
    "distillation_loss",
    "load_pretrained",
    "save_pretrained",
]
