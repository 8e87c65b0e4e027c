"""SmartSpec: choose the speculation length that maximises predicted goodput, every engine step.

Liu, Daniel, Hu, Kwon, Li, Mo, Cheung, Deng, Stoica, Zhang, "Optimizing Speculative Decoding for
Serving Large Language Models Using Goodput", arXiv 2406.14066 (v3: "TurboSpec").

Accepted-length model. Each proposal is accepted with probability α given that the earlier ones
were, so with k proposals P(j accepted) = α^j (1 − α) for j < k and α^k for j = k, and

    E[gen(k, α)] = 1 + α + … + α^k = (1 − α^(k+1)) / (1 − α)          (k + 1 when α = 1)

generated tokens (accepted proposals plus the bonus or recovered token). Proposal j adds α^j.
We let the rate depend on the position j in the step, α_j (the paper's α is one number): then
proposal j adds α_1·…·α_j, and the constant-α model is the case α_j = α. Why: on our copy
task the draft passes three tokens and then fails the fourth in most steps (P(accept 4 |
reached 4) = 0.09 against 0.78-0.99 for positions 1-3, BENCHMARKS.md, SmartSpec, 2026-12-03),
and one α, about 0.8 there, over-rates every position past 3, so SmartSpec drafted past it.

Goodput of one step over B requests with proposal lengths k_1..k_B:

    G(k_1..k_B) = Σ_i E[gen(k_i, α_i)] / T_step(k_1..k_B)

Step time (the paper's T ≈ a·N_context + b·N_batched + c [recollection] as extended by the V1
prototype, plus a draft term; least squares with coefficients constrained ≥ 0):
    T_step = T_target + [any k_i > 0] · T_draft
    T_target = c_0 + c_tok·N_batched + c_kv·N_context + c_bs·B + c_spec·[any k_i > 0]
               + e_0 + e_bs·B                               (engine overhead, online only)
    N_batched = Σ_i (k_i + 1) + other scheduled tokens (prefill chunks)
    T_draft  = d_0 + d_pass·max_i k_i + d_tok·Σ_i k_i + d_up·Σ_{i: k_i > 0} u_i
    (sequential draft passes; per-token cost; catch-up: u_i = the tokens the draft must feed
    request i beyond one before its first draft, i.e. its prompt, or the tokens of the steps
    since it last drafted, since the draft only runs for requests that speculate)
`profile` fits both at start-up from timed forwards on this machine; every observed step (and
draft) time is added and the model refit every `refit_every` observations (TurboSpec's closed
loop). Profiled samples are kept, but online steps soon outnumber them and can bend the
forward's coefficients: in one benchmark the draft's per-pass cost went from 0.44 ms profiled
to 0.08 ms after three serving runs, its constant from 0.7 to 3.3 ms (BENCHMARKS.md, SmartSpec).
The catch-up term is the draft's prefill: without it, a call that catches up a prompt or the
33 tokens after an exploration was read as the cost of k draft passes, which taught the model
that drafting is dear, and the choice ignored that speculating for a lagging request costs more
than for one in step (BENCHMARKS.md, SmartSpec, 2026-12-03).
A profiled forward is bare: it has none of a real step's sampling, verification and
per-request bookkeeping (about 0.3 ms per request per step on a 2-core CPU, BENCHMARKS.md), and
in decode steps that per-request cost is collinear with N_batched, so a fit over both kinds of
sample would put it into neither and under-predict a large batch's plain step, the step
speculation is compared with. The engine terms e_0, e_bs are therefore features only observed
steps carry (0 in profiled samples): they take the overhead the profile cannot see (though,
as above, online samples still weigh on the forward's coefficients), and every prediction is
of a real step (engine terms on).

Acceptance rate. The engine counts accepted drafts only up to the first rejection, so the naive
ratio accepted/drafted has expectation α(1 − α^k) / (k(1 − α)) < α. With a_s accepted of k_s
drafted at step s, the likelihood is α^(Σ a_s) (1 − α)^R with R the number of steps that had a
rejection (a_s < k_s), whose maximiser is

    α̂ = Σ_s a_s / (Σ_s a_s + R).

We report the posterior mean under a Beta(m·α_0, m·(1 − α_0)) prior, (Σa + m·α_0)/(Σa + R + m),
which tends to α̂: globally with α_0 = `prior` (0.7, the V0 prototype's start), and per request
with α_0 = the global estimate, so a new request starts at the global rate. Counts decay by
`decay` per observation to follow drift (1.0 = exact MLE).

The prior strength m is 8 (reconstructed; V0/V1 have no per-request rate): requests here live
for 5-30 tokens, and under m = 2 one early rejection moved a request from 0.71 to 0.47, where
speculating no longer paid, so it never drafted (and was never measured) again.

Per position (the brief's ratio of consecutive per-position counts): a step reaches position j
when its first j − 1 proposals passed and it proposed ≥ j; with N_j steps reaching j and A_j of
them accepting it, the MLE is α̂_j = A_j / N_j (pooled over j it is α̂ above), shrunk toward the
global α with strength m. Reconstructed (no published source): request i's rate at j is
min(1, α_j · α_i / α), a main-effects model in which the global position profile carries the
shape and the request's pooled rate its level (a request's own counts per position are too
few to estimate: it lives a few steps); with no position counts it is α_i.

Stops [reconstructed; the paper's requests run hundreds of tokens]. A drafted token after the
request's last one is accepted for nothing: the engine drops it. So the gain of proposal j
also carries the probability that the request still wants that token. With L a request's
output length (its stop token included) and h(m) = P(L = m | L ≥ m) the hazard of stopping at
m, a request that has generated g tokens wants token g + 1 (it is still running) and token
g + 1 + j with probability Π_{m=g+1..g+j} (1 − h(m)); proposal j's gain is α_i1·…·α_ij times
that. `OutputLengthModel` estimates h by Kaplan–Meier from the requests that finished: each
finished request was at risk at lengths 1..L, and stopped at L if a stop condition ended it
(one that hit max_tokens or the context is censored there: max_tokens already caps k). The
estimate is shrunk toward 0 by one pseudo-observation per length, so an unseen length (and a
fresh engine) discounts nothing. Why: on our text world most requests end after 3-12 tokens,
and at K_max = 8 SmartSpec predicted 15-20% more tokens than its steps kept; with the stop
model its mean latency with the draft fell 2-4% at every load, and with n-gram moved by at
most 2% either way (same arrivals, 12 repeats each, BENCHMARKS.md, SmartSpec, 2026-12-07).
The hazard is pooled over requests, not conditioned on the prompt.

Whether the level applies is chosen online [reconstructed]. Before each verification is
counted, both rate models, with the request's level and without it (the global α_j alone),
score its outcome, and the one with the higher running log-likelihood is used. This is
prequential model selection (Dawid 1984); the scores decay with the counts. The two proposers
need different answers:
  - A draft model's acceptance is mostly a property of the position. A request's pooled rate
    over its few steps is then noise, and scaling every position by it compounds (level^k).
    On the 2026-12-07 pair the level model scored −1.77 per verification against −1.38
    without it (`benchmarks/acceptance_models.py`, fixed k = 8 traces). At load 0.9 it
    expected 2.5 tokens per request at k = 4 where 3.2 came. SmartSpec then under-speculated
    at batch 12-15 and ran at 1.16-1.23x the latency of k = 4; with the selection, 0.93-0.95x
    (BENCHMARKS.md, SmartSpec, 2026-12-07).
  - Prompt lookup's acceptance is a property of the request (the continuation is in the
    prompt or it is not), and on those traces the level predicts better: −0.974 against −0.985.
The log-likelihood also charges the level model for saturating: a level above 1 can lift a
position's rate to exactly 1, and a rejection there scores log 1e-12. So when requests at
rates near 1 share the traffic with poor ones, the global profile wins even though the
requests differ.

Selection (per step). Candidate items are proposal positions (i, j), j = 1..cap_i, with gain
α_i1·…·α_ij times the stop model's continuation (non-increasing in j); cap_i is K_max, or the
n-gram proposal length (the n-gram proposer proposes first, for free, then SmartSpec decides
how much to verify), or the tokens the request may still emit minus one.
  - `per_request=True` (the brief's §7 extension, the default): add items in descending gain.
    Under a cost linear in Σk_i this is Dinkelbach's greedy and the best prefix is the optimum;
    with all α_i equal, ties enter together and it reduces to the uniform scan. A request's
    catch-up share (below) is paid when its first item enters (the greedy is then a
    heuristic, but every prefix is still scored at its full cost).
  - `per_request=False` (the published prototypes): one k for the whole batch, k = 0..K_max.
G(0) is multiplied by `no_spec_bias` (1.1, V0's bias toward not speculating, covering
unmodelled overhead and noise): k = 0 unless speculating is predicted to pay by that margin.

Catch-up is an investment [reconstructed]. Catching request i up is paid once and lets it
draft in this step and every later one, so a step is charged the share u_i / S_i, with S_i the
steps it has left: the stop model's expected remaining tokens (at most `AMORTIZE_STEPS` steps'
worth, and within max_tokens) over the tokens a step at its cap yields, at least 1. Why: charged
in full to one step, a burst of new requests at high load (20 prompts of about 25 tokens) made
the first drafting step look too dear, every plain step then added to the lag, and SmartSpec
stayed plain: 14-52% of steps speculated at load 0.9 in some serving runs, at 1.1-1.2x the best
fixed k's latency; with the share, 73-100% (BENCHMARKS.md, SmartSpec, 2026-12-07). The step time
reported as `spec_step_seconds_predicted` is the charged one.

Exploration. k = 0 is absorbing: a step that does not speculate observes no acceptance, so a
prior (or a stale estimate) under which speculation does not pay is never corrected. After
`explore_every` (32) consecutive k = 0 decisions the next one takes the best speculating
choice instead (the best prefix with Σk_i ≥ 1), which measures α and the speculating step
time; when speculation truly does not pay this costs at most one step in `explore_every` + 1.
None disables it (the published prototypes). Seen in one benchmark run: with the 0.7 prior,
the draft controller never drafted, while every fixed k beat plain decoding (BENCHMARKS.md).

Deviations and reconstructions:
  - The published scan stops at the first k whose G does not improve (assumes G unimodal). We
    score every prefix (≤ B·K_max, O(1) each: the step time is linear in Σk_i and max k_i) and
    keep the best, since the fixed speculation costs c_spec and d_0 make G non-unimodal: the
    first proposal can lose while more proposals win.
  - The decision is recomputed every step (the prototypes cache it for 20 or 200 steps): it costs
    about 15 µs at batch 1 and 0.3-0.4 ms at batch 32 on a 2-core CPU (plain Python; tensor ops
    cost 0.2-0.3 ms at any size, 8% of a tiny model's decode step), and n-gram caps change every
    step anyway.
  - The paper's α is a moving average of observed acceptance (V0: global EMA of a ratio that is
    not truncated; V1: a min(p, q) signal). We use the truncation-aware MLE above, per request
    and global, because our counts stop at the first rejection.
  - The V0 prototype fits linear and degree-2 models and keeps the better; we keep linear.
  - The V0 memory guard (no k whose KV would not fit) belongs to the scheduler: it lowers cap_i.
  - Tree-style drafting is not covered.
"""

