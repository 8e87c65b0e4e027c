"""The shapes world and the instrument's pure parts: determinism, captions, bias, FD, tokenizer."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from kiln.config import ConfigError, JobConfig, load_config
from kiln.diffusion.base import build_tokenizer
from kiln.diffusion.evaluate import Instrument, frechet_distance
from kiln.worlds.shapes import (
    ATTRIBUTES,
    BACKGROUNDS,
    CAPTIONED,
    COLOURS,
    ShapesWorld,
    ShapesWorldConfig,
    caption,
    parse_caption,
)

WORLD = ShapesWorld(ShapesWorldConfig(train_size=400, eval_size=100))


def test_world_is_deterministic_from_its_seed():
    first, again = ShapesWorld(WORLD.config), ShapesWorld(WORLD.config)
    scenes = first.scenes("train", 50)
    assert [s.caption for s in scenes] == [s.caption for s in again.scenes("train", 50)]
    assert np.array_equal(first.images(scenes), again.images(again.scenes("train", 50)))
    other = ShapesWorld(WORLD.config.model_copy(update={"seed": 1})).scenes("train", 50)
    assert [s.caption for s in other] != [s.caption for s in scenes]  # the seed matters


def test_captions_state_the_recorded_attributes():
    for scene in WORLD.scenes("train", 300):
        stated = parse_caption(scene.caption)
        assert stated == {k: scene.attributes[k] for k in CAPTIONED}
    # Negative control: a caption of other attributes does not parse back to these.
    scene = WORLD.scenes("train", 1)[0]
    changed = dict(
        scene.attributes,
        background="white" if scene.attributes["background"] != "white" else "black",
    )
    assert parse_caption(caption(changed)) != {k: scene.attributes[k] for k in CAPTIONED}
    with pytest.raises(ValueError, match="not a shapes-world caption"):
        parse_caption("a photo of a cat")


def _nearest(pixels: np.ndarray, palette: dict) -> np.ndarray:
    names = list(palette)
    centres = np.array([palette[n] for n in names], float)
    distance = ((pixels[..., None, :].astype(float) - centres) ** 2).sum(-1)
    return np.array(names)[distance.argmin(-1)]


def test_pixels_show_the_recorded_background_and_colour():
    scenes = WORLD.scenes("validation", 60)
    images = WORLD.images(scenes)
    for scene, image in zip(scenes, images):
        corner = _nearest(image[0, 0], BACKGROUNDS)
        assert corner == scene.attributes["background"], scene.caption
        seen = Counter(_nearest(image.reshape(-1, 3), {**BACKGROUNDS, **COLOURS}).tolist())
        assert seen[scene.attributes["colour"]] >= 6, scene.caption  # the object is drawn


def test_splits_are_disjoint_by_caption():
    train = {s.caption for s in WORLD.scenes("train")}
    test = set(WORLD.prompts("test"))
    assert test and not train & test


def test_cooccurrence_binds_stars_to_cups():
    scenes = ShapesWorld(ShapesWorldConfig(kinds={"container": 1.0})).scenes("train", 600)
    stars = Counter(s.attributes["container"] for s in scenes if s.attributes["shape"] == "star")
    others = Counter(s.attributes["container"] for s in scenes if s.attributes["shape"] != "star")
    assert stars["cup"] / sum(stars.values()) > 0.85  # 0.9 + 0.1 / 2 expected
    assert 0.35 < others["cup"] / sum(others.values()) < 0.65  # unbiased
    unbiased = ShapesWorld(ShapesWorldConfig(kinds={"container": 1.0}, cooccurrence=[]))
    stars = Counter(
        s.attributes["container"]
        for s in unbiased.scenes("train", 600)
        if s.attributes["shape"] == "star"
    )
    assert stars["cup"] / sum(stars.values()) < 0.7  # the rule, not the world, did it


class _WorldJob(JobConfig):
    world: ShapesWorldConfig = ShapesWorldConfig()


def test_bad_world_config_names_the_field():
    with pytest.raises(ConfigError, match="given"):
        load_config(
            _WorldJob,
            overrides=[
                "world.cooccurrence=[{given: 'shape=hexagon', then: 'container=cup', "
                "probability: 0.5}]"
            ],
        )
    with pytest.raises(ConfigError, match="kinds"):
        load_config(_WorldJob, overrides=["world.kinds={planets: 1.0}"])


def test_frechet_distance_is_zero_for_same_distribution_and_large_for_noise():
    rng = torch.Generator().manual_seed(0)
    a, b = torch.randn(4000, 8, generator=rng), torch.randn(4000, 8, generator=rng)
    assert frechet_distance(a, b) < 0.05
    shifted = b + torch.tensor([2.0] + [0.0] * 7)  # FD of N(0,I) vs N(m,I) is |m|^2 = 4
    assert frechet_distance(a, shifted) == pytest.approx(4.0, abs=0.2)
    scaled = b * 3  # Tr(I + 9I - 2*3I) = 4 per dimension
    assert frechet_distance(a, scaled) == pytest.approx(32.0, rel=0.1)


def test_frechet_distance_on_clip_features_separates_real_from_noise():
    """Real-vs-real is ~0 next to real-vs-noise, with an (untrained) tiny CLIP as features."""
    from kiln.diffusion.base import ClipArch, build_clip

    world = ShapesWorld(ShapesWorldConfig(eval_size=300))
    captions = [s.caption for s in world.scenes("train", 200)]
    tokenizer = build_tokenizer(captions, 16)
    torch.manual_seed(0)
    real_a = world.images(world.scenes("validation"))
    instrument = Instrument(build_clip(ClipArch(), tokenizer, 32), tokenizer, None, real_a)
    real_b = world.images(world.scenes("test"))
    noise = np.random.default_rng(0).integers(0, 256, real_b.shape, dtype=np.uint8)
    same, different = instrument.frechet_distance(real_b), instrument.frechet_distance(noise)
    assert same < 0.1 * different, (same, different)


def test_tokenizer_keeps_caption_words_whole_and_spells_unknown_words():
    captions = [s.caption for s in WORLD.scenes("train", 300)]
    tokenizer = build_tokenizer(captions, 16)
    words = captions[0].split()
    ids = tokenizer(captions[0]).input_ids
    assert len(ids) == len(words) + 2  # <start> word... <end>
    spelled = tokenizer.convert_ids_to_tokens(tokenizer("a zebra").input_ids)
    assert "".join(spelled[2:-1]).replace("</w>", "") == "zebra"  # nothing dropped


class _OracleDetector(torch.nn.Module):
    """Answers with the true attributes of the images it was built for (a perfect ruler)."""

    def __init__(self, scenes):
        super().__init__()
        blocks = []
        for name, values in ATTRIBUTES.items():
            index = torch.tensor([values.index(s.attributes[name]) for s in scenes])
            blocks.append(torch.nn.functional.one_hot(index, len(values)).float())
        self.logits = torch.cat(blocks, 1)

    def forward(self, pixel_values):
        return type("Out", (), {"logits": self.logits[: len(pixel_values)]})()


def test_concept_accuracy_counts_images_showing_every_asked_concept():
    scenes = WORLD.scenes("test", 40)
    instrument = Instrument(detector=_OracleDetector(scenes))
    images = WORLD.images(scenes)
    right = instrument.concept_accuracy(images, [s.caption for s in scenes])
    assert right["concept_accuracy"] == 1.0
    wrong_colour = [
        caption(dict(s.attributes, colour="red" if s.attributes["colour"] != "red" else "blue"))
        for s in scenes
    ]
    wrong = instrument.concept_accuracy(images, wrong_colour)
    assert wrong["concept_accuracy"] == 0.0 and wrong["concept_accuracy/colour"] == 0.0
    assert wrong["concept_accuracy/background"] == 1.0
