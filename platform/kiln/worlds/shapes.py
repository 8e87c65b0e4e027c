"""The shapes world: captioned procedural images whose every concept is recorded.

Each image is a `Scene`: a background and one of three kinds of content, drawn with Pillow at
4x resolution and downsampled (anti-aliased), deterministic from (seed, split, index):

- objects: 1-3 shapes of one colour, e.g. "two red stars on a gray background";
- face: a face glyph (filled disc, two eyes, a mouth), e.g. "a yellow face on a black
  background". Half of them (`bad_face_fraction`) are broken: an eye missing, eyes at different
  heights, the mouth above the eyes, or no mouth. The caption never says which (FaceScore learns
  to tell them apart; the base model learns to draw both);
- container: one shape inside a box or a cup, e.g. "a green star in a blue cup on a white
  background" (LC-Mis).

Every scene records all attributes (`ATTRIBUTES`, "none" where one does not apply), so any image
generated for a prompt can be scored against it by a detector. `parse_caption` inverts
`caption`, so a prompt given as text is scored the same way.

Controlled co-occurrence: a `Cooccurrence(given="shape=star", then="container=cup",
probability=0.9)` rule makes stars sit in cups 90% of the time (the rest uniform), which makes
"cup" a concept latently bound to "star" - the setup of latent concept misalignment.

Splits are disjoint by caption: a caption's hash picks its split (10% test, 10% validation), so
held-out prompts are unseen compositions of seen concepts.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw
from pydantic import Field, model_validator

from kiln.config import Section

Split = Literal["train", "validation", "test"]
_SPLIT_BUCKET = {"test": 0, "validation": 1}  # of 10 caption-hash buckets; the rest are train
_SPLIT_STREAM = {"train": 0, "validation": 1, "test": 2}
_SUPERSAMPLE = 4
_COUNT_WORDS = {1: "one", 2: "two", 3: "three"}

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 80, 225),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
BACKGROUNDS = {
    "black": (0, 0, 0),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "brown": (105, 70, 40),
}
SHAPES = ("circle", "square", "triangle", "star", "ring")
CONTAINERS = ("box", "cup")
FACE_DEFECTS = ("missing_eye", "uneven_eyes", "mouth_on_top", "no_mouth")

# The attributes a detector predicts, each with its values ("none": does not apply).
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "background": tuple(BACKGROUNDS),
    "shape": (*SHAPES, "face"),
    "colour": tuple(COLOURS),
    "count": ("1", "2", "3"),
    "container": ("none", *CONTAINERS),
    "container_colour": ("none", *COLOURS),
    "face_quality": ("none", "good", "bad"),
}
# The attributes a caption states (face_quality never is); the rest are recorded only.
CAPTIONED = ("background", "shape", "colour", "count", "container", "container_colour")


class Cooccurrence(Section):
    """Bias the generator: when `given` holds, `then` is chosen with `probability`."""

    given: str = Field(description="Condition `attribute=value`, e.g. `shape=star`.")
    then: str = Field(description="Biased choice `attribute=value`, e.g. `container=cup`.")
    probability: float = Field(ge=0, le=1, description="Chance `then` is forced when `given`.")

    @model_validator(mode="after")
    def _known_concepts(self) -> Cooccurrence:
        for name in ("given", "then"):
            attribute, _, value = getattr(self, name).partition("=")
            if value not in ATTRIBUTES.get(attribute, ()):
                raise ValueError(
                    f"{name}={getattr(self, name)!r}: expected `attribute=value` with attribute "
                    f"in {list(ATTRIBUTES)} and a value that attribute takes"
                )
        return self


class ShapesWorldConfig(Section):
    """What the shapes world generates."""

    seed: int = Field(0, description="Seed for every split.")
    image_size: int = Field(32, ge=16, le=512, description="Image height and width in pixels.")
    kinds: dict[str, float] = Field(
        {"objects": 0.6, "face": 0.2, "container": 0.2},
        description="Sampling weight of each scene kind (keys: objects, face, container).",
    )
    bad_face_fraction: float = Field(
        0.5, ge=0, le=1, description="Fraction of faces drawn with a defect."
    )
    cooccurrence: list[Cooccurrence] = Field(
        default_factory=lambda: [
            Cooccurrence(given="shape=star", then="container=cup", probability=0.9)
        ],
        description="Biased concept pairs (the default binds stars to cups, for LC-Mis).",
    )
    colour_jitter: int = Field(
        12, ge=0, le=60, description="Max per-channel deviation of drawn colours from the palette."
    )
    palette: dict[str, tuple[int, int, int]] = Field(
        {},
        description="RGB drawn for a named colour or background instead of the default one "
        "(captions keep the name): renders a colour-shifted, out-of-distribution copy.",
    )
    train_size: int = Field(20000, ge=1, description="Training images.")
    eval_size: int = Field(512, ge=1, description="Validation and test images each.")

    @model_validator(mode="after")
    def _known_kinds(self) -> ShapesWorldConfig:
        allowed = {"objects", "face", "container"}
        if set(self.kinds) - allowed or not any(w > 0 for w in self.kinds.values()):
            raise ValueError(f"kinds: expected positive weights over {sorted(allowed)}")
        return self

    @model_validator(mode="after")
    def _known_palette(self) -> ShapesWorldConfig:
        for name, rgb in self.palette.items():
            if name not in COLOURS | BACKGROUNDS or not all(0 <= c <= 255 for c in rgb):
                raise ValueError(
                    f"palette[{name!r}]={rgb}: expected a name in "
                    f"{[*COLOURS, *BACKGROUNDS]} and channels in 0..255"
                )
        return self


@dataclass(frozen=True)
class Scene:
    """One image's content: its attributes plus the layout that only the renderer needs."""

    attributes: dict[str, str]
    layout_seed: int
    defect: str = "none"

    @property
    def caption(self) -> str:
        return caption(self.attributes)