from __future__ import annotations

import itertools
import math
import operator
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


def expected_generated(alpha: float, k: int) -> float:
    """E[tokens one request emits in a step with k proposals] = (1 − α^(k+1)) / (1 − α)."""
    if alpha >= 1.0:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def verification_likelihood(rates: Sequence[float], accepted: int) -> float:
    """P(the first `accepted` of len(rates) proposals pass and the next, if any, is rejected)
    when position j passes with probability rates[j] given the earlier ones passed."""
    rejected = 1.0 - rates[accepted] if accepted < len(rates) else 1.0
    return math.prod(rates[:accepted]) * rejected


def _posterior_mean(accepted: float, rejections: float, prior: float, strength: float) -> float:
    return (accepted + strength * prior) / (accepted + rejections + strength)


class AcceptanceEstimator:
    """Per-request and global acceptance rate from counts truncated at the first rejection,
    pooled over positions (`alpha`) and per position in the step (`position_alphas`)."""

    def __init__(self, prior: float = 0.7, prior_strength: float = 8.0, decay: float = 1.0):
        self.prior, self.prior_strength, self.decay = prior, prior_strength, decay
        self._accepted = 0.0
        self._rejections = 0.0
        self._per_request: dict[object, tuple[float, float]] = {}
        # Global, per position j = 1..: steps that reached j, and of those the ones accepting it.
        self._position_reached: list[float] = []
        self._position_accepted: list[float] = []
        # Running log-likelihood of the verifications under each rate model (module docstring),
        # keyed by whether the request's level scales its positions.
        self._log_score = {True: 0.0, False: 0.0}

    def observe(self, request_id: object, drafted: int, accepted: int) -> None:
        """One verification: `accepted` of `drafted` proposals passed before the first rejection."""
        if not 0 <= accepted <= drafted:
            raise ValueError(f"need 0 <= accepted <= drafted, got {accepted} of {drafted}")
        if drafted == 0:  # no proposal, no information
            return
        profile = self._global_profile(drafted)  # one profile serves both rate models
        for request_level, rates in (
            (True, self._scaled_by_level(profile, request_id)),
            (False, profile),
        ):  # scored before the counts learn from this outcome
            likelihood = verification_likelihood(rates, accepted)
            score = self.decay * self._log_score[request_level]
            self._log_score[request_level] = score + math.log(max(likelihood, 1e-12))
        rejected = float(accepted < drafted)
        self._accepted = self.decay * self._accepted + accepted
        self._rejections = self.decay * self._rejections + rejected
        old_accepted, old_rejections = self._per_request.get(request_id, (0.0, 0.0))
        self._per_request[request_id] = (
            self.decay * old_accepted + accepted,
            self.decay * old_rejections + rejected,
        )
        reached = min(drafted, accepted + 1)  # the first rejected position is reached too
        grow = reached - len(self._position_reached)
        self._position_reached += [0.0] * grow
        self._position_accepted += [0.0] * grow
        for j in range(len(self._position_reached)):
            self._position_reached[j] = self.decay * self._position_reached[j] + (j < reached)
            self._position_accepted[j] = self.decay * self._position_accepted[j] + (j < accepted)

    def alpha(self, request_id: object | None = None) -> float:
        """The global estimate, or one request's (shrunk toward the global one)."""
        global_alpha = _posterior_mean(
            self._accepted, self._rejections, self.prior, self.prior_strength
        )
        if request_id is None:
            return global_alpha
        accepted, rejections = self._per_request.get(request_id, (0.0, 0.0))
        return _posterior_mean(accepted, rejections, global_alpha, self.prior_strength)

    @property
    def uses_request_level(self) -> bool:
        """Whether `position_alphas` scales by the request's level: the rate model whose
        predictions of the verifications so far score higher (ties keep the level)."""
        return self._log_score[True] >= self._log_score[False]

    def position_alphas(self, request_id: object, k: int) -> list[float]:
        """The request's acceptance rate at positions 1..k of a step, under the rate model
        that has predicted better so far (`uses_request_level`)."""
        return self.rates_at_positions(request_id, k, self.uses_request_level)

    def rates_at_positions(self, request_id: object, k: int, request_level: bool) -> list[float]:
        """The global rate at each of positions 1..k, scaled by the request's level when
        `request_level` (module docstring)."""
        profile = self._global_profile(k)
        return self._scaled_by_level(profile, request_id) if request_level else profile

    def _global_profile(self, k: int) -> list[float]:
        global_alpha = self.alpha()
        profile = []
        for j in range(k):
            reached, accepted = (
                (self._position_reached[j], self._position_accepted[j])
                if j < len(self._position_reached)
                else (0.0, 0.0)
            )
            profile.append(
                _posterior_mean(accepted, reached - accepted, global_alpha, self.prior_strength)
            )
        return profile

    def _scaled_by_level(self, profile: list[float], request_id: object) -> list[float]:
        level = self.alpha(request_id) / max(self.alpha(), 1e-12)
        return [min(1.0, rate * level) for rate in profile]

    def forget(self, request_id: object) -> None:
        self._per_request.pop(request_id, None)


