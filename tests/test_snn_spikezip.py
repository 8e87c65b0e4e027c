"""SpikeZIP-TF math (kiln.snn): the brief's properties on tiny models, CPU, no Ray.

Exact checks run in float64, where the two summation orders (QANN: one sum; SNN: step by step)
differ by ~1e-16 and cannot flip a rounding. Each equivalence has a negative control that an
implementation doing nothing (or the naive thing) would fail.
"""

import pytest
import torch
from torch import nn

from kiln import snn
from kiln.snn.spikezip import MatMul, SpikeLinear


@pytest.fixture(autouse=True)
def _float64_one_thread():
    # One thread: these tensors are tiny, and two OpenMP threads on a busy 2-core machine spend
    # milliseconds per op waiting for each other (a 1 s test took 30 s).
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)


def _quantiser(levels: int, signed: bool, step: float) -> snn.Quantiser:
    quantiser = snn.Quantiser(levels, signed)
    quantiser.step.data.fill_(step)
    return quantiser


def _neuron(quantiser: snn.Quantiser) -> snn.STBIFNeuron:
    return snn.STBIFNeuron(quantiser.step, quantiser.q_min, quantiser.q_max)


def _input_at_zero(x: torch.Tensor, steps: int) -> torch.Tensor:
    return torch.cat([x[None], torch.zeros(steps - 1, *x.shape)])


def _tiny_qann(levels: int = 8, depth: int = 2, seed: int = 0) -> snn.ViT:
    torch.manual_seed(seed)
    config = snn.ViTConfig(image_size=4, patch_size=2, dim=8, depth=depth, heads=2, mlp_dim=16)
    qann = snn.ViT(config, levels)
    snn.calibrate(qann, torch.randn(64, 1, 4, 4))
    return qann.eval()


@pytest.mark.parametrize("levels", [4, 8, 16, 32])
@pytest.mark.parametrize("signed", [True, False])
def test_neuron_summed_over_time_equals_the_quantiser(levels, signed):
    # A dyadic step, so that the spikes sum to multiples of it without rounding: bit-exact.
    quantiser = _quantiser(levels, signed, step=0.375)
    x = torch.randn(4096) * 0.375 * levels / 2  # covers the range and beyond both bounds
    spikes = _neuron(quantiser)(_input_at_zero(x, levels + 1))
    assert torch.equal(spikes.sum(0), quantiser(x))
    # Ternary spikes; fed once, an unsigned neuron never needs a corrective -1.
    assert set((spikes / 0.375).unique().tolist()) == ({-1.0, 0.0, 1.0} if signed else {0.0, 1.0})

    # Negative control: V₀ = 0 instead of ½ gives ⌊x/s⌋, not rounding.
    floor_neuron = _neuron(quantiser)
    floor_neuron.membrane, floor_neuron.count = torch.zeros_like(x), torch.zeros_like(x)
    floored = floor_neuron(_input_at_zero(x, levels + 1)).sum(0)
    assert (floored != quantiser(x)).float().mean() > 0.1


@pytest.mark.parametrize("signed", [True, False])
def test_neuron_result_does_not_depend_on_input_timing(signed):
    levels, steps_with_input = 16, 6
    quantiser = _quantiser(levels, signed, step=0.25)
    x = torch.randn(2048) * 2
    # The same total spread unevenly over 6 steps, plus zero-sum noise of the same size.
    weights = torch.rand(steps_with_input, 1)
    noise = torch.randn(steps_with_input, x.numel())
    spread = x * weights / weights.sum() + noise - noise.mean(0)
    total = spread.sum(0)
    drain = torch.zeros(3 * levels, x.numel())
    counted = _neuron(quantiser)(torch.cat([spread, drain])).sum(0)
    torch.testing.assert_close(counted, quantiser(total), rtol=0, atol=1e-12)

    # Negative control: quantising each step's input separately (no membrane) is not Q(Σx).
    per_step = sum(quantiser(x_t) for x_t in spread)
    assert (per_step - quantiser(total)).abs().max() > 1


