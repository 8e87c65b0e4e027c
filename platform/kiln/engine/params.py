"""What a request asks for (`SamplingParams`) and what it gets back (`RequestOutput`).

Field names follow vLLM's `SamplingParams` so serving code reads the same. Validation that needs
only the parameters happens at construction; checks that need the model (stop token ids against
the vocabulary) happen in `validate_for_model`, which the engine calls when a request arrives.
Both raise `ValueError` naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one request. temperature=0 is greedy decoding."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    stop: tuple[str, ...] | list[str] | None = None  # generation ends at (and trims) any of these
    stop_token_ids: tuple[int, ...] | list[int] | None = None  # kept in token_ids, like EOS
    seed: int | None = None  # reproducible sampling for this request alone
    ignore_eos: bool = False  # benchmarks: always generate max_tokens
    # Speculation for this request alone: None = the engine's setting, 0 = off, k = at most k
    # drafts per step, "smartspec" = the goodput controller (needs an engine built with it).
    speculation: int | Literal["smartspec"] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if self.speculation not in (None, "smartspec") and (
            not isinstance(self.speculation, int) or self.speculation < 0
        ):
            raise ValueError(
                f"speculation must be 'smartspec' or an integer k >= 0 (0 = off), "
                f"got {self.speculation!r}"
            )
        if isinstance(self.stop, str):
            raise ValueError(f"stop must be a list of strings, got the string {self.stop!r}")
        if self.stop is not None and not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must contain non-empty strings, got {self.stop!r}")
        # Normalise to tuples so params are hashable and safe to share between requests.
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def validate_for_model(self, vocab_size: int) -> None:
        unknown = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
        if unknown:
            raise ValueError(
                f"stop_token_ids {unknown} are not in the model's vocabulary (size {vocab_size})"
            )


@dataclass
class RequestOutput:
    """The state of one request after a step (or at the end, from `generate`)."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated so far
    text: str
    finished: bool
    finish_reason: FinishReason | None = None
    error: str | None = None  # set when finish_reason == "error"
    # Speculative decoding: draft tokens verified, accepted, and verification steps taken.
    spec_stats: dict[str, int] = field(
        default_factory=lambda: {"proposed": 0, "accepted": 0, "steps": 0}
    )
