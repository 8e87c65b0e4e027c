"""The contract between the serving engine and speculative decoding (proposers, SmartSpec).

The engine (`kiln.engine.engine.LLMEngine`) owns requests, the scheduler, the target model's
paged KV cache and its rollback. Speculation is a pluggable `Speculator` that the engine calls
at four points of every step (shape after vLLM v1's drafter/rejection-sampler split and the
SmartSpec controller, arXiv 2406.14066):

    k = speculator.choose_k(states)            # per-request proposal length, 0 = plain decode
    scheduler reserves k[rid] more KV slots (its `num_lookahead`) for each request it runs to
        its last token: a decoding request, or a prompt whose final chunk runs this step
    proposals = speculator.propose(states, k)  # draft tokens, len(proposal) <= k[rid]
    target forward over [new tokens, *draft tokens] -> logits at the last new token and at
        each draft (1 + len(draft) positions)
    tokens = speculator.verify(states, proposals, target_logits)
    engine appends tokens, rolls the target KV back past the accepted prefix, checks stops
    speculator.observe(StepStats(...))         # acceptance counts and measured step time
    speculator.free(rid)                       # request finished, aborted or preempted

`verify` must return, per request, the accepted prefix of the draft followed by exactly one
more token (the bonus token when every draft was accepted, else the token resampled from the
residual), so `1 <= len(tokens) <= len(draft) + 1` and `len(tokens) - 1` drafts were accepted.
Target probabilities must be computed with `kiln.engine.sampler.probs_from_logits` (the
request's temperature, top-k and top-p applied before the acceptance test); greedy requests
(temperature 0) accept a draft iff it equals the target argmax. Randomness must come from the
request's `generator` so seeded requests are reproducible.

The engine builds a speculator with `kiln.engine.spec_decode.make_speculator(config)` where
`config` is a `SpeculationConfig`; that module belongs to the speculation side. The engine then
calls `speculator.calibrate(runner, max_num_seqs)` once, before serving.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

import torch

if TYPE_CHECKING:
    from kiln.engine.model_runner import ModelRunner
    from kiln.engine.params import SamplingParams


@dataclass(frozen=True)
class SpecRequestState:
    """What speculation may read about one request whose last position the next step samples
    (a decoding request, or a prompt that ends this step); never mutate the lists."""

    request_id: str
    token_ids: list[int]  # prompt + generated; the last num_new_tokens are not in the KV cache
    num_prompt_tokens: int
    params: SamplingParams
    generator: torch.Generator  # the request's own RNG (seeded if params.seed is set)
    max_new_proposals: int  # engine limit: tokens left before max_tokens / model context, minus 1
    # Tokens that end the request (EOS unless ignore_eos, and params.stop_token_ids): a proposal
    # ends at one, since drafts after it could never be kept.
    stop_token_ids: frozenset[int] = frozenset()
    # Tokens the target runs for this request before any draft: 1 when decoding, the rest of
    # the prompt in the step that prefills it.
    num_new_tokens: int = 1


@dataclass
class Proposal:
    """Draft tokens for one request and, for a draft model, the distributions they came from.

    `probs` is [len(token_ids), vocab] (the draft's processed probabilities q_j) or None for a
    point-mass proposer such as n-gram prompt lookup.
    """

    token_ids: list[int]
    probs: torch.Tensor | None = None


@dataclass
class StepStats:
    """One engine step, reported to `Speculator.observe` after the step finished."""

    batch_size: int  # requests in the forward pass
    num_batched_tokens: int  # query tokens in the target forward (prefill chunks + decode + drafts)
    num_context_tokens: int  # KV tokens attended over, summed over requests
    # Per request, for the acceptance estimate: drafts up to and including the first rejected
    # one, and of those the accepted ones; both stop at a stop condition inside the drafts,
    # whose later drafts go unused.
    num_proposed: dict[str, int]
    num_accepted: dict[str, int]
    # Drafts each request verified this step, all of them: what the step's forwards cost.
    num_drafted: dict[str, int]
    num_generated_tokens: int  # tokens appended to requests this step (all requests)
    propose_time_s: float
    forward_time_s: float  # target forward + verification/sampling
    step_time_s: float  # whole step wall time
    # Requests that ended this step (freed): output length (stop token included), and whether a
    # stop condition ended it (False: max_tokens or the model's context did).
    finished: dict[str, tuple[int, bool]] = field(default_factory=dict)


@dataclass(frozen=True)
class SpeculationConfig:
    """Everything `make_speculator` gets from the engine."""

    proposer: Literal["draft", "ngram"]
    speculation: Literal["smartspec"] | int  # "smartspec" = adaptive, int = fixed k
    draft_model: str | None  # path of a Hugging Face checkpoint (proposer="draft")
    vocab_size: int
    max_model_len: int
    max_num_seqs: int
    block_size: int
    device: torch.device
    dtype: torch.dtype
    extra: dict = field(default_factory=dict)  # proposer-specific options, passed through


class Proposer(Protocol):
    """Guesses continuations; used by a Speculator (draft model, n-gram prompt lookup)."""

    def propose(self, requests: list[SpecRequestState], k: dict[str, int]) -> dict[str, Proposal]:
        """Up to k[rid] draft tokens for each request in `requests` (missing = no proposal)."""
        ...

    def free(self, request_id: str) -> None:
        """Drop any per-request state (e.g. the draft model's KV cache)."""
        ...


class Speculator(Protocol):
    """Chooses proposal lengths, proposes, verifies losslessly, and learns from outcomes."""

    def calibrate(self, runner: ModelRunner, max_num_seqs: int) -> None:
        """Called once by the engine before serving, with the target's runner (e.g. to profile
        step times). The KV cache is empty then; whatever is written into it is discarded."""
        ...

    def choose_k(self, requests: list[SpecRequestState]) -> dict[str, int]:
        """Proposal length per request; 0 (or a missing id) means no drafts.

        The engine clips each value to `max_new_proposals` and to the step's token budget.
        """
        ...

    def propose(self, requests: list[SpecRequestState], k: dict[str, int]) -> dict[str, Proposal]:
        """Draft tokens for the requests with k[rid] > 0 (len(token_ids) <= k[rid])."""
        ...

    def verify(
        self,
        requests: list[SpecRequestState],
        proposals: dict[str, Proposal],
        target_logits: dict[str, torch.Tensor],
    ) -> dict[str, list[int]]:
        """Tokens to append per request: accepted drafts + one bonus/resampled token.

        target_logits[rid] is [len(proposals[rid].token_ids) + 1, vocab], raw (unprocessed)
        logits of the target model at the positions of the last token and of each draft.
        """
        ...

    def observe(self, stats: StepStats) -> None:
        """Feedback after each step (acceptance counts, measured times)."""
        ...

    def free(self, request_id: str) -> None:
        """The request finished, was aborted or was preempted: drop its per-request state."""
        ...
