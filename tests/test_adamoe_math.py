"""kiln.adamoe on small random Mixtral models: reductions to Hugging Face's top-k block and
loss, the null experts' bounds and cost, ℓ_null (incl. the official code's no-op bug), the
tiled init, save/reload, LoRA on fused experts, and bad input. Every equivalence has a
negative control that a no-op or buggy implementation would fail."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MixtralConfig
from transformers.models.mixtral.modeling_mixtral import (
    MixtralForCausalLM,
    MixtralSparseMoeBlock,
    load_balancing_loss_func,
)

from kiln.adamoe import AdaMoEForCausalLM, convert, null_aware_balance_loss, route
from kiln.adamoe.analytics import TOKEN_TYPES, char_types
from kiln.adamoe.model import AdaMoESparseMoeBlock, NullSkippingExperts
from kiln.worlds.text import Example, worked_answer

N, K, HIDDEN = 4, 2, 16


def mixtral(seed: int = 0, top_k: int = K) -> MixtralForCausalLM:
    torch.manual_seed(seed)
    config = MixtralConfig(
        vocab_size=48, hidden_size=HIDDEN, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, num_local_experts=N,
        num_experts_per_tok=top_k, max_position_embeddings=64,
        initializer_range=0.2,  # outputs well above float noise, so controls are clear
    )  # fmt: skip
    return MixtralForCausalLM(config).eval()


def inputs(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 48, (3, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding: the balance loss must skip these rows
    return ids, mask


def adamoe_block(num_null: int, top_k: int, seed: int = 0) -> AdaMoESparseMoeBlock:
    """An AdaMoE block holding the first layer's router and experts of `mixtral(seed)`."""
    return convert(mixtral(seed), num_null, top_k).model.layers[0].mlp


def test_zero_nulls_equal_the_hugging_face_model_and_null_experts_change_it():
    base = mixtral()
    ids, mask = inputs()
    expected = base(ids, attention_mask=mask, labels=ids, output_router_logits=True)
    got = convert(base, 0, K)(ids, attention_mask=mask, labels=ids, output_router_logits=True)
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.aux_loss, expected.aux_loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.loss, expected.loss, atol=1e-5, rtol=0)
    # Negative control: with null experts in play (same k), some tokens skip experts.
    active = convert(base, 4, K)(ids, attention_mask=mask).logits
    assert (active - expected.logits).abs().max() > 1e-3


@pytest.mark.parametrize("top_k", [K, 3])
def test_null_logits_at_minus_inf_equal_vanilla_top_k(monkeypatch, top_k):
    block = adamoe_block(num_null=3, top_k=top_k)
    vanilla = MixtralSparseMoeBlock(mixtral(top_k=top_k).config).eval()
    vanilla.load_state_dict(
        {k: v for k, v in block.state_dict().items() if not k.endswith("null_weight")}
    )
    hidden = torch.randn(2, 7, HIDDEN)
    live = block(hidden)
    monkeypatch.setattr(block.gate, "nulls_enabled", False)
    torch.testing.assert_close(block(hidden), vanilla(hidden), atol=1e-6, rtol=0)
    assert (live - vanilla(hidden)).abs().max() > 1e-3  # negative control: nulls live


def all_slot_route(router_logits, num_experts, top_k):
    """The variant the paper rejected: weights normalised over all k' slots (a control)."""
    _, indices = route(router_logits, num_experts, top_k)
    probs = torch.softmax(router_logits.float(), dim=-1).gather(-1, indices)
    return probs * (indices < num_experts) / probs.sum(-1, keepdim=True), indices


def test_true_weights_sum_to_one_and_all_null_tokens_output_zero():
    block = adamoe_block(num_null=8, top_k=3)
    hidden = torch.randn(64, HIDDEN)
    with torch.no_grad():  # a strong null router for half the tokens: some pick only nulls
        block.gate.null_weight.mul_(4)
    _, weights, indices = block.gate(hidden)
    true_count = (indices < N).sum(-1)
    assert (true_count == 0).any() and (true_count > 0).any()
    torch.testing.assert_close(
        weights[true_count > 0].sum(-1), torch.ones(int((true_count > 0).sum()))
    )
    assert (weights[indices >= N] == 0).all()
    # The weights are the paper's p_i / Σ_{S_T} p_j, p the softmax over all n + m logits.
    logits = torch.cat([hidden @ block.gate.weight.T, hidden @ block.gate.null_weight.T], -1)
    selected = torch.softmax(logits, -1).gather(-1, indices) * (indices < N)
    paper = selected / selected.sum(-1, keepdim=True).clamp_min(1e-30)
    torch.testing.assert_close(weights, paper)
    all_slots, _ = all_slot_route(logits, N, 3)  # control: normalised over all k' slots
    assert (weights - all_slots).abs().max() > 1e-2
    output = block(hidden[None])[0]
    assert torch.isfinite(output).all()
    assert (output[true_count == 0] == 0).all() and (output[true_count > 0] != 0).any()