class OutputLengthModel:
    """Kaplan–Meier hazard of a request stopping at each output length (module docstring)."""

    def __init__(self) -> None:
        self._at_risk: list[int] = [0]  # [m]: finished requests whose output reached length m
        self._stopped: list[int] = [0]  # [m]: of those, the ones a stop condition ended at m

    def observe(self, length: int, stopped: bool) -> None:
        """A finished request's output length; stopped=False when max_tokens or the context
        ended it (censored: it was still going)."""
        if length < 1:
            return  # ended before generating (an error or an abort): no length information
        grow = length + 1 - len(self._at_risk)
        if grow > 0:
            self._at_risk.extend([0] * grow)
            self._stopped.extend([0] * grow)
        for m in range(1, length + 1):
            self._at_risk[m] += 1
        self._stopped[length] += stopped

    def hazard(self, length: int) -> float:
        """P(L = length | L ≥ length), shrunk toward 0 by one pseudo-observation."""
        if length >= len(self._at_risk):
            return 0.0
        return self._stopped[length] / (self._at_risk[length] + 1)

    def expected_tokens(self, generated: int, horizon: int) -> float:
        """Expected tokens a request that has generated `generated` will still emit, counting
        at most `horizon`: Σ_j P(it wants token g + j), the first one certainly."""
        wanted = itertools.accumulate(self.continuation(generated, horizon - 1), operator.mul)
        return 1.0 + sum(wanted)

    def continuation(self, generated: int, k: int) -> list[float]:
        """Per proposal j = 1..k of a request that has generated `generated` tokens: the
        probability that it does not stop at the token before it, P(L ≥ g + 1 + j | L ≥ g + j).
        Their running product is the probability that the request wants proposal j."""
        return [1.0 - self.hazard(generated + j) for j in range(1, k + 1)]


