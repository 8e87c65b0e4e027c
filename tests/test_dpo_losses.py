"""kiln.dpo loss math against the properties in the paper brief (arXiv 2406.07327), each with
a negative control that a wrong or no-op implementation would fail."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from kiln.dpo import chosen_nll, dpo_loss, ipo_loss, nll_regularised_dpo_loss, sequence_logps


@pytest.fixture(autouse=True)
def _float64():
    """Exact checks in float64, restored afterwards (the default dtype is process-global)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _logps(seed=0, batch=6):
    generator = torch.Generator().manual_seed(seed)
    return [-(torch.rand(batch, generator=generator) * 20 + 1) for _ in range(4)]


def test_dpo_matches_its_closed_form():
    pc, pr, rc, rr = _logps()
    out = dpo_loss(pc, pr, rc, rr, beta=0.1)
    u = 0.1 * ((pc - rc) - (pr - rr))
    expected = torch.tensor([-math.log(1 / (1 + math.exp(-v))) for v in u.tolist()])
    torch.testing.assert_close(out.losses, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.chosen_rewards, 0.1 * (pc - rc))
    torch.testing.assert_close(out.rejected_rewards, 0.1 * (pr - rr))


def test_flex_dpo_reduces_to_dpo_exactly_and_differs_otherwise():
    pc, pr, rc, rr = _logps(1)
    plain = dpo_loss(pc, pr, rc, rr, beta=0.1)
    same = dpo_loss(pc, pr, rc, rr, beta=0.1, beta_rejected=0.1)
    assert torch.equal(plain.losses, same.losses)  # bit for bit
    flex = dpo_loss(pc, pr, rc, rr, beta=0.1, beta_rejected=0.08)
    assert not torch.allclose(flex.losses, plain.losses)  # negative control
    torch.testing.assert_close(flex.rejected_rewards, 0.08 * (pr - rr))


def test_log_space_gradients_are_symmetric_for_dpo_and_scaled_for_flex():
    pc, pr, rc, rr = (t.clone().requires_grad_() for t in _logps(2))
    dpo_loss(pc, pr, rc, rr, beta=0.1).losses.sum().backward()
    torch.testing.assert_close(pc.grad, -pr.grad)
    u = 0.1 * ((pc - rc) - (pr - rr)).detach()
    torch.testing.assert_close(-pc.grad, 0.1 * (1 - torch.sigmoid(u)))
    pc.grad = pr.grad = None
    dpo_loss(pc, pr, rc, rr, beta=0.1, beta_rejected=0.05).losses.sum().backward()
    torch.testing.assert_close(pc.grad / pr.grad, torch.full_like(pc, -0.1 / 0.05))
    assert not torch.allclose(pc.grad, -pr.grad)  # negative control: no longer symmetric


def _probability_space_grads(p_chosen, p_rejected, beta=0.1, beta_rejected=None):
    chosen = torch.tensor(p_chosen, requires_grad=True)
    rejected = torch.tensor(p_rejected, requires_grad=True)
    reference = torch.tensor(math.log(0.01))
    loss = dpo_loss(chosen.log(), rejected.log(), reference, reference, beta, beta_rejected)
    loss.losses.backward()
    return chosen.grad.item(), rejected.grad.item()


def test_corollary_1_gradient_ratio_in_probability_space():
    for p_chosen, p_rejected in [(0.3, 0.01), (0.05, 0.2), (1e-3, 1e-6)]:
        g_chosen, g_rejected = _probability_space_grads(p_chosen, p_rejected)
        assert g_rejected / g_chosen == pytest.approx(-p_chosen / p_rejected, rel=1e-9)
        g_chosen, g_rejected = _probability_space_grads(p_chosen, p_rejected, 0.1, 0.05)
        assert g_rejected / g_chosen == pytest.approx(-0.5 * p_chosen / p_rejected, rel=1e-9)


