"""The classifier app: `POST /v1/classify/{model}` for every model in its config.

Images come as base64 PNG strings or nested arrays ([height][width] or [channels][height]
[width]) of intensities in [0, 1]; both are scaled to the models' [-1, 1] and must have the
model's exact shape. The answer per image: class probabilities, the most likely label, and the
model's own extras (`actors.classifier`).
"""

import base64
import binascii
import io
import threading
from typing import Annotated, Literal

import torch
from fastapi import FastAPI
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from actors.classifier import CLASSIFIERS, Classifier
from kiln.config import Section
from serve.common import error_response, protect, resolve

MAX_IMAGES = 64
Pixels = Annotated[float, Field(ge=0, le=1)]
ImageInput = str | list[list[Pixels]] | list[list[list[Pixels]]]


class ClassifierModelConfig(Section):
    kind: Literal["snn", "gp"] = Field(description="A key of actors.classifier.CLASSIFIERS.")
    path: str = Field(description="Fitted model folder; relative paths start at the repository.")
    options: dict = Field({}, description="Keyword arguments of the classifier's loader.")


class ClassifierAppConfig(Section):
    """`args` of the classifier application in serve/config.yaml."""

    models: dict[str, ClassifierModelConfig] = Field(min_length=1, description="Name -> model.")
    torch_threads: int | None = Field(None, ge=1, description="Intra-op threads cap.")
    max_body_bytes: int = Field(4 << 20, ge=1024, description="Larger bodies get 413.")


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)

    images: list[ImageInput] = Field(
        min_length=1,
        max_length=MAX_IMAGES,
        description="Base64 PNGs or nested arrays of intensities in [0, 1].",
    )


class BadImage(Exception):
    """An image that cannot be decoded or has the wrong shape (answered with a 4xx)."""


def _to_tensor(image: ImageInput, shape: tuple[int, int, int], index: int) -> torch.Tensor:
    """One image as a [channels, height, width] tensor in [0, 1], or BadImage saying why."""
    expected = "x".join(map(str, shape))
    if isinstance(image, str):
        try:
            png = io.BytesIO(base64.b64decode(image, validate=True))
            decoded = Image.open(png, formats=["PNG"])
            width, height = decoded.size
            if (height, width) != shape[1:]:  # checked before decoding: no decompression bombs
                raise BadImage(f"images[{index}]: expected {expected}, got a {width}x{height} PNG")
            decoded.load()
        except (binascii.Error, UnidentifiedImageError, OSError, ValueError) as error:
            raise BadImage(f"images[{index}]: not a base64-encoded PNG ({error})") from None
        decoded = decoded.convert("L" if shape[0] == 1 else "RGB")
        pixels = torch.tensor(list(decoded.getdata()), dtype=torch.float32) / 255
        tensor = pixels.reshape(decoded.height, decoded.width, -1).permute(2, 0, 1)
    else:
        try:
            tensor = torch.tensor(image, dtype=torch.float32)
        except ValueError:
            raise BadImage(f"images[{index}]: rows of different lengths") from None
        if tensor.dim() == 2:
            tensor = tensor[None]
    if tuple(tensor.shape) != shape:
        got = "x".join(map(str, tensor.shape))
        raise BadImage(
            f"images[{index}]: expected {expected} (channels x height x width), got {got}"
        )
    return tensor


# Last in the module: serve.ingress captures the module's globals as they are here.
app = FastAPI(title="kiln classifiers")


@serve.deployment(name="Classifiers")
@serve.ingress(app)
class Classifiers:
    def __init__(self, config: ClassifierAppConfig):
        protect(app, config.max_body_bytes)
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        self.models: dict[str, Classifier] = {
            name: CLASSIFIERS[model.kind](resolve(model.path), **model.options)
            for name, model in config.models.items()
        }
        # Requests run on FastAPI's thread pool, and a model may keep state between calls (the
        # SNN's membrane potentials): one call at a time per model.
        self.locks = {name: threading.Lock() for name in self.models}

    @app.get("/health")
    def health(self) -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    def ready(self) -> dict:
        return {"status": "ready", "models": sorted(self.models)}

    @app.post("/{model}")
    def classify(self, model: str, body: ClassifyRequest):
        classifier = self.models.get(model)
        if classifier is None:
            message = f"model: {model!r} is not served here; choose one of {sorted(self.models)}"
            return error_response(404, message, "model")
        try:
            images = torch.stack(
                [
                    _to_tensor(image, classifier.input_shape, i)
                    for i, image in enumerate(body.images)
                ]
            )
        except BadImage as error:
            return error_response(400, str(error), "images")
        with self.locks[model], torch.no_grad():
            result = classifier.classify(images * 2 - 1)
        predictions = [
            {"label": int(p.argmax()), "probabilities": p.tolist()}
            | {name: values[i] for name, values in result.per_image.items()}
            for i, p in enumerate(result.probabilities)
        ]
        return {"model": model, "predictions": predictions, "extras": result.per_batch}


def build_app(args: dict) -> serve.Application:
    """The application `serve/config.yaml` names (`import_path: serve.classify:build_app`)."""
    return Classifiers.bind(ClassifierAppConfig.model_validate(args))
