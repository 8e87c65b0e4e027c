"""Job configuration: pydantic models with presets, YAML files and `--set` overrides.

Precedence, lowest first: class defaults < named preset < YAML file < `--set key.sub=value`.
Every field carries a description; unknown keys, wrong types, bad paths and impossible
combinations raise `ConfigError` naming the field, the value and what was expected, before any
Ray worker starts.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the field and what was expected."""


class Section(BaseModel):
    """Base of every config block: unknown keys are errors, never silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


class RunnerConfig(Section):
    """How the shared Ray Train + DeepSpeed runner executes a job."""

    num_workers: int = Field(2, ge=1, description="Ray Train workers (data-parallel ranks).")
    use_gpu: bool = Field(False, description="One GPU per worker and NCCL; CPU workers use gloo.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs Ray reserves for each worker.")
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage (0 = plain DDP).")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Training precision.")
    offload_optimizer: bool = Field(
        False, description="ZeRO-Offload: keep optimizer states in CPU memory (stage >= 1)."
    )
    offload_params: bool = Field(
        False, description="ZeRO-Infinity: keep parameters in CPU memory (stage 3 only)."
    )
    micro_batch_size: int = Field(16, ge=1, description="Sequences per worker per forward.")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    grad_clip: float = Field(1.0, ge=0, description="Global gradient-norm clip (0 = off).")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps before cosine decay.")
    max_steps: int = Field(100, ge=1, description="Optimizer steps to train for.")
    log_every: int = Field(10, ge=1, description="Steps between metrics.jsonl / TensorBoard rows.")
    checkpoint_every: int = Field(
        0, ge=0, description="Steps between checkpoints (0 = only the final one)."
    )
    keep_checkpoints: int = Field(2, ge=1, description="Most recent checkpoints kept on disk.")
    max_failures: int = Field(
        1, ge=-1, description="Worker failures Ray Train recovers from (-1 = unlimited)."
    )
    worker_start_timeout_s: float = Field(
        600,
        gt=0,
        description="How long Ray Train waits for the worker group to start (its default, 60 s, "
        "is too short for workers importing torch and DeepSpeed on a busy small machine).",
    )
    seed: int = Field(0, description="Seed for initialisation and the data order.")
    resume_from: Path | None = Field(
        None,
        description="Checkpoint folder of another run (checkpoints/step_*) to start from; a run "
        "re-launched with the same --output resumes its own latest checkpoint without this.",
    )

    @field_validator("resume_from")
    @classmethod
    def _checkpoint_exists(cls, path: Path | None) -> Path | None:
        if path is None:
            return None
        if not (path / "kiln_state.json").is_file():
            raise ValueError(
                f"expected a kiln checkpoint folder (with kiln_state.json), got {str(path)!r}"
                + ("" if path.exists() else ", which does not exist")
            )
        # Absolute, because the workers validate the config again from another directory.
        return path.resolve()

    @model_validator(mode="after")
    def _zero_options_fit_the_stage(self) -> RunnerConfig:
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(
                f"offload_params=True needs zero_stage=3 (got zero_stage={self.zero_stage}): "
                "only ZeRO-3 partitions parameters"
            )
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer=True needs zero_stage >= 1 (got zero_stage=0)")
        if self.precision == "fp16" and not self.use_gpu:
            raise ValueError("precision='fp16' needs use_gpu=True; use 'bf16' or 'fp32' on CPU")
        return self

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.num_workers


class JobConfig(Section):
    """Base of every job's config: a `runner` block plus the job's own fields.

    Subclasses list named presets in `presets` as nested override dicts.
    """

    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    runner: RunnerConfig = Field(default_factory=RunnerConfig, description="Runner settings.")

    def fingerprint(self) -> str:
        """Stable hash of everything that determines the result (used to cache base models)."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


C = TypeVar("C", bound=JobConfig)


def describe_fields(cls: type[BaseModel], prefix: str = "") -> list[str]:
    """One line per leaf field: `key.sub (default): description`, for `--help`."""
    lines = []
    for name, field in cls.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            lines += describe_fields(annotation, f"{prefix}{name}.")
        else:
            default = field.get_default(call_default_factory=True)
            lines.append(f"  {prefix}{name} (default {default!r}): {field.description}")
    return lines


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _parse_override(text: str) -> dict:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected key.sub=value")
    value = yaml.safe_load(raw) if raw.strip() else None
    for part in reversed(key.strip().split(".")):
        value = {part: value}
    return value


def _allowed_keys(cls: type[BaseModel], loc: tuple) -> list[str]:
    model = cls
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return sorted(model.model_fields)


def _describe(cls: type[BaseModel], error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        loc = tuple(item["loc"])
        name = ".".join(str(part) for part in loc) or "<config>"
        if item["type"] == "extra_forbidden":
            allowed = ", ".join(_allowed_keys(cls, loc))
            lines.append(f"{name}: unknown key (expected one of: {allowed})")
        elif item["type"] == "missing":
            lines.append(f"{name}: required field is missing")
        else:
            message = item["msg"].removeprefix("Value error, ")
            got = item.get("input")
            lines.append(
                f"{name}: {message}" if isinstance(got, dict) else f"{name}={got!r}: {message}"
            )
    return f"invalid {cls.__name__}:\n  " + "\n  ".join(lines)


def load_config(
    cls: type[C],
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> C:
    """Resolve a job config: defaults < preset < YAML file < overrides ("a.b=value")."""
    # Start from the dumped defaults, so a partial override of a section keeps the values its
    # default_factory gave the rest of it (not the section class's own defaults).
    data: dict[str, Any] = cls().model_dump(mode="json")
    if preset is not None:
        if preset not in cls.presets:
            raise ConfigError(
                f"preset={preset!r}: unknown preset for {cls.__name__} "
                f"(expected one of: {', '.join(sorted(cls.presets)) or 'none defined'})"
            )
        data = _merge(data, cls.presets[preset])
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"--config {str(path)!r}: file does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config {str(path)!r}: expected a YAML mapping at the top level")
        data = _merge(data, loaded)
    for text in overrides:
        data = _merge(data, _parse_override(text))
    try:
        return cls.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_describe(cls, error)) from None
