"""SmartSpec (kiln.engine.smartspec): the brief's properties 5-8 with negative controls."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from kiln.engine import smartspec
from kiln.engine.smartspec import (
    AcceptanceEstimator,
    LinearTimeModel,
    OutputLengthModel,
    SmartSpec,
    SpecCandidate,
    StepTimeModel,
    expected_generated,
)


def _truncated_geometric(rng, alpha: float, k: int, steps: int) -> np.ndarray:
    """Accepted drafts per step: proposals pass with probability α until the first rejection."""
    passes = rng.random((steps, k)) < alpha
    return np.cumprod(passes, axis=1).sum(axis=1)


def test_expected_generated_matches_monte_carlo_and_its_gains_fall():
    rng = np.random.default_rng(0)
    for alpha, k in [(0.3, 2), (0.8, 5), (0.95, 8)]:
        simulated = _truncated_geometric(rng, alpha, k, 200_000).mean() + 1
        assert expected_generated(alpha, k) == pytest.approx(simulated, rel=0.01)
        gains = [expected_generated(alpha, j + 1) - expected_generated(alpha, j) for j in range(k)]
        assert all(a > b for a, b in itertools.pairwise(gains))
    assert expected_generated(0.5, 0) == 1.0
    assert expected_generated(1.0, 4) == 5.0


def test_truncation_aware_estimate_converges_while_the_naive_ratio_is_biased():
    rng = np.random.default_rng(1)
    alpha, k, steps = 0.6, 4, 20_000
    accepted = _truncated_geometric(rng, alpha, k, steps)
    estimator = AcceptanceEstimator()
    for a in accepted:
        estimator.observe("r", k, int(a))
    assert estimator.alpha() == pytest.approx(alpha, abs=0.01)
    assert estimator.alpha("r") == pytest.approx(alpha, abs=0.01)
    naive = accepted.sum() / (k * steps)  # what an accepted/drafted counter reports
    assert naive == pytest.approx(alpha * (1 - alpha**k) / (k * (1 - alpha)), abs=0.01)
    assert alpha - naive > 0.15


def test_per_request_estimates_start_at_the_global_rate_and_separate():
    rng = np.random.default_rng(2)
    estimator = AcceptanceEstimator(prior=0.7)
    assert estimator.alpha() == estimator.alpha("new") == pytest.approx(0.7)
    for good, bad in zip(
        _truncated_geometric(rng, 0.9, 4, 3000), _truncated_geometric(rng, 0.2, 4, 3000)
    ):
        estimator.observe("good", 4, int(good))
        estimator.observe("bad", 4, int(bad))
    assert estimator.alpha("good") == pytest.approx(0.9, abs=0.02)
    assert estimator.alpha("bad") == pytest.approx(0.2, abs=0.02)
    assert estimator.alpha("new") == pytest.approx(estimator.alpha())
    estimator.observe("good", 0, 0)  # no proposal: no information
    with pytest.raises(ValueError):
        estimator.observe("good", 2, 3)
    estimator.forget("good")
    assert estimator.alpha("good") == pytest.approx(estimator.alpha())


def test_linear_time_model_recovers_coefficients_and_never_fits_a_negative_slope():
    rng = np.random.default_rng(3)
    model = LinearTimeModel(("constant", "tokens", "seqs"))
    for tokens, seqs in rng.integers(1, 100, size=(50, 2)):
        model.add([1, tokens, seqs], 0.002 + 1e-4 * tokens + 3e-4 * seqs)
    model.fit()
    assert model.coefficients == pytest.approx([0.002, 1e-4, 3e-4], rel=1e-6)
    # Time that falls with tokens (noise, collinearity) must not make tokens look free.
    falling = LinearTimeModel(("constant", "tokens"))
    for tokens in range(1, 20):
        falling.add([1, tokens], 0.01 - 1e-4 * tokens)
    falling.fit()
    assert falling.coefficients[1] == 0.0 and falling.predict([1, 50]) > 0


def test_profile_fits_the_machine_it_times(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(smartspec.time, "perf_counter", lambda: clock[0])

    def target_fn(num_seqs, tokens_per_seq, context_len):  # a fake forward advancing the clock
        clock[0] += 1e-3 + 2e-5 * num_seqs * tokens_per_seq + 1e-7 * num_seqs * context_len

    def draft_fn(num_seqs, k, context_len, catch_up):
        clock[0] += 5e-4 + 1e-3 * k + 2e-4 * num_seqs * k + 3e-6 * num_seqs * catch_up

    model = smartspec.profile(target_fn, draft_fn, max_seqs=8, max_k=4)
    assert model.target.coefficients == pytest.approx([1e-3, 2e-5, 1e-7, 0, 0, 0, 0], abs=1e-9)
    assert model.draft.coefficients == pytest.approx([5e-4, 1e-3, 2e-4, 3e-6], rel=1e-6)
    # k = 0 costs no drafting; k = 2 for 3 requests: 9 tokens plus two draft passes.
    assert model.predict([0, 0, 0], 300) == pytest.approx(1e-3 + 2e-5 * 3 + 1e-7 * 300)
    assert model.predict([2, 2, 2], 300) == pytest.approx(
        1e-3 + 2e-5 * 9 + 1e-7 * 300 + 5e-4 + 1e-3 * 2 + 2e-4 * 6
    )


def test_online_steps_fit_the_engine_overhead_that_bare_forwards_miss(monkeypatch):
    """Real steps cost a bare forward plus per-request work (sampling, verification,
    bookkeeping) that the start-up profile cannot see; the refit must learn it."""
    clock = [0.0]
    monkeypatch.setattr(smartspec.time, "perf_counter", lambda: clock[0])

    def forward(num_seqs, tokens_per_seq, context_len) -> float:
        return 1e-3 + 2e-5 * num_seqs * tokens_per_seq + 1e-7 * num_seqs * context_len

    def target_fn(num_seqs, tokens_per_seq, context_len):
        clock[0] += forward(num_seqs, tokens_per_seq, context_len)

    model = smartspec.profile(target_fn, max_seqs=16, max_k=4, refit_every=10)
    rng = np.random.default_rng(0)
    for _ in range(40):  # decode steps, mostly plain, as SmartSpec observes them
        batch, k = int(rng.integers(1, 17)), int(rng.choice([0, 0, 0, 2]))
        step = forward(batch, k + 1, 50) + 5e-4 + 3e-4 * batch  # the engine's overhead
        model.observe([k] * batch, batch * (k + 1), 50 * batch, batch, step)
    truth = forward(16, 1, 50) + 5e-4 + 3e-4 * 16
    assert model.predict([0] * 16, 50 * 16) == pytest.approx(truth, rel=1e-6)
    assert model.predict([2] * 16, 50 * 16, drafting=False) == pytest.approx(
        forward(16, 3, 50) + 5e-4 + 3e-4 * 16, rel=1e-6
    )
    # Negative control: the profile alone predicts the bare forward, far below the real step.
    bare = smartspec.profile(target_fn, max_seqs=16, max_k=4)
    assert bare.predict([0] * 16, 50 * 16) < 0.6 * truth


def _position_dependent(rng, rates: list[float], steps: int) -> np.ndarray:
    """Accepted drafts per step when position j passes with probability rates[j]."""
    passes = rng.random((steps, len(rates))) < np.array(rates)
    return np.cumprod(passes, axis=1).sum(axis=1)


def test_position_rates_recover_a_profile_that_one_alpha_cannot():
    """Our copy task: three drafts pass, the fourth fails. Each position's rate is recovered
    from truncated counts; the pooled α (negative control) over-rates position 4 sevenfold."""
    rng = np.random.default_rng(3)
    truth = [0.95, 0.9, 0.95, 0.1, 0.9, 0.9]
    estimator = AcceptanceEstimator()
    for accepted in _position_dependent(rng, truth, 5000):
        estimator.observe("copy", len(truth), int(accepted))
    assert estimator.position_alphas("copy", 6) == pytest.approx(truth, abs=0.03)
    assert estimator.position_alphas("new", 4) == pytest.approx(truth[:4], abs=0.03)
    assert estimator.alpha("copy") > 7 * truth[3]
    # Constant acceptance: every position gives the pooled α.
    constant = AcceptanceEstimator()
    for accepted in _truncated_geometric(rng, 0.6, 4, 20_000):
        constant.observe("r", 4, int(accepted))
    assert constant.position_alphas("r", 4) == pytest.approx([0.6] * 4, abs=0.02)


def test_a_request_keeps_its_own_level_under_the_global_position_profile():
    """A request seen only at position 1, where it passes 30%: its later positions follow its
    level, not the others' 0.8 (negative control: a new request gets the global profile)."""
    rng = np.random.default_rng(4)
    estimator = AcceptanceEstimator()
    for accepted in _truncated_geometric(rng, 0.8, 4, 3000):
        estimator.observe("others", 4, int(accepted))
    for step in range(30):
        estimator.observe("hard", 1, int(step % 10 < 3))
    hard = estimator.position_alphas("hard", 4)
    assert hard == pytest.approx([estimator.alpha("hard")] * 4, abs=0.02) and max(hard) < 0.45
    assert estimator.position_alphas("new", 4) == pytest.approx([0.8] * 4, abs=0.03)


