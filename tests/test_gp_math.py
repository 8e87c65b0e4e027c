"""The GP ensemble's defining properties (kiln.gp.ensemble) on random features, float64.

Each property test carries a negative control: an input on which a no-op or wrong
implementation would pass the property check too, had the check been vacuous.
"""

import math

import gpytorch
import pytest
import torch

from kiln.gp import ensemble
from kiln.gp.baselines import scores
from kiln.gp.ensemble import GPEnsemble, argmax_probabilities, fit_gp, pack_inputs

DIMS = {"a": 5, "b": 4, "c": 3}
CLASSES = ["x", "y", "z"]


def _toy(n: int = 9, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    features = {
        name: torch.randn(n, d, generator=g, dtype=torch.float64) for name, d in DIMS.items()
    }
    zero_shot = torch.rand(n, len(CLASSES), generator=g, dtype=torch.float64)
    labels = torch.arange(n) % len(CLASSES)
    return features, zero_shot, labels


def _gp(x, targets, weights=(0.5, 1.0, 2.0), lengthscales=(0.7, 1.0, 1.5), noise=0.05, scale=2.0,
        offset=0.3) -> GPEnsemble:  # fmt: skip
    gp = GPEnsemble(x, targets, DIMS)
    for kernel, weight, lengthscale in zip(gp.covar_module.kernels, weights, lengthscales):
        kernel.outputscale = weight
        kernel.base_kernel.lengthscale = lengthscale
    gp.likelihood.noise = noise
    gp.mean_module.scale.data.fill_(scale)
    gp.mean_module.offset.data.fill_(offset)
    return gp.eval()


def _one_hot(labels):
    return torch.nn.functional.one_hot(labels, len(CLASSES)).double()


@pytest.fixture(autouse=True)
def one_thread():
    """Matrices of at most 24 x 24: threads only contend (x30 slower on a busy 2-core host)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def toy():
    features, zero_shot, labels = _toy()
    test_features, test_zero_shot, _ = _toy(n=7, seed=1)
    return pack_inputs(features, zero_shot), labels, pack_inputs(test_features, test_zero_shot)


def test_zero_kernel_or_infinite_noise_returns_the_clip_prior(toy):
    x, labels, x_test = toy
    # Labels that disagree with the prior, so any working correction would move the mean.
    prior = _gp(x, _one_hot(labels)).prior_mean(x_test)
    zero_kernel = _gp(x, _one_hot(labels), weights=(0.0, 0.0, 0.0))
    mean, variance = zero_kernel.posterior(x_test)
    assert torch.equal(mean, prior) and torch.equal(variance, torch.zeros(7, dtype=torch.float64))
    mean, _ = _gp(x, _one_hot(labels), noise=1e12).posterior(x_test)
    torch.testing.assert_close(mean, prior, atol=1e-10, rtol=0)
    # Negative control: a non-zero kernel with finite noise moves the mean.
    mean, _ = _gp(x, _one_hot(labels)).posterior(x_test)
    assert (mean - prior).abs().max() > 0.05


def test_no_training_data_returns_the_prior(toy):
    x, labels, x_test = toy
    empty = _gp(x[:0], _one_hot(labels)[:0])
    mean, variance = empty.posterior(x_test)
    torch.testing.assert_close(mean, empty.prior_mean(x_test), atol=0, rtol=0)
    torch.testing.assert_close(
        variance, empty.kernel(x_test, x_test).diagonal(), atol=1e-12, rtol=0
    )
    # Negative control: one training point at a test input lowers its variance.
    one = _gp(x_test[:1], _one_hot(labels)[:1])
    assert one.posterior(x_test[:1])[1] < 0.1 * variance[0]


def test_labels_equal_to_the_prior_leave_the_mean_unchanged(toy):
    x, labels, x_test = toy
    at_prior = _gp(x, _one_hot(labels)).prior_mean(x)
    gp = _gp(x, at_prior)
    mean, _ = gp.posterior(x_test)
    torch.testing.assert_close(mean, gp.prior_mean(x_test), atol=1e-10, rtol=0)
    # Adding a constant to both the labels and the mean leaves the correction μ − m unchanged...
    base = _gp(x, _one_hot(labels))
    shifted = _gp(x, _one_hot(labels) + 5.0, offset=0.3 + 5.0)
    correction = base.posterior(x_test)[0] - base.prior_mean(x_test)
    shifted_correction = shifted.posterior(x_test)[0] - shifted.prior_mean(x_test)
    torch.testing.assert_close(shifted_correction, correction, atol=1e-9, rtol=0)
    # ...negative control: shifting the labels alone changes it.
    labels_only = _gp(x, _one_hot(labels) + 5.0)
    moved = labels_only.posterior(x_test)[0] - labels_only.prior_mean(x_test)
    assert (moved - correction).abs().max() > 0.1


def test_posterior_interpolates_as_noise_vanishes(toy):
    x, labels, _ = toy
    targets = _one_hot(labels)
    errors = []
    for noise in (1e-1, 1e-3, 2e-6):
        mean, variance = _gp(x, targets, noise=noise).posterior(x)
        errors.append((mean - targets).abs().max().item())
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-3
    assert variance.max() < 1e-4
    # Negative control: with unit noise the posterior smooths instead of interpolating.
    mean, variance = _gp(x, targets, noise=1.0).posterior(x)
    assert (mean - targets).abs().max() > 0.1 and variance.max() > 0.1


def test_log_marginal_likelihood_equals_gpytorch(toy):
    x, labels, _ = toy
    gp = _gp(x, _one_hot(labels)).train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(gp.likelihood, gp)
    with gpytorch.settings.max_cholesky_size(10**6):  # exact Cholesky, not CG
        # gpytorch averages over the N points of each class's GP; ours sums over both.
        theirs = mll(gp(*gp.train_inputs), gp.train_targets).sum() * len(x)
    ours = gp.log_marginal_likelihood()
    torch.testing.assert_close(ours, theirs, atol=1e-8, rtol=1e-10)
    # Negative control: the same model with the mean dropped (R = Y) gives another value, so
    # the parity above checks the mean term, not only the kernel and noise.
    zero_mean = _gp(x, _one_hot(labels), scale=0.0, offset=0.0)
    assert (zero_mean.log_marginal_likelihood() - ours).abs() > 1.0


def test_ensemble_kernel_is_psd_and_a_weighted_sum(toy):
    x, labels, _ = toy
    for seed in range(5):
        weights = torch.rand(3, generator=torch.Generator().manual_seed(seed)) * 3
        kernel = _gp(x, _one_hot(labels), weights=weights.tolist()).kernel(x, x)
        assert torch.linalg.eigvalsh(kernel).min() > -1e-6
    # A single non-zero weight gives that model's RBF kernel, written out by hand.
    only_b = _gp(x, _one_hot(labels), weights=(0.0, 1.7, 0.0)).kernel(x, x)
    b = x[:, 5:9]
    by_hand = 1.7 * torch.exp(-torch.cdist(b, b).square() / (2 * 1.0**2))
    torch.testing.assert_close(only_b, by_hand, atol=1e-6, rtol=0)  # softplus round trip
    doubled = _gp(x, _one_hot(labels), weights=(1.0, 2.0, 4.0)).kernel(x, x)
    torch.testing.assert_close(
        doubled, 2 * _gp(x, _one_hot(labels), weights=(0.5, 1.0, 2.0)).kernel(x, x)
    )
    # The weights are constrained non-negative, however far the raw parameter is pushed...
    gp = _gp(x, _one_hot(labels))
    gp.covar_module.kernels[0].raw_outputscale.data.fill_(-50.0)
    assert gp.kernel_weights["a"] >= 0
    # ...negative control: a sum with a negative weight is not PSD, and the check sees it.
    a_only = _gp(x, _one_hot(labels), weights=(1.0, 0.0, 0.0)).kernel(x, x)
    assert torch.linalg.eigvalsh(a_only - 2 * only_b).min() < -1e-3


def test_permuting_classes_permutes_outputs(toy):
    x, labels, x_test = toy
    n_features = sum(DIMS.values())
    order = torch.tensor([2, 0, 1])

    def permuted(inputs):
        return torch.cat([inputs[:, :n_features], inputs[:, n_features:][:, order]], 1)

    gp = _gp(x, _one_hot(labels))
    mean, variance = gp.posterior(x_test)
    swapped = _gp(permuted(x), _one_hot(labels)[:, order])
    swapped_mean, swapped_variance = swapped.posterior(permuted(x_test))
    torch.testing.assert_close(swapped_mean, mean[:, order], atol=1e-12, rtol=0)
    torch.testing.assert_close(swapped_variance, variance, atol=1e-12, rtol=0)
    # Negative control: permuting the labels but not the CLIP mean is not a relabelling.
    labels_only = _gp(x, _one_hot(labels)[:, order]).posterior(x_test)[0]
    assert (labels_only - mean[:, order]).abs().max() > 0.05


def _grows_with_distance(variance: torch.Tensor) -> bool:
    return bool((variance.diff() > 0).all())


def test_uncertainty_grows_away_from_the_data():
    n = 12
    features, zero_shot, labels = _toy(n)
    x = pack_inputs(features, zero_shot)
    gp = _gp(x, _one_hot(labels))
    # Points walking away from training point 0, in every model's (normalised) feature space.
    direction = torch.nn.functional.normalize(
        torch.randn(sum(DIMS.values()), dtype=torch.float64), dim=0
    )
    walk = torch.stack([x[0]] * 6)
    walk[:, : sum(DIMS.values())] += torch.linspace(0, 1.5, 6)[:, None] * direction
    with torch.no_grad():
        mean, variance = gp.posterior(walk)
        probabilities = argmax_probabilities(mean, (variance + gp.likelihood.noise).sqrt())
    assert _grows_with_distance(variance)
    # Negative control: a predictor that returns the prior variance everywhere fails the check.
    assert not _grows_with_distance(gp.kernel(walk, walk).diagonal())
    assert 0 <= scores(probabilities, labels[:6])["ece"] <= 1


def test_probabilities_match_monte_carlo_and_keep_the_argmax():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(20, 4, generator=g, dtype=torch.float64)
    std = torch.rand(20, generator=g, dtype=torch.float64) + 0.2
    probabilities = argmax_probabilities(mean, std)
    samples = mean + std[:, None] * torch.randn(20000, 20, 4, generator=g, dtype=torch.float64)
    frequencies = torch.nn.functional.one_hot(samples.argmax(-1), 4).double().mean(0)
    torch.testing.assert_close(probabilities, frequencies, atol=0.02, rtol=0)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(20, dtype=torch.float64))
    assert torch.equal(probabilities.argmax(1), mean.argmax(1))


def test_leave_one_out_equals_refitting_without_the_point():
    features, zero_shot, labels = _toy(n=10, seed=5)
    x, targets = pack_inputs(features, zero_shot), _one_hot(labels)
    gp = _gp(x, targets)
    loo_mean, loo_std = gp.leave_one_out()
    for i in (0, 4, 9):
        keep = torch.arange(len(x)) != i
        without = _gp(x[keep], targets[keep])  # same hyper-parameters, point i removed
        with torch.no_grad():
            mean, variance = without.posterior(x[i : i + 1])
        torch.testing.assert_close(loo_mean[i], mean[0])
        torch.testing.assert_close(loo_std[i], (variance[0] + gp.likelihood.noise[0]).sqrt())
        # Negative control: the in-sample posterior, which has seen point i, differs.
        with torch.no_grad():
            in_sample = gp.posterior(x[i : i + 1])[0][0]
        assert (in_sample - loo_mean[i]).abs().max() > 1e-3


def test_temperature_sharpens_right_held_out_predictions_and_widens_wrong_ones():
    n = 24
    features, zero_shot, labels = _toy(n, seed=3)
    g = torch.Generator().manual_seed(4)
    features["a"] = _one_hot(labels) @ torch.eye(3, DIMS["a"], dtype=torch.float64)
    features["a"] += 0.05 * torch.randn(n, DIMS["a"], generator=g, dtype=torch.float64)
    gp = fit_gp(features, zero_shot, labels, CLASSES, iterations=60)
    assert (gp.leave_one_out()[0].argmax(1) == labels).all()
    floor = ensemble.LOG_TEMPERATURE_GRID[0].exp().item()
    assert floor < gp.temperature.item() < 1.0
    # Negative control: without the prior on log τ, all-right held-out predictions drive τ
    # to the grid's floor (the collapse the prior is there to stop).
    assert gp.fit_temperature(prior_width=math.inf) == pytest.approx(floor)
    # Labels unrelated to a confident GP: τ widens the predictive instead.
    x = pack_inputs(*_toy(n, seed=6)[:2])
    shuffled = _one_hot(labels[torch.randperm(n, generator=g)])
    assert _gp(x, shuffled, noise=0.01).fit_temperature() > 1.0


@pytest.mark.parametrize("informative", ["a", "b"])
def test_marginal_likelihood_weights_the_informative_model(informative):
    n = 24
    features, zero_shot, labels = _toy(n, seed=3)
    g = torch.Generator().manual_seed(4)
    signal = torch.nn.functional.one_hot(labels, DIMS[informative]).double()
    features[informative] = signal + 0.05 * torch.randn(
        n, DIMS[informative], generator=g, dtype=torch.float64
    )
    gp = fit_gp(features, zero_shot, labels, CLASSES, iterations=60)
    weights = gp.kernel_weights
    other = "b" if informative == "a" else "a"
    # Swapping which model carries the labels swaps the weights (the parametrisation is the
    # negative control of the other case).
    assert weights[informative] > 10 * weights[other]
    assert gp.posterior(pack_inputs(features, zero_shot))[0].argmax(1).eq(labels).all()


def test_a_lengthscale_driven_to_underflow_keeps_the_likelihood_finite(toy):
    # L-BFGS drove a single-CLIP-kernel fit (16 shots) to lengthscale 1.6e-173 with weight
    # 1e-78: features divided by it overflow and the kernel turns NaN, and the fit crashed in
    # the Cholesky. The floor keeps such a kernel a finite, near-diagonal matrix.
    x, labels, _ = toy
    gp = _gp(x, _one_hot(labels))
    for kernel in gp.covar_module.kernels:
        kernel.base_kernel.raw_lengthscale.data.fill_(-400.0)  # softplus: 1.9e-174
    assert torch.isfinite(gp.log_marginal_likelihood())
    lengthscales = [k.base_kernel.lengthscale.item() for k in gp.covar_module.kernels]
    assert min(lengthscales) == pytest.approx(ensemble.LENGTHSCALE_FLOOR)
    kernel = gp.kernel(x, x)
    torch.testing.assert_close(kernel, torch.diag(kernel.diagonal()))  # distinct points: 0


def test_bad_inputs_name_the_argument():
    features, zero_shot, labels = _toy()
    with pytest.raises(ValueError, match=r"classes \['z'\] have zero shots"):
        fit_gp(features, zero_shot, labels.clamp(max=1), CLASSES, iterations=1)
    gp = fit_gp(features, zero_shot, labels, CLASSES, iterations=1)
    wrong = dict(features, b=features["b"][:, :3])
    with pytest.raises(ValueError, match=r"features\['b'\]: expected \[9, 4\]"):
        gp.predict(wrong, zero_shot)
    with pytest.raises(ValueError, match=r"zero_shot: expected \[N, 3\]"):
        fit_gp(features, zero_shot[:, :2], labels, CLASSES)
    with pytest.raises(ValueError, match=r"features: expected the models \['a', 'b', 'c'\]"):
        gp.predict({"a": features["a"]}, zero_shot)
    with pytest.raises(ValueError, match=r"zero_shot: expected \[N, 3\]"):
        gp.predict(features, zero_shot[:, :2])


def test_save_and_load_give_the_same_predictions(tmp_path):
    features, zero_shot, labels = _toy()
    gp = fit_gp(features, zero_shot, labels, CLASSES, iterations=5)
    gp.save(tmp_path)
    again = GPEnsemble.load(tmp_path)
    before, after = gp.predict(features, zero_shot), again.predict(features, zero_shot)
    for name in ("mean", "variance", "probabilities"):
        assert torch.equal(getattr(before, name), getattr(after, name)), name
    assert again.kernel_weights == gp.kernel_weights
    assert gp.temperature != 1.0 and again.temperature == gp.temperature
