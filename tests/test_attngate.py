"""kiln.attngate on tiny random Llama models: the gate's semantics, its cache, the baselines.

Each equivalence check has a negative control that a no-op or buggy implementation would pass
or fail in the wrong way (a cache that keeps evicted entries, a bidirectional gate, a threshold
without the straight-through estimator, a budget smaller than the sequence).
"""

import copy
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    DynamicCache,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from kiln import attngate
from kiln.attngate import gate as gate_module
from kiln.attngate.baselines import STREAMING_SINKS, BudgetCache, BudgetLayer, observe_attention
from kiln.attngate.gate import GateCacheLayer, straight_through_flags
from kiln.config import ConfigError, load_config

VOCAB, LENGTH = 64, 24


def random_llama(dtype=torch.float32, seed=0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(config).to(dtype).eval()


def gated_copy(base, init_bias=0.0, score_std=1.0, seed=1):
    """`base` with gates attached; score_std > 0 makes flags vary over tokens and heads."""
    model = LlamaForCausalLM(copy.deepcopy(base.config)).to(base.dtype).eval()
    model.load_state_dict(base.state_dict())
    torch.manual_seed(seed)
    attngate.attach(model, attngate.GateConfig(init_bias=init_bias))
    with torch.no_grad():
        for layer in attngate.gated_layers(model):
            layer.gate.score.weight.normal_(0, score_std)
            layer.gate.mix.weight.normal_(0, 0.5)  # context matters as much as the token itself
    return model


def decode_one_by_one(model, ids, cache):
    return torch.cat([model(ids[:, i : i + 1], cache=cache).logits for i in range(ids.shape[1])], 1)


def flags(model) -> torch.Tensor:
    """Hard flags of the last forward, (layers, n, kv_heads)."""
    return torch.stack([layer.keep[0] > 0.5 for layer in attngate.gated_layers(model)])


class KeepsEverythingLayer(GateCacheLayer):
    """Buggy cache: attends as told but stores every entry (it forgets to drop evicted ones)."""

    def attend_and_store(self, query, key, value, keep, scaling):
        return super().attend_and_store(query, key, value, torch.ones_like(keep), scaling)


def leaky_cache(config) -> attngate.GateCache:
    cache = attngate.GateCache(config)
    cache.layers = [KeepsEverythingLayer() for _ in cache.layers]
    return cache


@pytest.fixture(scope="module")
def pair():
    base = random_llama()
    return base, gated_copy(base)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (1, LENGTH), generator=torch.Generator().manual_seed(0))


def test_forced_open_gate_reproduces_the_ungated_model_and_closed_changes_it(ids):
    base = random_llama(torch.float64)
    reference = base(ids).logits
    opened = gated_copy(base, init_bias=60.0, score_std=0.0)
    torch.testing.assert_close(opened(ids).logits, reference, rtol=0, atol=1e-10)
    opened_cache = attngate.GateCache(opened.config)
    torch.testing.assert_close(
        decode_one_by_one(opened, ids, opened_cache), reference, rtol=0, atol=1e-10
    )
    assert opened_cache.eviction_ratio() == 0.0
    # Negative control: a closed gate must change every position but the first.
    closed = gated_copy(base, init_bias=-60.0, score_std=0.0)
    difference = (closed(ids).logits - reference).abs().amax(-1)[0]
    assert difference[0] < 1e-10 and (difference[1:] > 1e-3).all()


def test_parallel_masked_forward_equals_decoding_with_physical_eviction(pair, ids):
    _, model = pair
    parallel = model(ids).logits
    expected = flags(model)
    assert 0.2 < expected.float().mean() < 0.8, "flags should mix keep and evict"
    # Flags differ across heads and layers.
    assert (expected[:, :, 0] != expected[:, :, 1]).any() and (expected[0] != expected[1]).any()

    cache = attngate.GateCache(model.config)
    torch.testing.assert_close(decode_one_by_one(model, ids, cache), parallel, rtol=0, atol=1e-4)
    prefill = attngate.GateCache(model.config)  # a parallel prefill through the cache, then steps
    split = LENGTH // 2
    mixed = torch.cat(
        [
            model(ids[:, :split], cache=prefill).logits,
            decode_one_by_one(model, ids[:, split:], prefill),
        ],
        dim=1,
    )
    torch.testing.assert_close(mixed, parallel, rtol=0, atol=1e-4)

    # Cache accounting: each head stores exactly its kept tokens; the ratio is 1 − mean(F).
    for layer, kept in zip(cache.layers, expected):
        assert layer.stored_entries() == kept.sum(0).tolist()
    assert cache.eviction_ratio() == pytest.approx(1 - expected.float().mean().item())

    # Negative control: a cache that keeps evicted entries disagrees and fails the memory check.
    leaky = leaky_cache(model.config)
    assert (decode_one_by_one(model, ids, leaky) - parallel).abs().max() > 1e-3
    assert leaky.layers[0].stored_entries() != expected[0].sum(0).tolist()
    assert leaky.kv_bytes()["host"] > cache.kv_bytes()["host"]


