"""jobs.dpo through the runner (2 Ray Train workers): every parameter moves, diagnostics are
logged from step 1, the reference log-probs match the policy before its first update, and the
artifacts (model, 3d_properties.png, pairs) are written. On-policy pairs are labelled right."""

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from jobs.dpo import JOB
from jobs.runner import run
from kiln.config import load_config
from kiln.dpo.data import on_policy_pairs
from kiln.tracking import read_metrics
from kiln.worlds.text import TextWorld, TextWorldConfig, extract_answer

PROBES = ("probe/train_chosen_logp", "probe/train_rejected_logp", "probe/heldout_correct_logp",
          "probe/heldout_wrong_logp", "probe/train_other_mass")  # fmt: skip


def test_smoke_every_parameter_moves_and_diagnostics_are_logged(tiny_lm, tmp_path):
    config = load_config(JOB.config_cls, "tiny", None, [
        f"base_model={tiny_lm / 'model'}", "num_pairs=48", "probe_size=8", "nll_weight=0.5",
        "runner.max_steps=3", "runner.micro_batch_size=4", "runner.checkpoint_every=0",
        "runner.warmup_steps=0", "runner.lr=1e-3", "world.eval_size=16",
    ])  # fmt: skip
    assert config.runner.num_workers == 2
    run_dir = tmp_path / "run"
    summary = run(JOB, config, run_dir)

    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert row["loss"] > 0 and all(key in row for key in PROBES)
    # Step 1's forward runs before any update: policy == reference, so every reward is 0.
    assert abs(rows[0]["reward_chosen"]) < 1e-4 and abs(rows[0]["reward_rejected"]) < 1e-4
    assert abs(rows[-1]["reward_chosen"]) > 1e-3  # and they move once training does

    base = AutoModelForCausalLM.from_pretrained(tiny_lm / "model")
    tuned = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    tuned_params = dict(tuned.named_parameters())
    unmoved = [n for n, p in base.named_parameters() if torch.equal(p, tuned_params[n])]
    assert not unmoved, f"parameters that did not move: {unmoved}"

    assert (run_dir / "3d_properties.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = (run_dir / "assets/pairs.jsonl").read_text().splitlines()
    pairs = [json.loads(line) for line in lines]
    assert len(pairs) == summary["num_pairs"] == 48
    assert {"accuracy_before", "accuracy_after", "chosen_logp_drop"} <= set(summary)
    assert AutoTokenizer.from_pretrained(run_dir / "model").eos_token == "</s>"


def test_on_policy_pairs_are_sampled_and_labelled_by_the_answer(tiny_lm):
    model = AutoModelForCausalLM.from_pretrained(tiny_lm / "model")
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm / "model")
    examples = TextWorld(TextWorldConfig(mix={"arithmetic": 1.0}, train_size=64)).split("train")
    pairs, skipped = on_policy_pairs(
        model, tokenizer, examples, wanted=8, samples_per_prompt=4, temperature=1.5, seed=0
    )
    assert pairs, skipped
    answers = {e.prompt: e.answer for e in examples}
    for pair in pairs:
        assert pair.source == "on_policy"
        assert extract_answer(pair.chosen) == answers[pair.prompt]
        assert extract_answer(pair.rejected) != answers[pair.prompt]