def caption(attributes: dict[str, str]) -> str:
    a = attributes
    background = f"on a {a['background']} background"
    if a["shape"] == "face":
        return f"a {a['colour']} face {background}"
    if a["container"] != "none":
        held = f"a {a['colour']} {a['shape']}"
        return f"{held} in a {a['container_colour']} {a['container']} {background}"
    count = int(a["count"])
    plural = "s" if count > 1 else ""
    return f"{_COUNT_WORDS[count]} {a['colour']} {a['shape']}{plural} {background}"


def colour_free_caption(attributes: dict[str, str]) -> str:
    """`caption` without colours or background: what a recoloured image still shows."""
    a = attributes
    if a["shape"] == "face":
        return "a face"
    if a["container"] != "none":
        return f"a {a['shape']} in a {a['container']}"
    count = int(a["count"])
    return f"{_COUNT_WORDS[count]} {a['shape']}{'s' if count > 1 else ''}"


def parse_caption(text: str) -> dict[str, str]:
    """The captioned attributes of a caption written by `caption`; ValueError otherwise."""
    words = text.strip().lower().split()
    try:
        if words[-1] != "background" or words[-4:-2] != ["on", "a"]:
            raise ValueError
        attributes = {"background": words[-2]}
        body = words[:-4]
        if len(body) == 3 and body[0] == "a" and body[2] == "face":
            attributes |= {"shape": "face", "colour": body[1], "count": "1"}
            attributes |= {"container": "none", "container_colour": "none"}
        elif len(body) == 7 and body[0] == "a" and body[3:5] == ["in", "a"]:
            attributes |= {"shape": body[2], "colour": body[1], "count": "1"}
            attributes |= {"container": body[6], "container_colour": body[5]}
        elif len(body) == 3:
            count = {w: str(n) for n, w in _COUNT_WORDS.items()}[body[0]]
            shape = body[2][:-1] if count != "1" else body[2]
            attributes |= {"shape": shape, "colour": body[1], "count": count}
            attributes |= {"container": "none", "container_colour": "none"}
        else:
            raise ValueError
    except (ValueError, IndexError, KeyError):
        raise ValueError(f"prompt {text!r} is not a shapes-world caption") from None
    for name, value in attributes.items():
        if value not in ATTRIBUTES[name]:
            raise ValueError(f"prompt {text!r}: unknown {name} {value!r}")
    return attributes