def test_the_request_level_applies_only_where_it_predicts_better():
    """Draft-like traffic (every request on one position profile) selects the global profile;
    traffic whose requests differ (each at its own rate) keeps the level."""
    rng = np.random.default_rng(5)
    shared = AcceptanceEstimator()
    for request in range(300):  # 5 steps each, all from the same profile
        for accepted in _position_dependent(rng, [0.95, 0.9, 0.95, 0.1], 5):
            shared.observe(request, 4, int(accepted))
    shared.observe("unlucky", 4, 0)
    shared.observe("unlucky", 4, 0)
    assert not shared.uses_request_level
    profile = shared.rates_at_positions(None, 4, request_level=False)
    assert shared.position_alphas("unlucky", 4) == pytest.approx(profile)
    # Negative control: the level model would have cut the unlucky request's rates by 15%+.
    cut = shared.rates_at_positions("unlucky", 4, request_level=True)
    assert all(rate < 0.85 * full for rate, full in zip(cut[:3], profile[:3]))
    own_rates = AcceptanceEstimator()
    for request in range(200):  # 20 steps each, at the request's own rate
        for accepted in _truncated_geometric(rng, rng.uniform(0.05, 0.6), 4, 20):
            own_rates.observe(request, 4, int(accepted))
    assert own_rates.uses_request_level


