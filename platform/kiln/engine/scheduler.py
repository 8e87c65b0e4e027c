"""Continuous batching: which requests run this step, and how many tokens each.

Shape after vLLM v1's scheduler (and nano-vllm's): there is no separate prefill or decode
phase. Each request has `num_computed_tokens` (tokens whose KV is in the cache) and
`num_tokens` (prompt + generated); every step gives each request up to
`num_tokens - num_computed_tokens` new tokens under a shared per-step token budget. A prompt
longer than the budget is therefore prefilled in chunks over several steps (chunked prefill,
Agrawal et al. "Sarathi", arXiv 2308.16369), and decodes (1 token, plus any speculative
lookahead) ride in the same forward as prefill chunks. A prompt's final chunk may carry a
lookahead too: its last position is sampled like a decode's, so drafts can be verified in the
step that prefills it.

Policy: first come, first served. Running requests are served in arrival order before any
waiting request is admitted. When the KV cache has no block for a running request, the most
recently arrived running request is preempted by recompute: its blocks are freed and it goes
back to the front of the waiting queue with prompt + generated tokens, to be prefilled again
later (vLLM's default "recompute" preemption; swapping to host memory is not implemented).
Waiting requests are admitted strictly in order: one that does not fit blocks those behind it.
"""

from __future__ import annotations

import bisect
import itertools
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

import torch

from kiln.engine.block_manager import BlockManager
from kiln.engine.params import FinishReason, SamplingParams


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    """A request's mutable state inside the engine."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    arrival: int  # FCFS order; also the preemption priority (latest arrival goes first)
    token_ids: list[int] = field(default_factory=list)  # prompt + generated
    num_computed_tokens: int = 0
    status: Status = Status.WAITING
    finish_reason: FinishReason | None = None
    error: str | None = None
    text: str = ""
    spec_stats: dict[str, int] = field(
        default_factory=lambda: {"proposed": 0, "accepted": 0, "steps": 0}
    )

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens not in the KV cache yet: 1 when decoding, more for a prompt (or a preempted
        request's recompute) still to prefill."""
        return self.num_tokens - self.num_computed_tokens


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # run token_ids[num_computed : num_computed + num_new_tokens]
    num_lookahead: int  # extra KV slots reserved after them for speculative draft tokens

    @property
    def completes_prompt(self) -> bool:
        """After this step the request is up to date, so its last position is sampled."""
        req = self.request
        return req.num_computed_tokens + self.num_new_tokens == req.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    preempted: list[str]  # request ids whose KV was dropped this step (recompute later)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens + s.num_lookahead for s in self.scheduled)


class SchedulingPolicy(Protocol):
    """What the engine needs from a scheduler; `Scheduler` below is the FCFS implementation."""

    def add(self, request: Request) -> None:
        """Queue a validated request."""
        ...

    def ready_to_sample(self) -> list[Request]:
        """The requests the next `schedule` would run to their last token (decoding, or ending
        their prompt), whose last position is then sampled, so they may verify drafts: a
        preview without lookahead, in scheduling order."""
        ...

    def schedule(self, lookahead: dict[str, int]) -> SchedulerOutput:
        """Pick this step's work, reserving KV slots for it (and `lookahead[rid]` draft slots
        for requests it runs to their last token, dropped before anyone is preempted for
        them)."""
        ...

    def finish(self, request: Request) -> None:
        """Remove a finished or aborted request and free its blocks."""
        ...

    def has_unfinished(self) -> bool: ...


class Scheduler:
    """FCFS continuous batching with chunked prefill and preemption by recompute."""

    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        if max_num_seqs <= 0 or max_num_batched_tokens <= 0:
            raise ValueError(
                f"max_num_seqs={max_num_seqs} and max_num_batched_tokens="
                f"{max_num_batched_tokens} must be > 0"
            )
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # kept in arrival order
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, request: Request) -> None:
        if request.status is Status.RUNNING:
            self.running.remove(request)
        elif request.status is Status.WAITING:
            self.waiting.remove(request)
        request.status = Status.FINISHED
        self.block_manager.free(request.request_id)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.block_manager.free(request.request_id)
        request.num_computed_tokens = 0
        request.status = Status.WAITING
        self.waiting.appendleft(request)
        self.num_preemptions += 1

    def ready_to_sample(self) -> list[Request]:
        budget, ready = self.max_num_batched_tokens, []
        admitted = max(0, self.max_num_seqs - len(self.running))
        for req in itertools.chain(self.running, itertools.islice(self.waiting, admitted)):
            budget -= req.num_uncomputed_tokens
            if budget < 0:  # a partial chunk, and nothing after it runs
                break
            ready.append(req)
        return ready

    def _lookahead(self, req: Request, num_new: int, budget: int, lookahead: dict[str, int]) -> int:
        """Draft slots for a request whose chunk reaches its last token (its last position is
        sampled, so drafts can be verified: a decode, or the prompt's final chunk)."""
        if num_new < req.num_uncomputed_tokens:
            return 0
        return min(lookahead.get(req.request_id, 0), budget - num_new)

    def schedule(self, lookahead: dict[str, int]) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[str] = []
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_uncomputed_tokens, budget)
            num_lookahead = self._lookahead(req, num_new, budget, lookahead)
            while not self.block_manager.allocate(req.request_id, num_new + num_lookahead):
                if num_lookahead:  # give up speculation before evicting anyone
                    num_lookahead = 0
                    continue
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is req:
                    break
            if req.status is Status.WAITING:  # preempted itself: nothing else can run
                break
            scheduled.append(ScheduledRequest(req, num_new, num_lookahead))
            budget -= num_new + num_lookahead
            i += 1

        # Admit new work only when the cache is not under pressure (nobody was just evicted).
        while not preempted and self.waiting and budget > 0:
            if len(self.running) >= self.max_num_seqs:
                break
            req = self.waiting[0]
            num_new = min(req.num_uncomputed_tokens, budget)
            num_lookahead = self._lookahead(req, num_new, budget, lookahead)
            if not self.block_manager.allocate(req.request_id, num_new + num_lookahead):
                num_lookahead = 0  # as above: speculation goes first
                if not self.block_manager.allocate(req.request_id, num_new):
                    break
            self.waiting.popleft()
            req.status = Status.RUNNING
            bisect.insort(self.running, req, key=lambda r: r.arrival)
            scheduled.append(ScheduledRequest(req, num_new, num_lookahead))
            budget -= num_new + num_lookahead
        return SchedulerOutput(scheduled, preempted)