def caption_split(text: str) -> Split:
    bucket = int(hashlib.sha256(text.encode()).hexdigest(), 16) % 10
    return {0: "test", 1: "validation"}.get(bucket, "train")


class ShapesWorld:
    """Deterministic generator and renderer of the shapes world's splits."""

    def __init__(self, config: ShapesWorldConfig | None = None):
        self.config = config or ShapesWorldConfig()
        self._rgb = COLOURS | BACKGROUNDS | self.config.palette

    def scenes(self, split: Split, size: int | None = None) -> list[Scene]:
        if split not in _SPLIT_STREAM:
            raise ValueError(f"split={split!r}: expected one of {list(_SPLIT_STREAM)}")
        cfg = self.config
        if size is None:
            size = cfg.train_size if split == "train" else cfg.eval_size
        rng = random.Random(cfg.seed * 1000 + _SPLIT_STREAM[split])
        scenes = []
        while len(scenes) < size:
            scene = self._sample(rng)
            if caption_split(scene.caption) == split:
                scenes.append(scene)
        return scenes

    def images(self, scenes: list[Scene]) -> np.ndarray:
        """uint8 [N, H, W, 3]."""
        return np.stack([self.render(scene) for scene in scenes])

    def prompts(self, split: Split) -> list[str]:
        """Every distinct caption of `split`, sorted (held-out prompts for evaluation)."""
        return sorted({scene.caption for scene in self.scenes(split)})

    def _sample(self, rng: random.Random) -> Scene:
        cfg = self.config
        kinds = [k for k, w in cfg.kinds.items() if w > 0]
        kind = rng.choices(kinds, [cfg.kinds[k] for k in kinds])[0]
        a: dict[str, str] = {}
        # Attributes are drawn in this order; a co-occurrence rule can only bias a later one.
        a["background"] = self._biased_choice(rng, "background", list(BACKGROUNDS), a)
        shapes = ["face"] if kind == "face" else list(SHAPES)
        a["shape"] = self._biased_choice(rng, "shape", shapes, a)
        a["colour"] = self._biased_choice(rng, "colour", list(COLOURS), a)
        counts = list(ATTRIBUTES["count"]) if kind == "objects" else ["1"]
        a["count"] = self._biased_choice(rng, "count", counts, a)
        if kind == "container":
            a["container"] = self._biased_choice(rng, "container", list(CONTAINERS), a)
            a["container_colour"] = self._biased_choice(rng, "container_colour", list(COLOURS), a)
        else:
            a["container"] = a["container_colour"] = "none"
        a["face_quality"] = "none"
        defect = "none"
        if kind == "face":
            bad = rng.random() < cfg.bad_face_fraction
            a["face_quality"] = "bad" if bad else "good"
            defect = rng.choice(FACE_DEFECTS) if bad else "none"
        return Scene(a, rng.randrange(2**31), defect)

    def _biased_choice(
        self, rng: random.Random, name: str, choices: list[str], so_far: dict[str, str]
    ) -> str:
        for rule in self.config.cooccurrence:
            attribute, _, value = rule.then.partition("=")
            given, _, given_value = rule.given.partition("=")
            applies = attribute == name and value in choices and so_far.get(given) == given_value
            if applies and rng.random() < rule.probability:
                return value
        return rng.choice(choices)

    def render(self, scene: Scene) -> np.ndarray:
        size = self.config.image_size * _SUPERSAMPLE
        rng = random.Random(scene.layout_seed)
        a = scene.attributes
        image = Image.new("RGB", (size, size), self._jitter(self._rgb[a["background"]], rng))
        draw = ImageDraw.Draw(image)
        colour = self._jitter(self._rgb[a["colour"]], rng)
        if a["shape"] == "face":
            radius = size * rng.uniform(0.28, 0.36)
            centre = self._centre(rng, size, radius)
            _draw_face(draw, centre, radius, colour, scene.defect)
        elif a["container"] != "none":
            half = size * rng.uniform(0.3, 0.38)
            centre = self._centre(rng, size, half)
            wall = self._jitter(self._rgb[a["container_colour"]], rng)
            _draw_container(draw, a["container"], centre, half, wall)
            _draw_shape(draw, a["shape"], (centre[0], centre[1] + half * 0.1), half * 0.5, colour)
        else:
            count = int(a["count"])
            radius = size * (rng.uniform(0.2, 0.3) if count == 1 else rng.uniform(0.13, 0.17))
            for centre in self._spread(rng, size, radius, count):
                _draw_shape(draw, a["shape"], centre, radius, colour)
        small = image.resize((self.config.image_size,) * 2, Image.Resampling.BOX)
        return np.asarray(small, dtype=np.uint8)

    def _jitter(self, rgb: tuple[int, int, int], rng: random.Random) -> tuple[int, ...]:
        j = self.config.colour_jitter
        return tuple(min(255, max(0, c + rng.randint(-j, j))) for c in rgb)

    @staticmethod
    def _centre(rng: random.Random, size: int, radius: float) -> tuple[float, float]:
        margin = radius + size * 0.04
        return rng.uniform(margin, size - margin), rng.uniform(margin, size - margin)

    @staticmethod
    def _spread(
        rng: random.Random, size: int, radius: float, count: int
    ) -> list[tuple[float, float]]:
        """`count` centres whose shapes do not overlap (rejection sampling, then a fixed row)."""
        for _ in range(200):
            centres = [ShapesWorld._centre(rng, size, radius) for _ in range(count)]
            if all(
                np.hypot(p[0] - q[0], p[1] - q[1]) > 2.2 * radius
                for i, p in enumerate(centres)
                for q in centres[i + 1 :]
            ):
                return centres
        return [(size * (i + 1) / (count + 1), size / 2) for i in range(count)]