def _time_model(
    constant=0.01, per_token=1e-4, spec_overhead=0.0, draft=(0.0, 0.0, 0.0), catch_up=0.0
):
    model = StepTimeModel()
    model.target.coefficients = [constant, per_token, 0.0, 0.0, spec_overhead, 0.0, 0.0]
    model.draft.coefficients = [*draft, catch_up]
    return model


def _controller(time_model, alphas, max_k=8, **kwargs) -> tuple[SmartSpec, list[SpecCandidate]]:
    estimator = AcceptanceEstimator(prior_strength=1e-9)  # α exactly as injected below
    for i, alpha in enumerate(alphas):
        estimator._per_request[i] = (alpha, 1 - alpha)
    requests = [SpecCandidate(i, 100, max_k) for i in range(len(alphas))]
    return SmartSpec(time_model, max_k, estimator, **kwargs), requests


def test_expensive_speculation_chooses_zero_and_cheap_verification_speculates():
    expensive = _time_model(constant=1e-3, per_token=1e-2)  # every verified token costs a lot
    controller, requests = _controller(expensive, [0.8] * 8)
    assert controller.choose(requests) == [0] * 8
    cheap = _time_model(constant=0.05, per_token=1e-5)  # memory-bound: tokens nearly free
    controller, requests = _controller(cheap, [0.9] * 8)
    chosen = controller.choose(requests)
    assert min(chosen) > 0 and len(set(chosen)) == 1
    metrics = controller.metrics()
    assert metrics["spec_k_max"] == chosen[0]
    assert metrics["spec_goodput_predicted"] > metrics["spec_goodput_no_spec"]
    free = _time_model(constant=0.05, per_token=0.0)
    controller, requests = _controller(free, [0.5] * 4, max_k=6)
    assert controller.choose(requests) == [6] * 4  # verification is free: K_max
    controller, requests = _controller(cheap, [0.0] * 4)
    assert controller.choose(requests) == [0] * 4  # nothing is ever accepted


def test_chosen_k_falls_with_verification_cost_and_rises_with_acceptance():
    def k_for(per_token, alpha):
        controller, requests = _controller(_time_model(per_token=per_token), [alpha] * 4)
        return controller.choose(requests)[0]

    costs = [1e-5, 1e-4, 5e-4, 1e-3, 3e-3, 1e-2]
    by_cost = [k_for(c, 0.8) for c in costs]
    assert by_cost == sorted(by_cost, reverse=True) and by_cost[0] > by_cost[-1] == 0
    by_alpha = [k_for(5e-4, a) for a in (0.1, 0.3, 0.5, 0.7, 0.9, 0.99)]
    assert by_alpha == sorted(by_alpha) and by_alpha[0] < by_alpha[-1]


