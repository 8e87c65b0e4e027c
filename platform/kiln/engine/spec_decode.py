"""Lossless speculative decoding: proposers and the verifier that keeps the target's distribution.

Leviathan, Kalman, Matias, "Fast Inference from Transformers via Speculative Decoding",
arXiv 2211.17192; Chen, Borgeaud, Irving, Lespiau, Sifre, Jumper, "Accelerating Large Language
Model Decoding with Speculative Sampling", arXiv 2302.01318.

A proposer guesses k tokens x_1..x_k; the target scores all of them in one forward pass, giving
p_1..p_{k+1} (p_j is the target distribution at draft position j after temperature, top-k and
top-p; p_{k+1} follows the last draft token). q_j is the distribution the draft token x_j was
drawn from.

Sampled requests (`verify_sampled`):
    for j = 1..k: accept x_j with probability min(1, p_j(x_j) / q_j(x_j)); at the first
    rejection emit a token from the residual r_j(x) = max(0, p_j(x) - q_j(x)) / Σ_y max(0, ·)
    and stop; if all k are accepted emit a bonus token from p_{k+1}.
    Lossless because P(emit x) = q(x)·min(1, p(x)/q(x)) + (1 - Σ_y min(p(y), q(y)))·r(x)
                              = min(p(x), q(x)) + max(0, p(x) - q(x)) = p(x).
Greedy requests (`verify_greedy`): accept x_j iff it is argmax p_j; emit the argmax at the first
    mismatch, or argmax p_{k+1} when all match. The output equals plain greedy decoding.
Every step emits between 1 and k + 1 tokens.

Proposers without a distribution (n-gram prompt lookup, greedy drafting) are point masses:
q_j = one_hot(x_j). The test above then accepts with probability p_j(x_j) and the residual is
p_j with x_j's mass removed, renormalised; still lossless. A draft token with q_j(x_j) = 0 is
rejected (it cannot have come from q_j; this also avoids dividing by zero).

`DraftModelProposer` runs the draft through its own `ModelRunner` and `BlockManager` (paged KV,
the target's code, as vLLM does): proposing k tokens for the whole batch is one batched catch-up
forward plus k - 1 batched decode forwards, and rejected drafts are rolled back.

`Speculator` (built by `make_speculator`) is the engine's `speculation_api.Speculator`: a
proposer plus a fixed k or SmartSpec's goodput controller (`kiln.engine.smartspec`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from kiln.engine.block_manager import BlockManager
from kiln.engine.model_runner import ForwardInput, ModelRunner
from kiln.engine.params import SamplingParams
from kiln.engine.sampler import probs_from_logits, sample_from_probs
from kiln.engine.smartspec import AcceptanceEstimator, SmartSpec, SpecCandidate
from kiln.engine.smartspec import profile as profile_step_time
from kiln.engine.speculation_api import Proposal, SpecRequestState, SpeculationConfig, StepStats


def _leading_accepts(flags: Sequence[bool]) -> int:
    """Number of accepted drafts: acceptance stops at the first rejection."""
    for position, accepted in enumerate(flags):
        if not accepted:
            return position
    return len(flags)


def verify_sampled(
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor | None,
    draft_tokens: Sequence[int],
    generator: torch.Generator | None = None,
) -> list[int]:
    """Rejection-sample k drafts against the target; returns the 1..k+1 emitted tokens.

    target_probs [k+1, V]; draft_probs [k, V], or None for point-mass drafts (n-gram, greedy
    drafting); `generator` lives on target_probs' device (a per-request one keeps seeded requests
    reproducible).
    """
    k = len(draft_tokens)
    drafts = torch.as_tensor(draft_tokens, dtype=torch.long, device=target_probs.device)
    p_of_draft = target_probs[:k].gather(1, drafts[:, None]).squeeze(1)
    if draft_probs is None:
        draft_probs = torch.nn.functional.one_hot(drafts, target_probs.shape[1]).to(target_probs)
    q_of_draft = draft_probs.gather(1, drafts[:, None]).squeeze(1)
    u = torch.rand(k, generator=generator, device=target_probs.device, dtype=target_probs.dtype)
    # u ≤ p/q written without the division; q = 0 counts as a rejection.
    accepted = _leading_accepts(((q_of_draft > 0) & (u * q_of_draft <= p_of_draft)).tolist())
    if accepted == k:
        final = target_probs[k]
    else:
        final = (target_probs[accepted] - draft_probs[accepted]).clamp_min(0)
        if final.sum() <= 0:  # p == q: a rejection had probability 0, only rounding gets here
            final = target_probs[accepted]
    token = int(sample_from_probs(final, generator))
    return [int(t) for t in draft_tokens[:accepted]] + [token]


def verify_greedy(target_logits: torch.Tensor, draft_tokens: Sequence[int]) -> list[int]:
    """Exact argmax matching: the accepted drafts plus the target's next argmax (1..k+1 tokens).

    target_logits [k+1, V] (logits or probabilities: only the argmax matters).
    """
    target_argmax = target_logits.argmax(-1).tolist()
    drafts = [int(t) for t in draft_tokens]
    accepted = _leading_accepts([d == t for d, t in zip(drafts, target_argmax)])
    return [*drafts[:accepted], target_argmax[accepted]]


class NgramProposer:
    """Prompt lookup: continue the latest earlier occurrence of the context's last n tokens.

    n runs from max_n down to min_n; the first n with an earlier occurrence wins, and its (up to)
    k following tokens are the proposal. No match: no proposal. The draft is a point mass.
    """

    def __init__(self, min_n: int = 1, max_n: int = 3):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        self.min_n, self.max_n = min_n, max_n

    def lookup(self, token_ids: Sequence[int], k: int) -> list[int]:
        tokens = list(token_ids)
        for n in range(min(self.max_n, len(tokens) - 1), self.min_n - 1, -1):
            suffix = tokens[-n:]
            # Starts up to len - n - 1: the occurrence is earlier than the suffix itself and at
            # least one token follows it.
            for start in range(len(tokens) - n - 1, -1, -1):
                if tokens[start + n - 1] == suffix[-1] and tokens[start : start + n] == suffix:
                    return tokens[start + n : start + n + k]
        return []

    def propose(self, requests: list[SpecRequestState], k: dict[str, int]) -> dict[str, Proposal]:
        proposals = {}
        for request in requests:
            drafts = self.lookup(request.token_ids, k.get(request.request_id, 0))
            stop = next((j for j, t in enumerate(drafts) if t in request.stop_token_ids), None)
            drafts = drafts if stop is None else drafts[: stop + 1]  # later ones go unused
            if drafts:
                proposals[request.request_id] = Proposal(drafts)
        return proposals

    def free(self, request_id: str) -> None:
        """Stateless: nothing to drop."""


class DraftModelProposer:
    """A small causal LM that drafts k tokens for every request at once, greedy or from the
    request's distribution (`probs_from_logits`: temperature, top-k, top-p on the draft's logits).

    The draft runs through its own `ModelRunner` and `BlockManager` (paged KV, the target's code),
    so a call is one batched catch-up forward (each request's tokens not yet in the draft's cache,
    ending with the last one, whose logits give draft 1) plus k - 1 batched decode forwards. A
    request's draft KV is rolled back lazily, at its next call, to the longest prefix it shares
    with the request's tokens (rejected drafts go). Requests the engine does not speculate for
    cost nothing; their KV catches up in the next call that drafts for them.

    Sampled requests get the draft distributions q [k, V] in their Proposal; greedy requests get
    None (the draft is then a point mass). The draft must share the target's vocabulary.
    """

    def __init__(
        self,
        model: str | Path | PreTrainedModel,
        max_num_seqs: int = 8,
        block_size: int = 16,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_model_len: int | None = None,
    ):
        """max_model_len: the target engine's (the draft never needs more context)."""
        if not isinstance(model, PreTrainedModel):
            model = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
        model = model.to(device).eval()
        self.device = torch.device(device)
        own = model.config.max_position_embeddings
        self.max_model_len = min(own, max_model_len or own)
        # Every sequence at full context: drafting never runs out of blocks.
        num_blocks = max_num_seqs * -(-self.max_model_len // block_size)
        self.runner = ModelRunner(model, num_blocks, block_size, max_model_len=self.max_model_len)
        self.block_manager = BlockManager(num_blocks, block_size)
        self._cached: dict[str, list[int]] = {}  # request id -> tokens whose KV the draft holds
        self.catch_up_fed = 0  # of the last propose call: tokens fed beyond one per request

    @property
    def vocab_size(self) -> int:
        return self.runner.model.get_output_embeddings().weight.shape[0]

    def propose(self, requests: list[SpecRequestState], k: dict[str, int]) -> dict[str, Proposal]:
        batch, ks, active = [], [], []
        for request in requests:
            # The draft KV may hold at most max_model_len tokens: context + k - 1 drafts.
            n = min(k.get(request.request_id, 0), self.max_model_len + 1 - len(request.token_ids))
            if n > 0:
                batch.append(self._catch_up(request, n))
                ks.append(n)
                active.append(request)
        # SmartSpec's time model prices these (the draft's prefill) apart from the k passes.
        self.catch_up_fed = sum(len(b.token_ids) - 1 for b in batch)
        if not batch:
            return {}
        drafts: list[list[int]] = [[] for _ in active]
        probs: list[list[torch.Tensor]] = [[] for _ in active]
        live = list(range(len(active)))  # requests still drafting
        logits = self.runner.execute(batch)
        for step in range(max(ks)):
            for i, token in zip(live, self._sample([active[i] for i in live], logits, probs, live)):
                drafts[i].append(token)
            # A request stops drafting at a stop token: any draft after it would go unused.
            live = [
                i
                for i in live
                if ks[i] > step + 1 and drafts[i][-1] not in active[i].stop_token_ids
            ]
            if not live:
                break
            for i in live:
                batch[i] = ForwardInput(
                    [drafts[i][-1]],
                    batch[i].start_pos + len(batch[i].token_ids),
                    batch[i].block_table,
                    1,
                )
            logits = self.runner.execute([batch[i] for i in live])
        for request, tokens in zip(active, drafts):
            # The last draft was never fed: the KV holds the context and drafts[:-1].
            self._cached[request.request_id] = [*request.token_ids, *tokens[:-1]]
        return {
            request.request_id: Proposal(tokens, torch.stack(q) if q else None)
            for request, tokens, q in zip(active, drafts, probs)
        }

    def catch_up_tokens(self, request: SpecRequestState) -> int:
        """Tokens a draft call would feed for this request beyond one: its prompt, or the
        tokens of the steps since it last drafted (1 after a step whose drafts all passed)."""
        return len(request.token_ids) - self._reusable(request) - 1

    def _reusable(self, request: SpecRequestState) -> int:
        """The draft KV's prefix shared with the request's tokens (the last token always fed)."""
        cached, tokens = self._cached.get(request.request_id, []), request.token_ids
        # Binary search on "the first n tokens agree" with slice compares (C speed): a Python
        # loop over a 300-token context took 59 µs (this 13 µs), per request, twice a step.
        low, high = 0, min(len(cached), len(tokens) - 1)
        while low < high:
            middle = (low + high + 1) // 2
            if cached[:middle] == tokens[:middle]:
                low = middle
            else:
                high = middle - 1
        return low

    def _catch_up(self, request: SpecRequestState, k: int) -> ForwardInput:
        """Roll the request's draft KV back to the prefix it shares with the request's tokens,
        reserve slots for the rest plus k - 1 drafts, and return the catch-up forward's input."""
        rid, tokens = request.request_id, request.token_ids
        reused = self._reusable(request)
        held = self.block_manager.num_slots.get(rid, 0)
        if held:
            self.block_manager.rollback(rid, held - reused)
        if not self.block_manager.allocate(rid, len(tokens) - reused + k - 1):
            raise RuntimeError("the draft's KV cache is full: it is sized for max_num_seqs")
        return ForwardInput(tokens[reused:], reused, self.block_manager.block_table(rid), 1)

    def _sample(self, requests, logits, probs, live) -> list[int]:
        """One draft token per request from its last logits row (greedy: the argmax; sampled:
        drawn with the request's generator, its distribution appended to probs)."""
        if all(r.params.greedy for r in requests):
            return torch.cat(logits).argmax(-1).tolist()
        tokens = []
        for request, rows, i in zip(requests, logits, live):
            if request.params.greedy:
                tokens.append(int(rows[-1].argmax()))
                continue
            q = probs_from_logits(rows[-1:], request.params)[0]
            tokens.append(int(sample_from_probs(q, request.generator)))
            probs[i].append(q)
        return tokens

    def free(self, request_id: str) -> None:
        self.block_manager.free(request_id)
        self._cached.pop(request_id, None)


class Speculator:
    """The engine's `speculation_api.Speculator`: one proposer, a fixed k or SmartSpec.

    Fixed k: every request that samples its last position this step (a decode, or a prompt's
    final chunk) proposes min(k, its limit). SmartSpec: `calibrate` profiles
    the target (and draft) at start-up, then `choose_k` picks goodput-maximising lengths each
    step (`kiln.engine.smartspec`). The n-gram proposer proposes first (up to max_k, free) so
    the choice can use each request's real proposal length; the draft model proposes after.
    """

    def __init__(
        self,
        proposer: NgramProposer | DraftModelProposer,
        fixed_k: int | None,
        max_k: int = 8,
        per_request: bool = True,
    ):
        self.proposer = proposer
        self.fixed_k = fixed_k
        self.max_k = fixed_k if fixed_k is not None else max_k
        self.per_request = per_request
        self.proposes_first = isinstance(proposer, NgramProposer)
        self.estimator = AcceptanceEstimator()
        self.controller: SmartSpec | None = None
        self._proposed: dict[str, Proposal] = {}

    def calibrate(self, runner: ModelRunner, max_num_seqs: int) -> None:
        """Fit SmartSpec's step-time model by timing forwards on `runner` (run before serving:
        it writes throwaway keys/values into the runner's first blocks)."""
        if self.fixed_k is not None:
            return
        max_len = runner.max_model_len - self.max_k - 1
        if max_len < 0:
            raise ValueError(
                f"max_model_len={runner.max_model_len}: SmartSpec verifies up to max_k={self.max_k}"
                f" drafts, so expected max_model_len >= {self.max_k + 1}"
            )

        def target_fn(num_seqs: int, tokens_per_seq: int, context_len: int) -> None:
            blocks = list(range(-(-(context_len + tokens_per_seq) // runner.block_size)))
            batch = [ForwardInput([0] * tokens_per_seq, context_len, blocks, tokens_per_seq)]
            runner.execute(batch * num_seqs)

        calls = itertools.count()

        def draft_fn(num_seqs: int, k: int, context_len: int, catch_up: int) -> None:
            # The last catch_up + 1 tokens differ from the previous call's: the draft rolls them
            # back and feeds them again, as for a request that has not drafted for a while.
            tokens = [0] * (context_len - catch_up - 1) + [1 + next(calls) % 2] * (catch_up + 1)
            params = SamplingParams(max_tokens=k + 1, temperature=0)
            generator = torch.Generator(self.proposer.device)
            states = [
                SpecRequestState(f"calibrate-{i}", tokens, context_len, params, generator, k)
                for i in range(num_seqs)
            ]
            self.proposer.propose(states, {state.request_id: k for state in states})

        max_seqs = min(max_num_seqs, 64)
        time_model = profile_step_time(
            target_fn,
            None if self.proposes_first else draft_fn,
            max_seqs=max_seqs,
            max_k=self.max_k,
            context_lens=(max_len // 8, max_len // 2),
        )
        for i in range(max_seqs):
            self.proposer.free(f"calibrate-{i}")
        self.controller = SmartSpec(
            time_model,
            self.max_k,
            self.estimator,
            per_request=self.per_request,
            drafting_cost=not self.proposes_first,
        )

    def choose_k(self, requests: list[SpecRequestState]) -> dict[str, int]:
        """A request's own `params.speculation` (0 = off, k = fixed) overrides the engine's
        setting; SmartSpec then chooses for the remaining requests, counting the fixed ones'
        tokens as the rest of the batch."""
        caps = {r.request_id: max(0, min(self.max_k, r.max_new_proposals)) for r in requests}
        for r in requests:
            if isinstance(r.params.speculation, int):
                caps[r.request_id] = min(caps[r.request_id], r.params.speculation)
        if self.proposes_first:
            self._proposed = self.proposer.propose(requests, caps)
            caps = {rid: len(p.token_ids) for rid, p in self._proposed.items()}
        adaptive = [r for r in requests if self._adaptive(r)]
        fixed = {r.request_id: caps.get(r.request_id, 0) for r in requests if not self._adaptive(r)}
        # The step's tokens besides the adaptive requests' 1 + k: the fixed requests' drafts,
        # and every request's prompt tokens beyond one in the step that prefills it.
        other_tokens = sum(fixed.values()) + sum(r.num_new_tokens for r in requests) - len(adaptive)
        fixed = {rid: k for rid, k in fixed.items() if k}  # k = 0 is plain decoding: no entry
        if not adaptive:
            return fixed
        if self.controller is None:
            raise RuntimeError("SmartSpec needs Speculator.calibrate(runner, ...) at start-up")
        candidates = [
            SpecCandidate(
                r.request_id,
                len(r.token_ids) - 1,
                caps.get(r.request_id, 0),
                0 if self.proposes_first else self.proposer.catch_up_tokens(r),
                len(r.token_ids) - r.num_prompt_tokens,
                r.max_new_proposals + 1,
            )
            for r in adaptive
        ]
        chosen = self.controller.choose(candidates, other_tokens=other_tokens)
        return fixed | {c.request_id: k for c, k in zip(candidates, chosen)}

    def _adaptive(self, request: SpecRequestState) -> bool:
        return not isinstance(request.params.speculation, int) and self.fixed_k is None

    def propose(self, requests: list[SpecRequestState], k: dict[str, int]) -> dict[str, Proposal]:
        if not self.proposes_first:
            return self.proposer.propose(requests, k)
        return {
            rid: Proposal(proposal.token_ids[: k[rid]])
            for rid, proposal in self._proposed.items()
            if k.get(rid, 0) > 0
        }

    def verify(
        self,
        requests: list[SpecRequestState],
        proposals: dict[str, Proposal],
        target_logits: dict[str, torch.Tensor],
    ) -> dict[str, list[int]]:
        emitted = {}
        for request in requests:
            logits = target_logits.get(request.request_id)
            if logits is None:
                continue
            proposal = proposals.get(request.request_id, Proposal([]))
            if request.params.greedy:
                emitted[request.request_id] = verify_greedy(logits, proposal.token_ids)
            else:
                target_probs = probs_from_logits(logits, request.params)
                emitted[request.request_id] = verify_sampled(
                    target_probs, proposal.probs, proposal.token_ids, request.generator
                )
        return emitted

    def observe(self, stats: StepStats) -> None:
        """Acceptance counts, and for SmartSpec the step's times and generated tokens."""
        for rid, proposed in stats.num_proposed.items():
            self.estimator.observe(rid, proposed, stats.num_accepted.get(rid, 0))
        for rid in stats.finished:  # free() ran before this step's counts arrived
            self.estimator.forget(rid)
        if self.controller is not None:
            for length, stopped in stats.finished.values():
                self.controller.lengths.observe(length, stopped)
            self.controller.observe_step(
                list(stats.num_drafted.values()),
                stats.num_batched_tokens,
                stats.num_context_tokens,
                stats.batch_size,
                generated_tokens=stats.num_generated_tokens,
                target_seconds=stats.step_time_s - stats.propose_time_s,
                draft_seconds=stats.propose_time_s,
                catch_up_tokens=0 if self.proposes_first else self.proposer.catch_up_fed,
            )

    def free(self, request_id: str) -> None:
        self.proposer.free(request_id)
        self.estimator.forget(request_id)

    def metrics(self) -> dict[str, float]:
        """spec_alpha (global, truncation-aware) and, under SmartSpec, the last decision."""
        out = {"spec_alpha": self.estimator.alpha()}
        if self.controller is not None:
            out.update(self.controller.metrics())
        return out


def make_speculator(config: SpeculationConfig) -> Speculator:
    """The engine's entry point. config.extra options: max_k (SmartSpec's K_max, default 8),
    per_request (default True), ngram_min_n / ngram_max_n (default 1 / 3)."""
    extra = dict(config.extra)
    if config.proposer == "ngram":
        proposer = NgramProposer(extra.get("ngram_min_n", 1), extra.get("ngram_max_n", 3))
    elif config.proposer == "draft":
        if config.draft_model is None:
            raise ValueError("proposer='draft' needs draft_model, a Hugging Face checkpoint path")
        proposer = DraftModelProposer(
            config.draft_model,
            config.max_num_seqs,
            config.block_size,
            config.device,
            config.dtype,
            config.max_model_len,
        )
        if proposer.vocab_size != config.vocab_size:
            raise ValueError(
                f"the draft's vocabulary ({proposer.vocab_size}) differs from the target's "
                f"({config.vocab_size}); speculation needs the same tokenizer"
            )
    else:
        raise ValueError(f"proposer must be 'draft' or 'ngram', got {config.proposer!r}")
    if config.speculation == "smartspec":
        fixed_k = None
    elif isinstance(config.speculation, int) and config.speculation >= 0:
        fixed_k = config.speculation
    else:
        raise ValueError(
            f"speculation must be 'smartspec' or an int >= 0, got {config.speculation!r}"
        )
    return Speculator(proposer, fixed_k, extra.get("max_k", 8), extra.get("per_request", True))