def test_corollary_2_rejected_push_diverges_while_chosen_lift_vanishes():
    sweep = [10.0**-k for k in range(2, 9)]
    grads = [_probability_space_grads(0.05, p) for p in sweep]
    chosen, rejected = [abs(g) for g, _ in grads], [abs(g) for _, g in grads]
    assert all(a > b for a, b in itertools.pairwise(chosen))
    assert all(a < b for a, b in itertools.pairwise(rejected))
    # Negative control: with β > 1 the condition of the corollary fails; the push vanishes.
    strong = [abs(_probability_space_grads(0.05, p, beta=2.0)[1]) for p in sweep]
    assert strong[-1] < strong[0]


def test_losses_depend_only_on_log_ratios():
    pc, pr, rc, rr = _logps(3)
    base = dpo_loss(pc, pr, rc, rr).losses
    torch.testing.assert_close(dpo_loss(pc + 3, pr, rc + 3, rr).losses, base)
    torch.testing.assert_close(dpo_loss(pc, pr - 2, rc, rr - 2).losses, base)
    torch.testing.assert_close(ipo_loss(pc + 3, pr - 2, rc + 3, rr - 2), ipo_loss(pc, pr, rc, rr))
    assert not torch.allclose(dpo_loss(pc + 3, pr, rc, rr).losses, base)  # negative control


def test_ipo_is_minimised_at_margin_one_over_two_beta():
    zero = torch.zeros(1)
    at_target = ipo_loss(torch.tensor([5.0]), zero, zero, zero, beta=0.1)
    assert at_target.item() == 0.0
    assert ipo_loss(torch.tensor([4.0]), zero, zero, zero, beta=0.1).item() == pytest.approx(1.0)


def test_sequence_logps_count_only_response_tokens():
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 6, 11, generator=generator)
    ids = torch.randint(11, (2, 6), generator=generator)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1]])  # prompt 0s, padding 0s
    total, per_token = sequence_logps(logits, ids, mask)
    full = logits.log_softmax(-1)
    for b in range(2):
        expected = sum(full[b, t - 1, ids[b, t]] for t in range(1, 6) if mask[b, t])
        assert total[b].item() == pytest.approx(expected.item(), rel=1e-12)
    assert torch.all(per_token[mask[:, 1:] == 0] == 0)


def test_nll_term_is_the_only_difference_and_touches_only_chosen_tokens():
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 7, 13, generator=generator, requires_grad=True)  # [chosen; rejected]
    ids = torch.randint(13, (4, 7), generator=generator)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 0]] * 4)
    reference = torch.randn(4, generator=generator) - 10

    def loss_and_grad(nll_weight, response_mask):
        logits.grad = None
        logps, per_token = sequence_logps(logits, ids, response_mask)
        out = dpo_loss(logps[:2], logps[2:], reference[:2], reference[2:])
        loss = nll_regularised_dpo_loss(out, per_token[:2], response_mask[:2, 1:], nll_weight)
        loss.backward()
        return loss.detach(), logits.grad.clone()

    loss0, grad0 = loss_and_grad(0.0, mask)
    loss1, grad1 = loss_and_grad(1.0, mask)
    _, per_token = sequence_logps(logits, ids, mask)
    assert (loss1 - loss0).item() == pytest.approx(chosen_nll(per_token[:2], mask[:2, 1:]).item())
    logits.grad = None
    F.cross_entropy(
        logits[:2, :-1][mask[:2, 1:].bool()], ids[:2, 1:][mask[:2, 1:].bool()]
    ).backward()
    torch.testing.assert_close(grad1 - grad0, logits.grad)
    nll_grad = (grad1 - grad0).abs().sum(-1)  # [batch, position]
    allowed = torch.zeros_like(nll_grad, dtype=torch.bool)
    allowed[:2, :-1] = mask[:2, 1:].bool()  # logits at t-1 predict chosen token t
    assert torch.all(nll_grad[~allowed] == 0) and torch.all(nll_grad[allowed] > 0)
    # Negative control: a mask that lets prompt tokens in puts NLL gradient on the prompt.
    leaky = mask.clone()
    leaky[:, 1:3] = 1
    _, leaky0 = loss_and_grad(0.0, leaky)
    _, leaky1 = loss_and_grad(1.0, leaky)
    assert (leaky1 - leaky0).abs().sum(-1)[:2, :2].sum() > 0