def test_no_spec_bias_flips_near_ties_to_zero():
    # Chosen so speculating beats k = 0 by ~5%: less than the 10% margin.
    time_model = _time_model(constant=0.01, per_token=7.5e-3)
    controller, requests = _controller(time_model, [0.5], no_spec_bias=1.0)
    assert controller.choose(requests) != [0]
    gain = (
        controller.metrics()["spec_goodput_predicted"]
        / controller.metrics()["spec_goodput_no_spec"]
    )
    assert 1.0 < gain < 1.1
    controller, requests = _controller(time_model, [0.5], no_spec_bias=1.1)
    assert controller.choose(requests) == [0]


def _serve(true_alpha: float, steps: int = 200, **kwargs) -> tuple[list[int], SmartSpec]:
    """Decisions of a SmartSpec over `steps` steps of 4 requests whose drafts pass with
    probability true_alpha, starting from the estimator's 0.7 prior; the draft costs 4 ms a
    pass, so speculation pays at α = 0.95 and not at the prior."""
    rng = np.random.default_rng(0)
    time_model = _time_model(constant=0.01, per_token=1e-4, draft=(2e-3, 4e-3, 0.0))
    controller = SmartSpec(time_model, 8, AcceptanceEstimator(), **kwargs)
    requests = [SpecCandidate(i, 100, 8) for i in range(4)]
    drafted_per_step = []
    for _ in range(steps):
        ks = controller.choose(requests)
        for request, k in zip(requests, ks):
            if k:
                accepted = int(_truncated_geometric(rng, true_alpha, k, 1)[0])
                controller.estimator.observe(request.request_id, k, accepted)
        drafted_per_step.append(sum(ks))
    return drafted_per_step, controller


def test_exploration_corrects_a_prior_under_which_speculation_never_pays():
    # Negative control: without exploration k = 0 is absorbing and α stays at the prior.
    drafted, controller = _serve(0.95, explore_every=None)
    assert sum(drafted) == 0 and controller.estimator.alpha() == pytest.approx(0.7)
    drafted, controller = _serve(0.95, explore_every=32)
    first = next(step for step, n in enumerate(drafted) if n)
    assert first == 32 and controller.metrics()["spec_explored"] == 0.0
    assert all(drafted[first:]) and controller.estimator.alpha() > 0.9
    # Where speculation really does not pay, exploring costs one step in explore_every + 1.
    drafted, controller = _serve(0.05, explore_every=32)
    assert 0 < sum(n > 0 for n in drafted) <= 200 // 33
    assert controller.estimator.alpha() < 0.5  # measured, far below the 0.7 prior


def _brute_force(time_model, alphas, max_k) -> float:
    best = 0.0
    for ks in itertools.product(range(max_k + 1), repeat=len(alphas)):
        tokens = sum(expected_generated(a, k) for a, k in zip(alphas, ks))
        best = max(best, tokens / time_model.predict(ks, 100 * len(alphas)))
    return best


@pytest.mark.parametrize("seed", range(12))
def test_per_request_greedy_equals_brute_force_when_cost_is_affine_in_total_k(seed):
    """Also with the fixed costs of speculating and a draft's per-token cost (seeds 6-11), which
    make G non-unimodal. (A per-pass cost, on max k_i, is not linear in Σk_i: there the greedy
    is a heuristic, not the optimum, so it is left out.)"""
    rng = np.random.default_rng(seed)
    alphas = list(rng.uniform(0.05, 0.95, size=int(rng.integers(1, 4))))
    per_token = float(rng.uniform(1e-4, 4e-3))
    spec_overhead, draft_fixed, draft_per_token = rng.uniform(0, [4e-3, 4e-3, 1e-3])
    if seed < 6:  # cost linear in Σk_i
        spec_overhead = draft_fixed = draft_per_token = 0.0
    time_model = _time_model(
        constant=0.01,
        per_token=per_token,
        spec_overhead=float(spec_overhead),
        draft=(float(draft_fixed), 0.0, float(draft_per_token)),
    )
    controller, requests = _controller(time_model, alphas, max_k=3, no_spec_bias=1.0)
    controller.choose(requests)
    predicted = controller.metrics()["spec_goodput_predicted"]
    alphas = [controller.estimator.alpha(r.request_id) for r in requests]
    assert predicted == pytest.approx(_brute_force(time_model, alphas, 3), rel=1e-12)