def _star_points(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    points = []
    for i in range(10):
        radius = r if i % 2 == 0 else r * 0.45
        angle = -np.pi / 2 + i * np.pi / 5
        points.append((cx + radius * np.cos(angle), cy + radius * np.sin(angle)))
    return points


def _draw_shape(draw, shape: str, centre, r: float, colour) -> None:
    cx, cy = centre
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        s = r * 0.85
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=colour)
    elif shape == "triangle":
        draw.polygon(
            [(cx, cy - r), (cx - r * 0.95, cy + r * 0.7), (cx + r * 0.95, cy + r * 0.7)],
            fill=colour,
        )
    elif shape == "star":
        draw.polygon(_star_points(cx, cy, r * 1.1), fill=colour)
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=max(1, round(r * 0.38)))
    else:
        raise ValueError(f"shape={shape!r}: expected one of {SHAPES}")


def _draw_container(draw, container: str, centre, half: float, colour) -> None:
    cx, cy = centre
    width = max(1, round(half * 0.16))
    left, top, right, bottom = cx - half, cy - half, cx + half, cy + half
    if container == "box":
        draw.rectangle((left, top, right, bottom), outline=colour, width=width)
    else:  # cup: open at the top, with a handle on the right
        draw.line([(left, top), (left, bottom), (right, bottom), (right, top)], colour, width)
        draw.arc((right - half * 0.3, cy - half * 0.4, right + half * 0.5, cy + half * 0.4),
                 -90, 90, fill=colour, width=width)  # fmt: skip


def _draw_face(draw, centre, r: float, colour, defect: str) -> None:
    cx, cy = centre
    ink = (15, 15, 15)
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    eye = r * 0.17
    eye_y = {"left": cy - r * 0.25, "right": cy - r * 0.25}
    if defect == "uneven_eyes":
        eye_y["right"] = cy + r * 0.35
    for side, dx in (("left", -0.38), ("right", 0.38)):
        if defect == "missing_eye" and side == "right":
            continue
        ex = cx + dx * r
        draw.ellipse((ex - eye, eye_y[side] - eye, ex + eye, eye_y[side] + eye), fill=ink)
    if defect == "no_mouth":
        return
    mouth_y = cy - r * 0.62 if defect == "mouth_on_top" else cy + r * 0.45
    draw.line([(cx - r * 0.4, mouth_y), (cx + r * 0.4, mouth_y)], ink, max(1, round(r * 0.14)))
