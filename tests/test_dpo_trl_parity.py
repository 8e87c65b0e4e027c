"""Loss parity with TRL's DPOTrainer (a test-only dependency): same model, batch and reference.

TRL's batch (its tokenisation and collator) feeds both implementations; ours reads it through
`pair_logps`, TRL through its own `compute_loss`, and the loss and mean rewards must agree to
1e-5. We also check our tokenisation gives TRL's token ids and completion masks.
"""

import copy

import pytest
import torch
from datasets import Dataset
from trl import DPOConfig as TRLConfig
from trl import DPOTrainer

from kiln import lm
from kiln.dpo import dpo_loss, nll_regularised_dpo_loss, pair_logps
from kiln.dpo.data import offline_pairs, tokenize_pairs
from kiln.worlds.text import TextWorld, TextWorldConfig
from kiln.worlds.tokenizer import train_tokenizer

BATCH = 6


@pytest.fixture(scope="module")
def setup():
    world = TextWorld(TextWorldConfig(mix={"arithmetic": 1.0}, train_size=300))
    examples = world.split("train")
    tokenizer = train_tokenizer((e.text for e in examples), vocab_size=300)
    arch = lm.ModelConfig(
        hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=64
    )
    torch.manual_seed(0)
    # Briefly trained models, so log-probs are realistic: with random weights every sequence
    # log-prob is about -120 and float32 rounding alone (either implementation's) reaches 1e-5.
    reference = _fit(lm.build_model(arch, tokenizer), tokenizer, examples, steps=150)
    policy = _fit(copy.deepcopy(reference), tokenizer, examples[150:], steps=20)
    pairs = offline_pairs(world, examples[:BATCH], seed=0)
    return tokenizer, policy, reference, pairs


def _fit(model, tokenizer, examples, steps):
    blocks = lm.pack_examples(examples, tokenizer, block_size=64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        batch = blocks[(step * 8) % len(blocks) :][:8]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def _trl_loss(tmp_path, setup, loss_type, loss_weights):
    tokenizer, policy, reference, pairs = setup
    dataset = Dataset.from_list(
        [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs]
    )
    args = TRLConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=BATCH,
        beta=0.1,
        loss_type=loss_type,
        loss_weights=loss_weights,
        report_to="none",
        use_cpu=True,
        bf16=False,  # TRL defaults to bf16 autocast (on CPU too); compare in float32
    )
    # Copies: TRL patches the models it is given (its fused LM head), ours must stay plain.
    trainer = DPOTrainer(
        model=copy.deepcopy(policy),
        ref_model=copy.deepcopy(reference),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(BATCH)])
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch).item()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return batch, loss, metrics


def _our_batch(batch):
    """TRL's [chosen; rejected] rows in kiln's per-side layout."""
    ours = {}
    for key, source in {"ids": "input_ids", "attention": "attention_mask"}.items():
        ours[f"chosen_{key}"], ours[f"rejected_{key}"] = batch[source].chunk(2)
    ours["chosen_response"], ours["rejected_response"] = batch["completion_mask"].chunk(2)
    return ours


@pytest.mark.parametrize("nll_weight", [0.0, 0.7])
def test_loss_and_rewards_match_trl(tmp_path, setup, nll_weight):
    loss_type, weights = (["sigmoid"], None) if not nll_weight else (["sigmoid", "sft"], [1, 0.7])
    batch, trl_loss, trl = _trl_loss(tmp_path, setup, loss_type, weights)
    _, policy, reference, _ = setup
    ours = _our_batch(batch)
    with torch.no_grad():
        logps, ref = pair_logps(policy, ours), pair_logps(reference, ours)
        out = dpo_loss(logps.chosen, logps.rejected, ref.chosen, ref.rejected, beta=0.1)
        loss = nll_regularised_dpo_loss(
            out, logps.chosen_token_logps, logps.chosen_token_mask, nll_weight
        ).item()
        flex = dpo_loss(logps.chosen, logps.rejected, ref.chosen, ref.rejected, 0.1, 0.03)

    assert loss == pytest.approx(trl_loss, abs=1e-5)
    assert out.chosen_rewards.mean().item() == pytest.approx(trl["rewards/chosen"], abs=1e-5)
    assert out.rejected_rewards.mean().item() == pytest.approx(trl["rewards/rejected"], abs=1e-5)
    assert logps.chosen.mean().item() == pytest.approx(trl["logps/chosen"], abs=1e-4)
    # Negative control: Flex-DPO with β⁻ ≠ β is a different loss, so parity must break.
    assert abs(flex.losses.mean().item() - out.losses.mean().item()) > 1e-3


def test_our_tokenisation_matches_trls(tmp_path, setup):
    tokenizer, _, _, pairs = setup
    batch, _, _ = _trl_loss(tmp_path, setup, ["sigmoid"], None)
    ours, truncated = tokenize_pairs(pairs, tokenizer, max_length=512)
    trl = _our_batch(batch)
    assert truncated == 0
    for key, value in trl.items():
        width = value.shape[1]
        assert torch.equal(ours[key][:, :width], value), key
        assert not ours[key][:, width:].any(), key  # beyond TRL's width: padding only