def test_telescoping_operators_sum_to_the_operator_of_the_sums():
    torch.manual_seed(0)
    steps = 7
    x = torch.randn(steps, 3, 5, 8, dtype=torch.float32)
    a, b = torch.randn(steps, 3, 5, 4), torch.randn(steps, 3, 4, 6)
    norm = nn.LayerNorm(8).float()
    nn.init.normal_(norm.weight), nn.init.normal_(norm.bias)
    softmax = nn.Softmax(dim=-1)
    for function, inputs, expected in [
        (norm, (x,), norm(x.sum(0))),
        (softmax, (x,), softmax(x.sum(0))),
        (MatMul(), (a, b), a.sum(0) @ b.sum(0)),
    ]:
        out = snn.Telescoping(function)(*inputs)
        torch.testing.assert_close(out.sum(0), expected, rtol=0, atol=1e-5)

    # Negative control: a per-step softmax without the running sum.
    assert (softmax(x).sum(0) - softmax(x.sum(0))).abs().max() > 0.5


def test_linear_bias_is_released_once_at_the_first_step():
    torch.manual_seed(0)
    linear = nn.Linear(6, 4)
    nn.init.normal_(linear.bias)
    x = torch.randn(5, 2, 6)
    out = SpikeLinear(linear)(_input_at_zero(x[0], 5))
    torch.testing.assert_close(out[0], linear(x[0]), rtol=0, atol=1e-12)  # W·Σx + b after t=0
    assert torch.equal(out[1:], torch.zeros_like(out[1:]))
    spread = SpikeLinear(linear)(x).sum(0)
    torch.testing.assert_close(spread, linear(x.sum(0)), rtol=0, atol=1e-12)

    # Negative control: the bias on every step adds it five times.
    assert (linear(x).sum(0) - linear(x.sum(0))).abs().max() > 0.5


def test_quantiser_values_gradients_and_calibration():
    quantiser = _quantiser(8, signed=True, step=0.5)  # range -4..3 steps: [-2, 1.5]
    x = torch.tensor([-3.0, -0.26, -0.25, 0.24, 0.25, 0.74, 0.75, 5.0], requires_grad=True)
    y = quantiser(x)
    # Round half up: -0.25 -> 0 (not -0.5), 0.25 -> 0.5, 0.75 -> 1.0.
    assert y.tolist() == [-2.0, -0.5, 0.0, 0.0, 0.5, 0.5, 1.0, 1.5]
    y.sum().backward()
    assert x.grad.tolist() == [0, 1, 1, 1, 1, 1, 1, 0]  # straight through inside the range
    # LSQ: dQ/ds = q_min or q_max outside, round(x/s) - x/s inside, scaled by 1/√(q_max·numel).
    inside = torch.floor(x[1:7] / 0.5 + 0.5) - x[1:7] / 0.5
    expected = (-4 + 3 + inside.sum()) / (3 * 8) ** 0.5
    torch.testing.assert_close(quantiser.step.grad, expected.detach().reshape(1))

    qann = _tiny_qann()
    images = torch.randn(32, 1, 4, 4)
    snn.calibrate(qann, images)
    patch = qann.patch_embed(qann.patchify(images))
    expected_step = 2 * patch.abs().mean() / qann.quant_patch.q_max**0.5
    torch.testing.assert_close(qann.quant_patch.step, expected_step.detach().reshape(1))


def test_distillation_loss_matches_the_papers_formula():
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 5), torch.randn(6, 5)
    labels = torch.randint(5, (6,))
    temperature = 2.0
    log_p_student = torch.log_softmax(student, -1)
    ce_s = -log_p_student[range(6), labels]
    ce_t = -torch.log_softmax(teacher, -1)[range(6), labels]
    soft = -(torch.softmax(teacher / 2, -1) * torch.log_softmax(student / 2, -1)).sum(-1)
    focal = 1 - torch.exp(-ce_s / ce_t)
    expected = ce_s.mean() + temperature**2 * (focal * soft).mean()
    torch.testing.assert_close(snn.distillation_loss(student, teacher, labels), expected)
    # A student far better than its teacher on every sample gets (almost) no distillation pull.
    perfect = torch.nn.functional.one_hot(labels, 5) * 50.0
    loss = snn.distillation_loss(perfect, teacher, labels)
    torch.testing.assert_close(loss, torch.tensor(0.0), atol=1e-6, rtol=0)