class LinearTimeModel:
    """seconds ≈ coefficients · features, least squares with non-negative coefficients."""

    def __init__(self, feature_names: Sequence[str], history: int = 512):
        self.feature_names = tuple(feature_names)
        self._profiled: list[tuple[list[float], float]] = []
        self._observed: deque[tuple[list[float], float]] = deque(maxlen=history)
        self.coefficients: list[float] | None = None

    def __len__(self) -> int:
        return len(self._profiled) + len(self._observed)

    def add(self, features: Sequence[float], seconds: float, profiled: bool = False) -> None:
        (self._profiled if profiled else self._observed).append(([*features], seconds))

    def fit(self) -> None:
        samples = self._profiled + list(self._observed)
        x = torch.tensor([f for f, _ in samples], dtype=torch.float64)
        y = torch.tensor([s for _, s in samples], dtype=torch.float64)
        # Active set: a negative coefficient (collinear or noisy samples, e.g. timings on a busy
        # machine) would make extra tokens look free or a step take no time, so drop the most
        # negative feature and refit until none is left.
        active = list(range(x.shape[1]))
        while active:
            solution = torch.linalg.lstsq(x[:, active], y[:, None], driver="gelsd").solution
            solution = solution.squeeze(1).tolist()
            if min(solution) >= 0:
                break
            active.pop(solution.index(min(solution)))
        coefficients = [0.0] * x.shape[1]
        for feature, value in zip(active, solution):
            coefficients[feature] = value
        self.coefficients = coefficients

    def predict(self, features: Sequence[float]) -> float:
        if self.coefficients is None:
            raise RuntimeError("the time model has no fit yet: profile or fit it first")
        return max(sum(c * f for c, f in zip(self.coefficients, features)), 1e-9)