def test_cache_memory_falls_with_the_eviction_ratio(ids):
    base = random_llama()
    held = []
    for bias in (4.0, 0.0, -4.0):  # mostly kept, mixed, mostly evicted
        model = gated_copy(base, init_bias=bias, score_std=0.2)
        cache = attngate.GateCache(model.config)
        decode_one_by_one(model, ids, cache)
        held.append((cache.eviction_ratio(), cache.kv_bytes()))
    ratios = [ratio for ratio, _ in held]
    host = [size["host"] for _, size in held]
    assert ratios == sorted(ratios) and ratios[0] < 0.2 and ratios[-1] > 0.8
    assert host == sorted(host, reverse=True)
    full = DynamicCache(config=base.config)
    decode_one_by_one(base, ids, full)
    full_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in full.layers)
    assert host[0] <= full_bytes
    # The gate's own cache is counted, and is the same whatever the ratio.
    assert len({size["gate"] for _, size in held}) == 1 and held[0][1]["gate"] > 0


def test_the_gate_is_causal_and_a_bidirectional_gate_fails(pair, ids, monkeypatch):
    _, model = pair
    t = LENGTH // 2
    perturbed = ids.clone()
    perturbed[:, t + 1 :] = (perturbed[:, t + 1 :] + 7) % VOCAB

    def earlier_effects(model):
        first = model(ids).logits[:, : t + 1]
        first_flags = flags(model)[:, : t + 1]
        second = model(perturbed).logits[:, : t + 1]
        return (first - second).abs().max(), (first_flags != flags(model)[:, : t + 1]).sum()

    logits_change, flags_changed = earlier_effects(model)
    assert logits_change == 0 and flags_changed == 0

    # Negative control: MHA′ that also sees later tokens leaks them into earlier flags/outputs.
    def bidirectional(query, key, value, attn_mask=None, **kwargs):
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, **kwargs)

    monkeypatch.setattr(
        gate_module, "F", SimpleNamespace(scaled_dot_product_attention=bidirectional)
    )
    logits_change, flags_changed = earlier_effects(model)
    assert logits_change > 0 and flags_changed > 0


def test_no_attention_row_is_empty_even_with_every_flag_zero(ids):
    closed = gated_copy(random_llama(), init_bias=-60.0, score_std=0.0)
    logits = closed(ids).logits
    assert torch.isfinite(logits).all() and not flags(closed).any()
    weights = attngate.key_weights(torch.zeros(1, LENGTH, 2), query_heads=4)
    assert ((weights > 0).sum(-1) == 1).all()  # each query keeps exactly itself
    cache = attngate.GateCache(closed.config)
    assert torch.isfinite(decode_one_by_one(closed, ids, cache)).all()
    assert cache.eviction_ratio() == 1.0


def test_straight_through_flags_are_hard_with_the_soft_gradient():
    logits = torch.linspace(-3, 3, 13, requires_grad=True)
    flags_ste = straight_through_flags(logits, threshold=0.5)
    assert torch.equal(flags_ste.detach(), (logits >= 0).float())
    (gradient,) = torch.autograd.grad(flags_ste.sum(), logits)
    soft = torch.sigmoid(logits.detach())
    torch.testing.assert_close(gradient, soft * (1 - soft))
    assert (gradient > 0).all()
    # Negative control: a plain threshold gives the gate no gradient at all.
    plain = (torch.sigmoid(logits) >= 0.5).float()
    assert not plain.requires_grad


def test_gates_get_gradients_and_the_regulariser_follows_the_target(ids):
    def retention_after_training(target: float) -> float:
        model = gated_copy(random_llama(), init_bias=0.5, score_std=0.1)
        model.train()
        config = attngate.GateConfig(target_eviction=target, eviction_weight=10.0)
        params = [p for layer in attngate.gated_layers(model) for p in layer.gate.parameters()]
        optimizer = torch.optim.Adam(params, lr=0.1)
        for _ in range(10):
            loss = model(ids, labels=ids).loss + attngate.eviction_loss(model, config)
            optimizer.zero_grad()
            loss.backward()
            assert all(p.grad is not None for p in params)
            optimizer.step()
        with torch.no_grad():
            model(ids)
            return attngate.retention(model).item()

    high, middle, low = (retention_after_training(target) for target in (0.8, 0.5, 0.1))
    assert high < middle - 0.1 and middle < low - 0.1


