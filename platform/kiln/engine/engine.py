"""`LLMEngine`: continuous-batching inference over a paged KV cache, with pluggable speculation.

One `step()` = schedule (which requests, how many tokens each) -> optional speculative proposal
-> one forward pass over every scheduled token -> sample (or verify drafts) -> append tokens,
roll the KV cache back past rejected drafts, check stop conditions, free finished requests.
This is the loop of vLLM's v1 `EngineCore.step` and nano-vllm's `LLMEngine.step`, on top of
`Scheduler` (FCFS, chunked prefill, preemption by recompute), `BlockManager` (free list, block
tables) and `ModelRunner` (the HF checkpoint's weights over the paged cache).

Bad input never breaks the engine: a request with an empty prompt, a prompt at least as long
as the model context (or larger than the whole KV cache), token ids outside the vocabulary,
invalid sampling parameters (passed as a dict) or stop token ids outside the vocabulary
finishes at the next step with `finish_reason="error"` and a message; other requests go on.
`add_request` raises `ValueError` only for programming errors (a duplicate request id, a
prompt that is neither text nor token ids).

The model context is the checkpoint's `max_position_embeddings` unless `max_model_len` caps it
(vLLM's option of that name): the draft's cache, SmartSpec's start-up profile and the CUDA
graphs' key padding all follow it. Stop tokens are generation_config.json's EOS ids, as for HF
`generate`.

Speculation (`proposer="draft"|"ngram"`) is delegated to a `Speculator` from
`kiln.engine.spec_decode` (see `kiln.engine.speculation_api` for the contract); the engine
reserves the lookahead slots, runs verification inside the same forward, and rolls back.
Drafts go wherever the step samples a request's last position: decoding requests, and prompts
whose final chunk runs, so a request's first step can already emit up to k + 1 tokens. Why:
outputs here are short (most end after 3-12 tokens), and a request drafting from its second
step on spent one of its 3-4 steps on a single token (BENCHMARKS.md, SmartSpec, 2026-12-07).
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kiln.engine.block_manager import BlockManager
from kiln.engine.model_runner import ForwardInput, ModelRunner, kv_bytes_per_block
from kiln.engine.params import RequestOutput, SamplingParams
from kiln.engine.sampler import sample
from kiln.engine.scheduler import Request, ScheduledRequest, Scheduler
from kiln.engine.speculation_api import (
    Proposal,
    SpecRequestState,
    SpeculationConfig,
    Speculator,
    StepStats,
)

CPU_KV_CACHE_BYTES = 1 << 30  # default KV budget on CPU (pages are only touched when used)
GPU_MEMORY_UTILIZATION = 0.9  # fraction of free GPU memory (after loading) given to the cache

Prompt = str | Sequence[int]


class LLMEngine:
    def __init__(
        self,
        model: str | Path,
        draft_model: str | Path | None = None,
        proposer: str = "none",
        speculation: str | int = "smartspec",
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 512,
        block_size: int = 16,
        num_blocks: int | None = None,
        kv_cache_bytes: int | None = None,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        attention: str | None = None,
        cuda_graphs: bool | None = None,
        seed: int = 0,
        max_model_len: int | None = None,
    ):
        if proposer not in ("none", "draft", "ngram"):
            raise ValueError(f"proposer must be 'none', 'draft' or 'ngram', got {proposer!r}")
        if proposer == "draft" and draft_model is None:
            raise ValueError("proposer='draft' needs draft_model=PATH")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        on_gpu = self.device.type == "cuda"
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        self.dtype = dtype or (torch.bfloat16 if on_gpu else torch.float32)
        hf_model = AutoModelForCausalLM.from_pretrained(model, dtype=self.dtype).to(self.device)
        self.config = hf_model.config
        self.tokenizer = _load_tokenizer(model)
        self.vocab_size = self.config.vocab_size
        longest = self.config.max_position_embeddings
        if max_model_len is not None and not 2 <= max_model_len <= longest:
            raise ValueError(
                f"max_model_len={max_model_len}: expected 2..{longest} (the model's "
                "max_position_embeddings)"
            )
        # A long-context checkpoint (Llama 3.1: 131072) sized at its full context would size the
        # draft's cache and SmartSpec's start-up profile for that context too.
        self.max_model_len = max_model_len or longest
        # HF `generate` stops at generation_config.json's EOS ids (Llama 3 Instruct lists several
        # there, beyond config.json's); without that file they come from the config.
        eos = hf_model.generation_config.eos_token_id
        self.eos_token_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])

        if num_blocks is None:
            num_blocks = self._auto_num_blocks(kv_cache_bytes, block_size, max_num_seqs)
        self.block_manager = BlockManager(num_blocks, block_size)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens)
        self.runner = ModelRunner(
            hf_model,
            num_blocks,
            block_size,
            attention=attention or ("flex" if on_gpu else "sdpa"),
            cuda_graphs=on_gpu if cuda_graphs is None else cuda_graphs,
            max_model_len=self.max_model_len,
        )
        self.speculator: Speculator | None = None
        if proposer != "none":
            from kiln.engine.spec_decode import make_speculator

            self.speculator = make_speculator(
                SpeculationConfig(
                    proposer=proposer,
                    speculation=speculation,
                    draft_model=None if draft_model is None else str(draft_model),
                    vocab_size=self.vocab_size,
                    max_model_len=self.max_model_len,
                    max_num_seqs=max_num_seqs,
                    block_size=block_size,
                    device=self.device,
                    dtype=self.dtype,
                )
            )
            self.speculator.calibrate(self.runner, max_num_seqs)
        self.requests: dict[str, Request] = {}
        self._pending: list[RequestOutput] = []  # outputs to emit at the next step (errors, aborts)
        self._arrivals = itertools.count()
        self._ids = itertools.count()
        self._rng = random.Random(seed)  # seeds the generators of unseeded requests
        self._queues: dict[str, asyncio.Queue] = {}
        self._driver: asyncio.Task | None = None
        self.last_step_stats: StepStats | None = None

    def _auto_num_blocks(self, budget: int | None, block_size: int, max_num_seqs: int) -> int:
        if budget is None and self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * GPU_MEMORY_UTILIZATION)
        budget = budget or CPU_KV_CACHE_BYTES
        fits = budget // kv_bytes_per_block(self.config, block_size, self.dtype)
        # More than every sequence at full context would never be used.
        useful = max_num_seqs * -(-self.max_model_len // block_size)
        return max(1, min(fits, useful))

    # ---- requests in ----

    def add_request(
        self, request_id: str, prompt: Prompt, params: SamplingParams | Mapping
    ) -> None:
        """Queue a request; invalid input turns into an "error" output at the next step."""
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        token_ids = self._tokenize(prompt)
        try:
            if isinstance(params, Mapping):
                params = SamplingParams(**params)
            self._validate(token_ids, params)
        except (ValueError, TypeError) as error:
            self._pending.append(
                RequestOutput(request_id, token_ids, [], "", True, "error", str(error))
            )
            return
        seed = params.seed if params.seed is not None else self._rng.randrange(2**63)
        generator = torch.Generator(self.device).manual_seed(seed)
        request = Request(request_id, token_ids, params, generator, next(self._arrivals))
        self.requests[request_id] = request
        self.scheduler.add(request)

    def _tokenize(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this checkpoint has no tokenizer: pass prompts as token ids")
            return self.tokenizer(prompt).input_ids
        if not all(isinstance(t, int) for t in prompt):
            raise ValueError("a prompt must be a string or a sequence of int token ids")
        return list(prompt)

    def _validate(self, token_ids: list[int], params: SamplingParams) -> None:
        if not token_ids:
            raise ValueError("the prompt is empty")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(token_ids)} tokens; the model context is "
                f"{self.max_model_len}, so at most {self.max_model_len - 1} leave room to generate"
            )
        unknown = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if unknown:
            raise ValueError(
                f"prompt token ids {unknown[:5]} are not in the vocabulary [0, {self.vocab_size})"
            )
        capacity = self.block_manager.num_blocks * self.block_manager.block_size
        if len(token_ids) + 1 > capacity:
            raise ValueError(f"the prompt needs more than the whole KV cache ({capacity} tokens)")
        params.validate_for_model(self.vocab_size)
        if params.speculation not in (None, 0) and self.speculator is None:
            raise ValueError(f"speculation={params.speculation!r} needs an engine with a proposer")
        if params.speculation == "smartspec" and self.speculator.fixed_k is not None:
            raise ValueError("speculation='smartspec' needs an engine built with SmartSpec")

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its blocks; its final output comes from the next step."""
        request = self.requests.get(request_id)
        if request is None:
            return
        self._finish(request, "abort")
        self._pending.append(self._output(request))

    def has_unfinished_requests(self) -> bool:
        return bool(self._pending) or self.scheduler.has_unfinished()

    # ---- the step ----

    def step(self) -> list[RequestOutput]:
        """Run one engine iteration; returns outputs of requests that progressed or finished."""
        step_start = time.perf_counter()
        outputs, self._pending = self._pending, []
        lookahead: dict[str, int] = {}
        ready: dict[str, SpecRequestState] = {}
        if self.speculator is not None:
            # Decoding requests and prompts that end this step: both sample their last position.
            ready = {r.request_id: self._spec_state(r) for r in self.scheduler.ready_to_sample()}
            chosen = self.speculator.choose_k(list(ready.values())) if ready else {}
            lookahead = {
                rid: max(0, min(k, ready[rid].max_new_proposals)) for rid, k in chosen.items() if k
            }
        plan = self.scheduler.schedule(lookahead)
        for rid in plan.preempted:
            if self.speculator is not None:
                self.speculator.free(rid)
        if not plan.scheduled:
            return outputs

        propose_start = time.perf_counter()
        proposals, states = self._propose(plan.scheduled, ready)
        forward_start = time.perf_counter()
        batch = []
        for s in plan.scheduled:
            req = s.request
            drafts = proposals[req.request_id].token_ids if req.request_id in proposals else []
            start = req.num_computed_tokens
            batch.append(
                ForwardInput(
                    token_ids=req.token_ids[start : start + s.num_new_tokens] + drafts,
                    start_pos=start,
                    block_table=self.block_manager.block_table(req.request_id),
                    num_logits=1 + len(drafts) if s.completes_prompt else 0,
                )
            )
        logits = self.runner.execute(batch)
        new_tokens = self._next_tokens(plan.scheduled, logits, proposals, states)
        forward_time = time.perf_counter() - forward_start

        num_proposed, num_accepted, num_generated, finished = {}, {}, 0, {}
        for s in plan.scheduled:
            req, rid = s.request, s.request.request_id
            req.num_computed_tokens += s.num_new_tokens
            tokens = new_tokens.get(rid, [])
            if rid in proposals:
                accepted = len(tokens) - 1  # the contract: accepted drafts + one more token
                req.num_computed_tokens += accepted  # their KV was written by this forward
            held = self.block_manager.num_slots[rid]
            self.block_manager.rollback(rid, held - req.num_computed_tokens)
            kept = self._append(req, tokens)
            num_generated += kept
            if req.finish_reason is not None:
                finished[rid] = (len(req.output_token_ids), req.finish_reason == "stop")
            if rid in proposals:
                # A stop condition inside the accepted drafts ends the request there: the drafts
                # after it were never needed, so the estimator sees the drafts up to the stop
                # (no rejection: the verifier rejected none), and only kept tokens count as
                # generated and accepted. spec_stats still counts every proposal.
                num_proposed[rid] = min(len(proposals[rid].token_ids), kept)
                num_accepted[rid] = min(accepted, kept)
                req.spec_stats["proposed"] += len(proposals[rid].token_ids)
                req.spec_stats["accepted"] += num_accepted[rid]
                req.spec_stats["steps"] += 1
            if tokens:
                outputs.append(self._output(req))
        if self.speculator is not None:
            step_time = time.perf_counter() - step_start
            self.last_step_stats = StepStats(
                batch_size=len(batch),
                num_batched_tokens=sum(len(b.token_ids) for b in batch),
                num_context_tokens=sum(b.start_pos + len(b.token_ids) for b in batch),
                num_proposed=num_proposed,
                num_accepted=num_accepted,
                num_drafted={rid: len(p.token_ids) for rid, p in proposals.items()},
                num_generated_tokens=num_generated,
                finished=finished,
                propose_time_s=forward_start - propose_start,
                forward_time_s=forward_time,
                step_time_s=step_time,
            )
            self.speculator.observe(self.last_step_stats)
        return outputs

    def _spec_state(self, req: Request) -> SpecRequestState:
        left = min(
            req.params.max_tokens - len(req.output_token_ids), self.max_model_len - req.num_tokens
        )
        return SpecRequestState(
            request_id=req.request_id,
            token_ids=req.token_ids,
            num_prompt_tokens=len(req.prompt_token_ids),
            num_new_tokens=req.num_uncomputed_tokens,
            params=req.params,
            generator=req.generator,
            max_new_proposals=max(0, left - 1),
            stop_token_ids=frozenset(req.params.stop_token_ids).union(
                () if req.params.ignore_eos else self.eos_token_ids
            ),
        )

    def _propose(self, scheduled: list[ScheduledRequest], ready: dict[str, SpecRequestState]):
        """Drafts for the requests given lookahead slots; `ready` holds their states (built for
        choose_k this step: scheduling changes none of them)."""
        wanted = {s.request.request_id: s.num_lookahead for s in scheduled if s.num_lookahead}
        if not wanted:
            return {}, {}
        states = {rid: ready[rid] for rid in wanted}
        proposals = self.speculator.propose(list(states.values()), wanted)
        # Never run more drafts than slots were reserved for; empty proposals are plain decodes.
        proposals = {
            rid: Proposal(
                p.token_ids[: wanted[rid]], None if p.probs is None else p.probs[: wanted[rid]]
            )
            for rid, p in proposals.items()
            if rid in wanted and p.token_ids
        }
        return proposals, states

    def _next_tokens(self, scheduled, logits, proposals, states) -> dict[str, list[int]]:
        plain = [
            (s.request, rows)
            for s, rows in zip(scheduled, logits)
            if s.completes_prompt and s.request.request_id not in proposals
        ]
        new_tokens: dict[str, list[int]] = {}
        if plain:
            tokens, _ = sample(
                [rows for _, rows in plain],
                [req.params for req, _ in plain],
                [req.generator for req, _ in plain],
            )
            new_tokens = {req.request_id: [t] for (req, _), t in zip(plain, tokens)}
        if proposals:
            target = {
                s.request.request_id: rows
                for s, rows in zip(scheduled, logits)
                if s.request.request_id in proposals
            }
            verified = self.speculator.verify([states[rid] for rid in proposals], proposals, target)
            for rid, tokens in verified.items():
                if not 1 <= len(tokens) <= len(proposals[rid].token_ids) + 1:
                    raise RuntimeError(f"verify returned {len(tokens)} tokens for {rid!r}")
                new_tokens[rid] = list(tokens)
        return new_tokens

    # ---- requests out ----

    def _append(self, req: Request, tokens: list[int]) -> int:
        """Append tokens one by one, stopping at the first stop condition; returns how many
        were appended (the rest are dropped)."""
        params = req.params
        for appended, token in enumerate(tokens, 1):
            req.token_ids.append(token)
            eos = token in self.eos_token_ids and not params.ignore_eos
            if (
                token in params.stop_token_ids
                or eos
                or (params.stop and self._hit_stop_string(req))
            ):
                self._finish(req, "stop")
                return appended
            if (
                len(req.output_token_ids) >= params.max_tokens
                or req.num_tokens >= self.max_model_len
            ):
                self._finish(req, "length")
                return appended
        return len(tokens)

    def _hit_stop_string(self, req: Request) -> bool:
        text = self._detokenize(req.output_token_ids)
        hits = [i for i in (text.find(s) for s in req.params.stop) if i >= 0]
        if hits:
            req.text = text[: min(hits)]  # trimmed: the stop string is not part of the output
        return bool(hits)

    def _finish(self, req: Request, reason: str) -> None:
        req.finish_reason = reason
        if reason != "stop" or not req.params.stop or not req.text:
            req.text = self._detokenize(req.output_token_ids)
        self.scheduler.finish(req)
        del self.requests[req.request_id]
        if self.speculator is not None:
            self.speculator.free(req.request_id)

    def _detokenize(self, token_ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def _output(self, req: Request) -> RequestOutput:
        finished = req.finish_reason is not None
        return RequestOutput(
            request_id=req.request_id,
            prompt_token_ids=req.prompt_token_ids,
            token_ids=list(req.output_token_ids),
            text=req.text if finished else self._detokenize(req.output_token_ids),
            finished=finished,
            finish_reason=req.finish_reason,
            spec_stats=dict(req.spec_stats),
        )

    # ---- offline and streaming front ends ----

    def generate(
        self,
        prompts: Sequence[Prompt] | Prompt,
        params: SamplingParams | Mapping | Sequence[SamplingParams | Mapping] | None = None,
    ) -> list[RequestOutput]:
        """Run prompts to completion; outputs in prompt order (one prompt -> a list of one)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = SamplingParams() if params is None else params
        if isinstance(params, SamplingParams | Mapping):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        batch_id = next(self._ids)
        ids = [f"generate-{batch_id}-{i}" for i in range(len(prompts))]
        for rid, prompt, p in zip(ids, prompts, params):
            self.add_request(rid, prompt, p)
        final: dict[str, RequestOutput] = {}
        while len(final) < len(ids):
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[rid] for rid in ids]

    async def stream(
        self, prompt: Prompt, params: SamplingParams | Mapping, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Yield a request's output after every step it progresses; the last one is finished.

        Concurrent streams share one driver task that calls `step()` and hands each output to
        its stream, yielding to the event loop between steps. Leaving the loop early aborts.
        """
        rid = request_id or f"stream-{next(self._ids)}"
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._queues[rid] = queue
        self.add_request(rid, prompt, params)
        if self._driver is None or self._driver.done():
            self._driver = asyncio.get_running_loop().create_task(self._drive())
        try:
            while True:
                out = await queue.get()
                yield out
                if out.finished:
                    return
        finally:
            self._queues.pop(rid, None)
            self.abort(rid)  # no-op when it already finished

    async def _drive(self) -> None:
        while self.has_unfinished_requests():
            for out in self.step():
                queue = self._queues.get(out.request_id)
                if queue is not None:
                    queue.put_nowait(out)
            await asyncio.sleep(0)


def _load_tokenizer(path: str | Path):
    """The checkpoint's tokenizer, or None for a weights-only folder (token-id prompts)."""
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return None