def _seconds(fn: Callable[..., object], *args: int, repeats: int) -> float:
    """Fastest of `repeats` timed calls after one untimed warm-up (fills caches, compiles)."""
    fn(*args)
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(*args)
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def _target_features(
    batched_tokens: int, context_tokens: int, num_seqs: int, speculating: bool, engine: bool
) -> list[float]:
    """The target model's features, in `StepTimeModel.target`'s order; engine=False for a
    profiled bare forward (module docstring)."""
    return [1, batched_tokens, context_tokens, num_seqs, speculating, engine, engine * num_seqs]


class StepTimeModel:
    """T_step(k_1..k_B) = T_target + [any k_i > 0]·T_draft (see the module docstring)."""

    def __init__(self, refit_every: int = 50):
        self.target = LinearTimeModel(
            (
                "constant",
                "batched_tokens",
                "context_tokens",
                "num_seqs",
                "speculating",
                "engine",
                "engine_seqs",
            )
        )
        self.draft = LinearTimeModel(
            ("constant", "draft_passes", "draft_tokens", "catch_up_tokens")
        )
        self.refit_every = refit_every
        self._since_refit = 0

    def predict(
        self,
        ks: Sequence[int],
        context_tokens: int,
        other_tokens: int = 0,
        drafting: bool = True,
        catch_up_tokens: int = 0,
    ) -> float:
        """Seconds for a step whose decoding requests verify ks drafts (plus other_tokens of
        prefill chunks); drafting=False leaves out the proposer (n-gram proposals exist already);
        catch_up_tokens: Σ u_i over the requests with k_i > 0."""
        batched_tokens = sum(ks) + len(ks) + other_tokens
        features = _target_features(batched_tokens, context_tokens, len(ks), any(ks), True)
        seconds = self.target.predict(features)
        if any(ks) and drafting:
            seconds += self.draft.predict([1, max(ks), sum(ks), catch_up_tokens])
        return seconds

    def speculating_step(
        self, num_seqs: int, context_tokens: int, other_tokens: int = 0, drafting: bool = True
    ) -> Callable[[int, int, float], float]:
        """`predict` of speculating steps as a function of (Σk_i, max_i k_i, Σ catch-up), the first
        two ≥ 1: the batch's other features are folded in once, so SmartSpec scores every prefix
        of its proposal order with a few float operations (plain Python beats tensor ops here)."""
        if self.target.coefficients is None or (drafting and self.draft.coefficients is None):
            raise RuntimeError("the time model has no fit yet: profile or fit it first")
        c_0, c_token, c_context, c_seq, c_spec, e_0, e_seq = self.target.coefficients
        target_fixed = c_0 + c_token * (num_seqs + other_tokens) + c_context * context_tokens
        target_fixed += (c_seq + e_seq) * num_seqs + c_spec + e_0
        d_0, d_pass, d_token, d_up = self.draft.coefficients if drafting else (0.0,) * 4

        def seconds(total_k: int, max_k: int, catch_up: float) -> float:
            target = max(target_fixed + c_token * total_k, 1e-9)  # as LinearTimeModel.predict
            if not drafting:
                return target
            return target + max(d_0 + d_pass * max_k + d_token * total_k + d_up * catch_up, 1e-9)

        return seconds

    def observe(
        self,
        ks: Sequence[int],
        batched_tokens: int,
        context_tokens: int,
        num_seqs: int,
        target_seconds: float,
        draft_seconds: float = 0.0,
        catch_up_tokens: int = 0,
    ) -> None:
        """A measured step: target_seconds is everything but drafting (forward, sampling,
        verification, bookkeeping); draft_seconds the proposer's time (0 when it did not run),
        which fed catch_up_tokens beyond one per drafting request."""
        features = _target_features(batched_tokens, context_tokens, num_seqs, any(ks), True)
        self.target.add(features, target_seconds)
        if any(ks) and draft_seconds > 0:
            self.draft.add([1, max(ks), sum(ks), catch_up_tokens], draft_seconds)
        self._since_refit += 1
        if self._since_refit >= self.refit_every:
            self._since_refit = 0
            for model in (self.target, self.draft):
                if len(model) >= len(model.feature_names):
                    model.fit()