def test_generate_works_with_the_gate_cache_and_refuses_a_plain_cache(pair, ids):
    _, model = pair
    prompt = ids[:, :8]
    generated = model.generate(
        prompt, cache=attngate.GateCache(model.config), max_new_tokens=6, do_sample=False
    )
    # Same tokens as greedy decoding by hand through the parallel (masked) path.
    sequence = prompt
    for _ in range(6):
        sequence = torch.cat([sequence, model(sequence).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, sequence)
    with pytest.raises(TypeError, match="GateCache"):
        model(ids, cache=DynamicCache(config=model.config))


def test_baselines_equal_full_attention_within_budget_and_stream_keeps_sinks_and_window(ids):
    base = random_llama()
    base.set_attn_implementation("eager")  # H2O reads the attention weights
    handles = observe_attention(base)
    full = decode_one_by_one(base, ids, DynamicCache(config=base.config))
    for policy in ("streaming", "h2o"):
        roomy = BudgetCache(base.config, policy, budget=LENGTH)
        torch.testing.assert_close(decode_one_by_one(base, ids, roomy), full)
        assert roomy.eviction_ratio() == 0
        # Negative control: a small budget changes the outputs and evicts.
        tight = BudgetCache(base.config, policy, budget=8)
        assert (decode_one_by_one(base, ids, tight) - full).abs().max() > 1e-3
        assert tight.eviction_ratio() == pytest.approx(1 - 8 / LENGTH)

    # StreamingLLM: the stored keys are exactly positions [0, sinks) + the last budget − sinks.
    reference = DynamicCache(config=base.config)
    decode_one_by_one(base, ids, reference)
    streaming = BudgetCache(base.config, "streaming", budget=10)
    decode_one_by_one(base, ids, streaming)
    window = list(range(STREAMING_SINKS)) + list(range(LENGTH - 10 + STREAMING_SINKS, LENGTH))
    # (layer 0 only: deeper keys depend on the eviction above them)
    torch.testing.assert_close(streaming.layers[0].keys, reference.layers[0].keys[:, :, window])

    for handle in handles:
        handle.remove()


def test_h2o_keeps_the_recent_half_and_the_heaviest_older_entries_per_head():
    layer = BudgetLayer("h2o", budget=4)
    keys = torch.arange(8.0).view(1, 1, 8, 1).expand(1, 2, 8, 1)  # key value = its position
    layer.update(keys, keys)
    received = torch.zeros(1, 2, 1, 8)  # attention of one query per KV head (no GQA here)
    received[0, 0, 0, [1, 4]] = 0.5  # head 0: positions 1 and 4 are the heavy hitters
    received[0, 1, 0, [0, 5]] = 0.5  # head 1: positions 0 and 5
    layer.after_attention(received)
    assert layer.keys[0, 0, :, 0].tolist() == [1, 4, 6, 7]
    assert layer.keys[0, 1, :, 0].tolist() == [0, 5, 6, 7]
    assert layer.get_seq_length() == 8  # positions keep counting every token seen


def test_bad_input_fails_with_a_clear_message():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=32))
    with pytest.raises(ValueError, match=r"model_type='gpt2'.*Llama-architecture"):
        attngate.attach(gpt2, attngate.GateConfig())
    for ratio in (1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"target_eviction=.*: expected a fraction in \[0, 1"):
            attngate.GateConfig(target_eviction=ratio)
    from jobs.attngate import AttnGateConfig

    with pytest.raises(ConfigError, match=r"gate: target_eviction=1.0: expected a fraction in \["):
        load_config(AttnGateConfig, "tiny", None, ["gate.target_eviction=1.0"])
    model = attngate.attach(random_llama(), attngate.GateConfig())
    with pytest.raises(ValueError, match="already has Attention-Gates"):
        attngate.attach(model, attngate.GateConfig())


def test_the_package_imports_with_torch_and_transformers_alone():
    code = (
        "import sys\n"
        "for name in ('pydantic', 'ray', 'deepspeed', 'peft'):\n"
        "    sys.modules[name] = None  # importing any of them now raises ImportError\n"
        "import kiln.attngate"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_a_gated_model_saves_and_reloads(pair, ids, tmp_path):
    base, model = pair
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    reloaded = attngate.load_gated(tmp_path).eval()
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    # Host weights are untouched by attach: a plain load is the base model again.
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(plain(ids).logits, base(ids).logits)
    base.save_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match="not a gated model"):
        attngate.load_gated(tmp_path / "base")