def test_no_expert_ffn_runs_for_a_null_slot(monkeypatch):
    block = adamoe_block(num_null=8, top_k=4)
    calls: list[tuple[int, torch.Tensor]] = []
    original = NullSkippingExperts.expert_ffn

    def spy(self, expert_index, x):
        calls.append((expert_index, x))
        return original(self, expert_index, x)

    monkeypatch.setattr(NullSkippingExperts, "expert_ffn", spy)
    hidden = torch.randn(1, 50, HIDDEN)
    block(hidden)
    _, _, indices = block.gate(hidden)
    assert all(0 <= expert < N for expert, _ in calls)
    for expert, rows in calls:  # each true expert sees exactly the tokens that selected it
        selected = (indices == expert).any(-1)
        torch.testing.assert_close(rows, hidden[0][selected])
    evaluated = sum(len(rows) for _, rows in calls)
    assert evaluated == int((indices < N).sum())
    assert evaluated < indices.numel()  # control: nulls were selected, and cost nothing


def test_identical_experts_give_that_expert_whatever_nulls_were_picked():
    block = adamoe_block(num_null=8, top_k=4)
    with torch.no_grad():
        block.experts.gate_up_proj.copy_(block.experts.gate_up_proj[:1].expand(N, -1, -1))
        block.experts.down_proj.copy_(block.experts.down_proj[:1].expand(N, -1, -1))
    hidden = torch.randn(80, HIDDEN)
    indices = block.gate(hidden)[2]
    some_true = (indices < N).any(-1)
    expected = block.experts.expert_ffn(0, hidden)
    torch.testing.assert_close(block(hidden[None])[0][some_true], expected[some_true])
    # Negative control: renormalising over all k' slots (nulls included) shrinks the output.
    probs, _ = torch.topk(torch.softmax(torch.cat([hidden @ block.gate.weight.T,
                          hidden @ block.gate.null_weight.T], -1), -1), 4)  # fmt: skip
    all_slots = (probs * (indices < N)).sum(-1) / probs.sum(-1)
    mixed = some_true & (indices >= N).any(-1)
    assert mixed.any() and (all_slots[mixed] < 0.999).all()


def test_token_choice_causality_other_tokens_do_not_change_a_tokens_output():
    block = adamoe_block(num_null=8, top_k=4)
    hidden = torch.randn(1, 20, HIDDEN)
    changed = hidden.clone()
    changed[0, 1:] = torch.randn(19, HIDDEN)
    torch.testing.assert_close(block(hidden)[0, 0], block(changed)[0, 0])


def test_null_router_starts_tied_to_its_true_twin():
    model = convert(mixtral(), 6, 4)
    hidden = torch.randn(10, HIDDEN)
    for layer in model.model.layers:
        logits = layer.mlp.gate(hidden)[0]
        for j in range(6):
            torch.testing.assert_close(logits[:, N + j], logits[:, j % N])


@pytest.mark.parametrize(("num_null", "top_k"), [(4, 3), (8, 4), (8, 5)])
def test_a_fresh_conversion_equals_the_original_until_the_twins_separate(num_null, top_k):
    base = mixtral()
    ids, mask = inputs()
    expected = base(ids, attention_mask=mask).logits
    model = convert(base, num_null, top_k)
    torch.testing.assert_close(model(ids, attention_mask=mask).logits, expected, atol=1e-5, rtol=0)
    # Negative control: a small null-router change, as a first update makes, breaks the ties
    # and moves some tokens onto nulls.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.null_weight.mul_(1.05)
    assert (model(ids, attention_mask=mask).logits - expected).abs().max() > 1e-3


def test_null_aware_loss_matches_switch_at_zero_nulls_and_k_prime_when_uniform():
    logits = tuple(torch.randn(30, N) for _ in range(3))
    mask = torch.ones(3, 10)
    mask[1, :3] = 0
    for attention_mask in (None, mask):
        expected = load_balancing_loss_func(logits, N, K, attention_mask)
        got = null_aware_balance_loss(logits, N, 0, K, attention_mask)
        torch.testing.assert_close(got, expected)
    # Uniform routing: each of n+m experts gets k'/(n+m) of the slots -> loss = k'.
    uniform = (torch.zeros(12, 12),)
    assert null_aware_balance_loss(uniform, 4, 8, 4).item() == pytest.approx(4.0)


def test_moving_load_between_null_experts_leaves_the_null_loss_unchanged():
    """Regression test for the official Mixtral loss, whose null averaging was a no-op (it
    sliced the top-k axis), leaving plain Switch balancing of every null expert."""
    n, m, top_k = 4, 4, 2
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0, 3.0, 1.0, -1.0, -1.0]]).repeat(8, 1)
    moved = logits.clone()
    moved[:4, [4, 5]] = moved[:4, [5, 4]]  # half the tokens send their null slot to null 5
    before = null_aware_balance_loss((logits,), n, m, top_k)
    after = null_aware_balance_loss((moved,), n, m, top_k)
    torch.testing.assert_close(before, after)
    # Control: the official code's effective loss (Switch over all n+m) does change.
    switch_before = load_balancing_loss_func((logits,), n + m, top_k)
    switch_after = load_balancing_loss_func((moved,), n + m, top_k)
    assert abs(switch_before - switch_after) > 0.1