def profile(
    target_fn: Callable[[int, int, int], object],
    draft_fn: Callable[[int, int, int, int], object] | None = None,
    max_seqs: int = 32,
    max_k: int = 8,
    context_lens: Sequence[int] = (64, 256),
    repeats: int = 3,
    refit_every: int = 50,
) -> StepTimeModel:
    """Fit a StepTimeModel from timed calls on this machine (at engine start-up).

    target_fn(num_seqs, tokens_per_seq, context_len) runs one target forward over num_seqs
    sequences, each with context_len cached tokens and tokens_per_seq new ones (1 = plain decode,
    k + 1 = verification). draft_fn(num_seqs, k, context_len, catch_up) proposes k tokens for
    num_seqs requests with context_len tokens, each of which feeds catch_up tokens beyond one
    (every call; 0 = the request drafted last step). Both must return only when the work is done.
    """
    model = StepTimeModel(refit_every)
    for num_seqs in sorted({n for n in (1, 4, 16, max_seqs) if n <= max_seqs}):
        for tokens in sorted({t for t in (1, 2, 3, 5, max_k + 1) if t <= max_k + 1}):
            for context in context_lens:
                seconds = _seconds(target_fn, num_seqs, tokens, context, repeats=repeats)
                # A bare forward, verification-shaped: no speculation or engine overheads.
                features = _target_features(
                    num_seqs * tokens, num_seqs * context, num_seqs, False, False
                )
                model.target.add(features, seconds, profiled=True)
    model.target.fit()
    if draft_fn is not None:
        # passes = k and tokens = num_seqs·k vary independently over this grid, which reaches
        # the largest batch so a batched drafter's per-token cost is measured, not extrapolated;
        # the catch-up points vary num_seqs·catch_up at one pass.
        context, catch_up = max(context_lens), min(context_lens) // 2
        for num_seqs in sorted({1, min(4, max_seqs), max_seqs}):
            for k, up in [(k, 0) for k in sorted({1, min(4, max_k), max_k})] + [(1, catch_up)]:
                seconds = _seconds(draft_fn, num_seqs, k, context, up, repeats=repeats)
                model.draft.add([1, k, num_seqs * k, num_seqs * up], seconds, profiled=True)
        model.draft.fit()
    return model