def test_per_request_choice_follows_each_requests_acceptance():
    controller, requests = _controller(_time_model(per_token=1e-3), [0.95, 0.5, 0.1])
    high, mid, low = controller.choose(requests)
    assert high > mid > low == 0


def test_smartspec_stops_before_the_position_that_usually_fails():
    """With positions 1-3 passing and 4 failing, SmartSpec verifies 3; under one pooled α
    (negative control: the paper's model) the same time model's best k is longer."""
    rng = np.random.default_rng(5)
    time_model = _time_model(constant=0.01, per_token=1e-4, draft=(0.0, 1e-3, 0.0))
    controller = SmartSpec(time_model, max_k=8)
    for accepted in _position_dependent(rng, [0.95, 0.95, 0.95, 0.1, 0.95, 0.95, 0.95, 0.95], 200):
        controller.estimator.observe("r", 8, int(accepted))
    assert controller.choose([SpecCandidate("r", 100, 8)]) == [3]
    alpha = controller.estimator.alpha("r")
    pooled = max(
        range(9), key=lambda k: expected_generated(alpha, k) / time_model.predict([k], 100)
    )
    assert pooled > 3


def test_equal_acceptance_gives_the_uniform_scan_and_fixed_costs_do_not_stop_it_early():
    # A large fixed cost of speculating: k = 1 loses to k = 0, yet a longer k wins (G is not
    # unimodal, so a scan that stops at the first non-improving k would wrongly return 0).
    time_model = _time_model(constant=0.01, per_token=1e-5, draft=(0.012, 0.0, 0.0))
    uniform, requests = _controller(time_model, [0.9] * 3, max_k=8, per_request=False)
    per_request, _ = _controller(time_model, [0.9] * 3, max_k=8)
    k_uniform, k_greedy = uniform.choose(requests), per_request.choose(requests)
    assert k_uniform == k_greedy and k_uniform[0] > 1
    g = {k: 3 * expected_generated(0.9, k) / time_model.predict([k] * 3, 300) for k in range(9)}
    assert g[1] < 1.1 * g[0] < g[k_uniform[0]] == max(g.values())


def test_caps_limit_proposals_and_requests_without_proposals_count_one_token():
    controller, _ = _controller(_time_model(constant=0.05, per_token=0.0), [0.9, 0.9, 0.9])
    requests = [SpecCandidate(0, 50, 2), SpecCandidate(1, 50, 0), SpecCandidate(2, 50, 20)]
    assert controller.choose(requests) == [2, 0, 8]


@pytest.mark.parametrize("per_request", [True, False])
def test_a_choices_predicted_time_is_the_time_models_with_every_term(per_request):
    """choose() folds the step time into (Σk, max k, Σ catch-up) per prefix: it must equal
    predict() on the chosen lengths, the draft's per-pass term (max k), the catch-up of the
    requests that draft, and every target feature included."""
    time_model = _time_model(constant=0.01, per_token=1e-4, spec_overhead=5e-4,
                             draft=(1e-3, 4e-4, 1e-5), catch_up=2e-6)  # fmt: skip
    time_model.target.coefficients[2:4] = [2e-6, 1e-4]  # context tokens, sequences
    time_model.target.coefficients[5:] = [3e-4, 2e-4]  # the engine's own overhead
    alphas = [0.95, 0.8, 0.6, 0.3]
    controller, requests = _controller(time_model, alphas, max_k=6, per_request=per_request)
    requests = [SpecCandidate(r.request_id, 100, r.max_k, 10 * i) for i, r in enumerate(requests)]
    ks = controller.choose(requests, other_tokens=7)
    assert any(ks) and (len(set(ks)) > 1) == per_request
    catch_up = sum(r.catch_up for r, k in zip(requests, ks) if k)
    assert catch_up > 0
    seconds = controller.metrics()["spec_step_seconds_predicted"]
    assert seconds == pytest.approx(
        time_model.predict(ks, 400, other_tokens=7, catch_up_tokens=catch_up), rel=1e-12
    )
    # Negative controls: leaving out the draft's passes, the prefill tokens or the catch-up
    # changes it.
    assert seconds != pytest.approx(time_model.predict(ks, 400, 7, False, catch_up), rel=1e-6)
    assert seconds != pytest.approx(time_model.predict(ks, 400, catch_up_tokens=catch_up), rel=1e-6)
    assert seconds != pytest.approx(time_model.predict(ks, 400, other_tokens=7), rel=1e-6)