def test_converted_snn_equals_the_qann_and_stops_at_silence():
    qann = _tiny_qann(levels=8, depth=2)
    images = torch.randn(16, 1, 4, 4)
    expected = qann(images)
    result = snn.convert(qann).run(images, max_steps=200)
    assert result.converged and 0 < result.steps < 200
    assert (result.steps_per_sample <= result.steps).all() and result.steps_per_sample.max() == (
        result.steps
    )
    assert (result.output - expected).abs().max() < 1e-9  # the acceptance bar is 1e-5
    assert torch.equal(result.output.argmax(-1), expected.argmax(-1))
    assert set(result.spikes_per_layer) == {
        name for name, m in qann.named_modules() if isinstance(m, snn.Quantiser)
    }
    assert all(count > 0 for count in result.spikes_per_layer.values())

    # Truncated before silence, the sum is not the QANN's output.
    truncated = snn.convert(qann).run(images, max_steps=result.steps // 2)
    assert not truncated.converged
    assert (truncated.output - expected).abs().max() > 1e-2


def test_gelu_instead_of_relu_breaks_equivalence():
    qann = _tiny_qann()
    for block in qann.blocks:
        block.mlp.activation = nn.GELU()  # the SNN has no GELU of a sum; it applies it per step
    images = torch.randn(16, 1, 4, 4)
    result = snn.convert(qann).run(images, max_steps=200)
    assert (result.output - qann(images)).abs().max() > 1e-2


def test_position_embedding_added_every_step_breaks_equivalence():
    qann = _tiny_qann()
    spiking = snn.convert(qann)
    spiking.network.tokens.register_forward_pre_hook(lambda module, args: module.reset())
    images = torch.randn(16, 1, 4, 4)
    result = spiking.run(images, max_steps=64)
    assert (result.output - qann(images)).abs().max() > 1e-2


def test_stepwise_loop_equals_one_multistep_call_and_any_input_timing():
    qann = _tiny_qann()
    spiking = snn.convert(qann)
    images = torch.randn(8, 1, 4, 4)
    # The image spread over three steps in random positive shares, then silence.
    shares = torch.rand(3, 1, 1, 1, 1)
    sequence = torch.cat([images * shares / shares.sum(0), torch.zeros(60, *images.shape)])
    spiking.reset()
    all_at_once = spiking(sequence)
    spiking.reset()
    one_by_one = torch.cat([spiking(x_t[None]) for x_t in sequence])
    torch.testing.assert_close(one_by_one, all_at_once, rtol=0, atol=1e-12)
    torch.testing.assert_close(all_at_once.sum(0), qann(images), rtol=0, atol=1e-9)

    # Negative control: a loop that loses the state between steps.
    forgetful = []
    for x_t in sequence:
        spiking.reset()
        forgetful.append(spiking(x_t[None]))
    assert (torch.cat(forgetful).sum(0) - qann(images)).abs().max() > 1e-2


def test_save_and_reload_and_the_wrong_quantisation_config_fails(tmp_path):
    qann = _tiny_qann(levels=8)
    snn.save_pretrained(qann, tmp_path / "qann")
    images = torch.randn(4, 1, 4, 4)
    reloaded = snn.load_pretrained(tmp_path / "qann", levels=8).double()
    assert torch.equal(reloaded(images), qann(images))
    with pytest.raises(ValueError, match=r"quantised as levels=8 but levels=16 was asked for"):
        snn.load_pretrained(tmp_path / "qann", levels=16)
    with pytest.raises(ValueError, match=r"levels=8 but full precision"):
        snn.load_pretrained(tmp_path / "qann", levels=None)
    fp = snn.ViT(qann.config)
    snn.save_pretrained(fp, tmp_path / "fp")
    with pytest.raises(ValueError, match=r"full precision \(levels=None\) but levels=8"):
        snn.load_pretrained(tmp_path / "fp", levels=8)
    with pytest.raises(ValueError, match="needs a QANN"):
        snn.convert(fp)