# A catch-up is spread over at most this many steps: further out the stop model knows least,
# and a share of 1/8 is already small next to a drafting step's fixed costs.
AMORTIZE_STEPS = 8


@dataclass(frozen=True)
class SpecCandidate:
    """A request whose last position this step samples (a decode, or a prompt's final chunk):
    its cached tokens, how many drafts it may verify, the draft's catch-up for it (tokens to
    feed beyond one before drafting; 0 for n-gram), and the tokens it has generated and may
    still generate (for the stop model and the catch-up share)."""

    request_id: object
    context_len: int
    max_k: int
    catch_up: int = 0
    generated: int = 0
    tokens_left: int = 1  # max_tokens (or the context) allows this many more


class SmartSpec:
    """Per-step speculation lengths that maximise predicted goodput, and their metrics."""

    def __init__(
        self,
        time_model: StepTimeModel,
        max_k: int = 8,
        estimator: AcceptanceEstimator | None = None,
        per_request: bool = True,
        no_spec_bias: float = 1.1,
        drafting_cost: bool = True,
        explore_every: int | None = 32,
        lengths: OutputLengthModel | None = None,
    ):
        """drafting_cost: True for a draft model (its passes are part of the step cost); False
        for n-gram lookup, whose proposals exist before the decision and cost nothing further.
        explore_every: speculate (the best speculating choice) after this many consecutive
        k = 0 decisions, so that α keeps being measured (module docstring); None = never.
        lengths: the stop model, fed by the engine with every finished request's length."""
        if explore_every is not None and explore_every < 1:
            raise ValueError(f"explore_every must be None or >= 1, got {explore_every}")
        self.time_model = time_model
        self.max_k = max_k
        self.estimator = estimator or AcceptanceEstimator()
        self.lengths = lengths or OutputLengthModel()
        self.per_request = per_request
        self.no_spec_bias = no_spec_bias
        self.drafting_cost = drafting_cost
        self.explore_every = explore_every
        self._plain_decisions = 0  # consecutive k = 0 decisions, for exploration
        self._metrics: dict[str, float] = {}
        self._measured_goodput: float | None = None

    def choose(self, requests: Sequence[SpecCandidate], other_tokens: int = 0) -> list[int]:
        """Proposal length per request (0 = no speculation), in the order given."""
        context_tokens = sum(r.context_len for r in requests)
        caps = [max(0, min(r.max_k, self.max_k)) for r in requests]
        rates = [
            [
                alpha * going_on
                for alpha, going_on in zip(
                    self.estimator.position_alphas(r.request_id, cap),
                    self.lengths.continuation(r.generated, cap),
                )
            ]
            for r, cap in zip(requests, caps)
        ]

        no_spec_seconds = self.time_model.predict(
            [0] * len(requests), context_tokens, other_tokens, self.drafting_cost
        )
        no_spec_goodput = len(requests) / no_spec_seconds
        best = (self.no_spec_bias * no_spec_goodput, 0, float(len(requests)), no_spec_seconds)
        best_speculating = (0.0, 0, 0.0, 0.0)
        # Items (gain, position j, request i). Per request: best gain first; uniform: a whole
        # level j across the batch at a time, scored only once the level is complete. Every
        # prefix of this order is a candidate choice; a request's positions enter in order j =
        # 1, 2, ..., so a prefix's max k_i is the running max of j.
        gains = [list(itertools.accumulate(request_rates, operator.mul)) for request_rates in rates]
        items = [(gain, j, i) for i in range(len(requests)) for j, gain in enumerate(gains[i], 1)]
        items.sort(key=(lambda it: (-it[0], it[2])) if self.per_request else (lambda it: it[1:]))
        if items:
            step_seconds = self.time_model.speculating_step(
                len(requests), context_tokens, other_tokens, self.drafting_cost
            )
            # Catching a request up is paid once and lets it draft in every later step, so a
            # step is charged its share: u_i over the steps it has left, E[tokens left] over
            # the tokens a step at its cap yields (at most AMORTIZE_STEPS).
            shares = []
            for r, request_gains in zip(requests, gains):
                if not r.catch_up:  # in step with the draft (or n-gram): nothing to share
                    shares.append(0.0)
                    continue
                per_step = 1.0 + sum(request_gains)
                horizon = min(r.tokens_left, math.ceil(AMORTIZE_STEPS * per_step))
                steps = self.lengths.expected_tokens(r.generated, horizon) / per_step
                shares.append(r.catch_up / max(1.0, steps))
            expected, max_k, catch_up = float(len(requests)), 0, 0.0
            for position, (gain, level, request) in enumerate(items, 1):
                expected += gain
                max_k = max(max_k, level)
                if level == 1:  # the request starts drafting: the draft catches it up first
                    catch_up += shares[request]
                if not self.per_request and position < len(items) and items[position][1] == level:
                    continue  # only complete levels
                seconds = step_seconds(position, max_k, catch_up)
                if expected / seconds > best_speculating[0]:  # strict: the first, fewest
                    best_speculating = (expected / seconds, position, expected, seconds)
            if best_speculating[0] > best[0]:
                best = best_speculating
        explore = (
            best[1] == 0
            and best_speculating[1] > 0
            and self.explore_every is not None
            and self._plain_decisions >= self.explore_every
        )
        if explore:
            best = best_speculating
        self._plain_decisions = self._plain_decisions + 1 if best[1] == 0 else 0
        _, num_items, expected, seconds = best
        chosen = [0] * len(requests)
        for _, _, request in items[:num_items]:
            chosen[request] += 1
        self._metrics = {
            "spec_k_max": float(max(chosen, default=0)),
            "spec_k_mean": sum(chosen) / len(chosen) if chosen else 0.0,
            "spec_alpha": self.estimator.alpha(),
            "spec_request_level": float(self.estimator.uses_request_level),
            "spec_goodput_predicted": expected / seconds,
            "spec_goodput_no_spec": no_spec_goodput,
            "spec_step_seconds_predicted": seconds,
            "spec_explored": float(explore),
        }
        return chosen

    def observe_step(
        self,
        ks: Sequence[int],
        batched_tokens: int,
        context_tokens: int,
        num_seqs: int,
        generated_tokens: int,
        target_seconds: float,
        draft_seconds: float = 0.0,
        catch_up_tokens: int = 0,
    ) -> None:
        """A finished step: feeds the time model (StepTimeModel.observe) and the measured goodput
        (generated tokens over the whole step time, an EMA reported by `metrics`)."""
        self.time_model.observe(
            ks,
            batched_tokens,
            context_tokens,
            num_seqs,
            target_seconds,
            draft_seconds,
            catch_up_tokens,
        )
        measured = generated_tokens / max(target_seconds + draft_seconds, 1e-9)
        previous = self._measured_goodput
        self._measured_goodput = measured if previous is None else 0.9 * previous + 0.1 * measured

    def metrics(self) -> dict[str, float]:
        """The last decision (chosen k, α, predicted goodput) and the measured goodput EMA."""
        out = dict(self._metrics)
        if self._measured_goodput is not None:
            out["spec_goodput_measured"] = self._measured_goodput
        return out