def test_a_request_the_draft_must_catch_up_speculates_only_when_that_pays():
    """Two requests alike but for the draft's catch-up: the one in step drafts; the lagging one
    (a long prompt the draft has not seen) does not, when catching it up costs more than its
    drafts would save. Negative control: with a free catch-up, both draft."""
    time_model = _time_model(constant=0.01, per_token=1e-4, draft=(0.0, 1e-3, 0.0), catch_up=1e-4)
    controller, (in_step, lagging) = _controller(time_model, [0.8, 0.8], max_k=4)
    lagging = SpecCandidate(lagging.request_id, lagging.context_len, lagging.max_k, catch_up=500)
    k_in_step, k_lagging = controller.choose([in_step, lagging])
    assert k_in_step > 0 and k_lagging == 0
    free = _time_model(constant=0.01, per_token=1e-4, draft=(0.0, 1e-3, 0.0), catch_up=0.0)
    controller, _ = _controller(free, [0.8, 0.8], max_k=4)
    assert all(controller.choose([in_step, lagging]))


def test_catching_up_is_charged_over_the_steps_a_request_has_left():
    """Catching a lagging request up is paid once and serves all its later drafting steps. The
    500-token catch-up of the test above, with 64 tokens left: a step's share is small and the
    request drafts. Negative controls: with 5 tokens left, or when finished requests say it
    stops at its third token, the share stays large and it does not."""
    time_model = _time_model(constant=0.01, per_token=1e-4, draft=(0.0, 1e-3, 0.0), catch_up=1e-4)
    controller, _ = _controller(time_model, [0.8], max_k=4)
    long_lived = SpecCandidate(0, 100, 4, catch_up=500, generated=1, tokens_left=64)
    assert controller.choose([long_lived])[0] > 0
    assert controller.choose([dataclasses.replace(long_lived, tokens_left=5)]) == [0]
    for _ in range(50):
        controller.lengths.observe(3, stopped=True)
    assert controller.choose([long_lived]) == [0]


def test_output_length_hazard_is_kaplan_meier_with_censoring():
    """Four requests stopped at length 3 and four ran into max_tokens at 5: at 3 the hazard is
    4 stops of 8 at risk (+1 pseudo-count); the capped ones are censored, not stops (negative
    control: counting them as stops would give 4/5 at length 5)."""
    lengths = OutputLengthModel()
    assert lengths.continuation(0, 3) == [1.0, 1.0, 1.0]  # nothing seen: no discount
    for _ in range(4):
        lengths.observe(3, stopped=True)
        lengths.observe(5, stopped=False)
    lengths.observe(0, stopped=True)  # ended before a token (an error): ignored
    assert lengths.hazard(3) == pytest.approx(4 / 9)
    assert lengths.hazard(5) == 0.0 and lengths.hazard(2) == 0.0 and lengths.hazard(40) == 0.0
    # Generated 1: proposals 1-3 are tokens 3-5, wanted unless the request stopped at 2, 3, 4.
    assert lengths.continuation(1, 3) == pytest.approx([1.0, 5 / 9, 1.0])


def test_smartspec_does_not_draft_past_where_requests_usually_stop():
    """Requests of this workload stop at length 3. A request that has generated 1 token keeps
    its next one (the step's own) and one draft; SmartSpec drafts 1. The same controller
    without the stop data (negative control) drafts longer: α is high and a verified token
    costs a tenth of the step."""
    controller, _ = _controller(_time_model(constant=0.01, per_token=1e-3), [0.95])
    request = [SpecCandidate(0, 100, 8, generated=1)]
    unaware = controller.choose(request)[0]
    assert unaware > 2
    for _ in range(50):
        controller.lengths.observe(3, stopped=True)
    assert controller.choose(request) == [1]
    # Past the usual stop nothing is known: back to the unaware choice.
    assert controller.choose([SpecCandidate(0, 100, 8, generated=3)]) == [unaware]
