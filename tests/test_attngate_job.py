"""jobs.attngate: one short CPT run through the runner (2 Ray Train workers) on a tiny random
Llama, and the SFT data, LoRA and export paths without Ray."""

import json

import pytest
import torch
from engine_models import build_tiny_llama
from safetensors.torch import load_file

from jobs.attngate import JOB, build_model, export, prepare
from jobs.runner import assets_dir, run
from kiln import attngate
from kiln.config import load_config
from kiln.tracking import read_metrics

METHODS = ("full", "gate", "streaming", "h2o")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), max_positions=128)


def config_for(base, *overrides):
    return load_config(JOB.config_cls, "tiny", None, [
        f"base_model={base}", "world.train_size=200", "block_size=64", "eval_examples=2",
        "runner.max_steps=3", "runner.micro_batch_size=4", "runner.checkpoint_every=0",
        "runner.log_every=1", "runner.warmup_steps=0", *overrides,
    ])  # fmt: skip


def test_cpt_run_trains_only_the_gates_and_reports_every_method(ray_cluster, tiny_llama, tmp_path):
    run_dir = tmp_path / "run"
    summary = run(JOB, config_for(tiny_llama), run_dir)

    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all({"task_loss", "eviction_loss", "eviction"} <= set(r) for r in rows)
    for method in METHODS:
        for task in ("recall", "arithmetic"):
            assert 0 <= summary[f"{method}/accuracy/{task}"] <= 1
            assert 0 <= summary[f"{method}/eviction/{task}"] < 1
    assert summary["full/eviction"] == 0
    assert (run_dir / "accuracy_vs_eviction.png").read_bytes()[:4] == b"\x89PNG"

    # Host weights are frozen (bit-identical); the gates moved from their initial bias.
    base, trained = (
        load_file(tiny_llama / "model.safetensors"),
        load_file(run_dir / "model/model.safetensors"),
    )
    assert all(torch.equal(base[name], trained[name]) for name in base)
    biases = [t for name, t in trained.items() if name.endswith("gate.score.bias")]
    assert biases and all((b != 2.0).all() for b in biases)
    gated = attngate.load_gated(run_dir / "model")
    assert len(attngate.gated_layers(gated)) == gated.config.num_hidden_layers


def test_sft_data_lora_and_merged_export(tiny_llama, tmp_path):
    config = config_for(tiny_llama, "mode=sft", "lora_rank=2")
    prepare(config, tmp_path)
    tensors = torch.load(assets_dir(tmp_path) / "train.pt")
    supervised = tensors["labels"] != -100
    assert (supervised <= tensors["token_mask"]).all()  # loss only on real tokens...
    assert supervised.any(1).all() and (supervised.sum(1) < tensors["token_mask"].sum(1)).all()
    assert json.loads((assets_dir(tmp_path) / "data.json").read_text())["base_model"]

    model = build_model(config, tmp_path)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable) and any(".gate." in n for n in trainable)
    assert not any("embed_tokens" in n or "mlp" in n for n in trainable)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_()  # a trained adapter, so merging changes the weights
    ids = torch.randint(0, 200, (1, 12))
    expected = model(input_ids=ids).logits
    export(model, config, tmp_path, tmp_path / "model")
    merged = attngate.load_gated(tmp_path / "model").eval()
    torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-4, atol=1e-4)