def test_converted_model_saves_and_reloads(tmp_path):
    model = convert(mixtral(), 4, 3)
    with torch.no_grad():  # moved off the tiled init: a reload that re-tied would differ
        for layer in model.model.layers:
            layer.mlp.gate.null_weight.add_(torch.randn_like(layer.mlp.gate.null_weight))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, AdaMoEForCausalLM)
    assert reloaded.config.num_null_experts == 4 and reloaded.config.base_top_k == K
    ids, _ = inputs()
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)


def test_lora_on_fused_experts_trains_routers_and_merges():
    from peft import LoraConfig, get_peft_model

    model = convert(mixtral(), 4, 3)
    ids, _ = inputs()
    before = model(ids).logits
    lora = LoraConfig(r=2, target_modules=["q_proj"], lora_dropout=0.0, init_lora_weights=False,
                      target_parameters=["experts.gate_up_proj", "experts.down_proj"])  # fmt: skip
    peft_model = get_peft_model(model, lora)
    adapted = peft_model(ids).logits
    assert (adapted - before).abs().max() > 1e-4  # the expert/attention adapters act
    merged = peft_model.merge_and_unload()
    torch.testing.assert_close(merged(ids).logits, adapted, atol=1e-5, rtol=0)


def test_bad_input_fails_with_a_clear_message():
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=16,
                             num_hidden_layers=1, num_attention_heads=2))  # fmt: skip
    with pytest.raises(ValueError, match=r"Mixtral-architecture.*0 sparse MoE blocks"):
        convert(llama, 4, 3)
    with pytest.raises(ValueError, match=r"top_k=9: expected 1 <= top_k <= true \+ null"):
        convert(mixtral(), 4, 9)
    with pytest.raises(ValueError, match="num_null_experts=-1"):
        convert(mixtral(), -1, 2)


def _router_gradients(model, loss_of):
    ids, mask = inputs()
    output = model(ids, attention_mask=mask, output_router_logits=True)
    gate = model.model.layers[0].mlp.gate
    return torch.autograd.grad(loss_of(ids, output), [gate.weight, gate.null_weight])


def _lm_loss(ids, output):
    return torch.nn.functional.cross_entropy(
        output.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()
    )


def test_only_the_balance_loss_moves_the_null_router(monkeypatch):
    """True-only renormalisation cancels the softmax denominator, so the LM loss gives W_null no
    gradient (why α does not set its speed under AdamW: kiln/adamoe/model.py)."""
    model = convert(mixtral(), 4, 3).train()
    with torch.no_grad():  # off the tied init, so tokens mix true and null slots
        for layer in model.model.layers:
            layer.mlp.gate.null_weight.add_(0.3 * torch.randn_like(layer.mlp.gate.null_weight))
    true_lm, null_lm = _router_gradients(model, _lm_loss)
    assert true_lm.norm() > 1e-3 and null_lm.norm() <= 1e-6 * true_lm.norm()
    _, null_balance = _router_gradients(model, lambda ids, output: output.aux_loss)
    assert null_balance.norm() > 1e-3

    monkeypatch.setattr("kiln.adamoe.model.route", all_slot_route)
    _, null_lm_control = _router_gradients(model, _lm_loss)
    assert null_lm_control.norm() > 1e-3


def test_route_guards_the_all_null_denominator_and_far_below_null_true_logits():
    all_null = torch.tensor([[0.0, 0.0, 9.0, 9.0]], requires_grad=True)
    weights, indices = route(all_null, num_experts=2, top_k=2)
    assert (indices >= 2).all() and (weights == 0).all()
    # A true expert 300 below the nulls: the full softmax underflows to p = 0 in float32 (and a
    # p-based renormalisation would give weight 0); its weight is still 1.
    far = torch.tensor([[-200.0, -300.0, 100.0, 100.0]], requires_grad=True)
    far_weights, far_indices = route(far, num_experts=2, top_k=3)
    assert far_weights[far_indices < 2].tolist() == [1.0]
    assert torch.softmax(far, -1)[0, 0] == 0  # the underflow this guards against
    for logits, routed in ((all_null, weights), (far, far_weights)):
        (routed * torch.randn_like(routed)).sum().backward()
        assert torch.isfinite(logits.grad).all()


def test_arithmetic_tokens_are_split_into_copied_and_computed():
    completion = worked_answer(47, "+", 38)  # " 7+8=15 c1, 4+3+1=8 #### 85"
    example = Example("arithmetic", "47+38=", completion)
    types = char_types(example)
    computed = "".join(c for c, t in zip(example.text, types) if t == TOKEN_TYPES.index("computed"))
    assert computed == "15" + "c1" + "8" + "85"


def test_kiln_adamoe_imports_with_torch_and_transformers_alone():
    import subprocess
    import sys

    code = (
        "import sys, kiln.adamoe, kiln.adamoe.analytics\n"
        "bad = [m for m in ('ray', 'deepspeed', 'peft', 'matplotlib') if m in sys.modules]\n"
        "assert not bad, bad"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
