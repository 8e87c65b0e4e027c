"""jobs.adamoe through the runner (2 Ray Train workers) on a tiny random Mixtral: routing
analytics logged every step, the balance-weight schedule, LoRA + routers move, the merged model
reloads as AdaMoE; bad input is refused before any worker starts; the sweep and Pareto plot."""

import csv
import itertools

import pytest
import torch
from transformers import AutoModelForCausalLM

from jobs.adamoe import IGNORE, JOB, _encode, pareto
from jobs.runner import run
from kiln import lm
from kiln.adamoe import AdaMoEForCausalLM
from kiln.adamoe.analytics import TOKEN_TYPES
from kiln.config import ConfigError, load_config
from kiln.tracking import read_metrics
from kiln.worlds.text import Example, TextWorld, TextWorldConfig, worked_answer
from kiln.worlds.tokenizer import train_tokenizer

PNG = b"\x89PNG\r\n\x1a\n"
TINY = ["train_examples=64", "world.eval_size=8", "runner.max_steps=4", "runner.log_every=1",
        "runner.micro_batch_size=4", "runner.warmup_steps=0", "runner.lr=1e-2"]  # fmt: skip


def save_tiny(path, family: str):
    texts = (e.text for e in TextWorld(TextWorldConfig(train_size=200)).split("train"))
    tokenizer = train_tokenizer(texts, 128)
    arch = lm.ModelConfig(family=family, hidden_size=32, num_layers=2, num_heads=2,
                          num_kv_heads=2, intermediate_size=32, num_experts=4)  # fmt: skip
    torch.manual_seed(0)
    lm.build_model(arch, tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_mixtral(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny-mixtral"), "mixtral")


def test_job_logs_routing_and_exports_a_reloadable_adamoe_model(
    ray_cluster, tiny_mixtral, tmp_path
):
    config = load_config(JOB.config_cls, "tiny", None, [f"base_model={tiny_mixtral}", *TINY])
    assert (config.num_null_experts, config.top_k, config.runner.num_workers) == (4, 3, 2)
    run_dir = tmp_path / "run"
    summary = run(JOB, config, run_dir)

    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # α: 1e-4 for the first quarter of max_steps (balance first), then 0 (null router stops).
    assert [r["balance_weight"] for r in rows] == [1e-4, 0.0, 0.0, 0.0]
    for row in rows:
        assert 0 <= row["true_experts_per_token"] <= 3 and row["balance_loss"] > 0
        assert row["routing/tokens/computed"] > 0 and "routing/true_slots/computed" in row
    for key in ("test/accuracy", "test/accuracy/arithmetic", "test/moe_flops_ratio",
                "test/true_experts_per_token", "test/true_experts/computed",
                "test/true_experts/copied", "base_test_accuracy"):  # fmt: skip
        assert key in summary, key
    assert (run_dir / "routing.png").read_bytes()[:8] == PNG

    tuned = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    assert isinstance(tuned, AdaMoEForCausalLM)
    assert (tuned.config.num_null_experts, tuned.config.base_top_k) == (4, 2)
    base = dict(AutoModelForCausalLM.from_pretrained(tiny_mixtral).named_parameters())
    layer = "model.layers.0."
    for name in ("self_attn.q_proj.weight", "mlp.experts.gate_up_proj", "mlp.gate.weight"):
        assert not torch.equal(tuned.get_parameter(layer + name), base[layer + name]), name
    null = tuned.get_parameter(layer + "mlp.gate.null_weight")
    tied = base[layer + "mlp.gate.weight"]
    assert not torch.equal(null, tied)  # the null router trained off its tiled init
    assert torch.equal(  # embeddings are not adapted
        tuned.get_parameter("model.embed_tokens.weight"), base["model.embed_tokens.weight"]
    )


def test_bad_input_is_refused_before_training(tmp_path, tiny_mixtral):
    too_many = load_config(JOB.config_cls, "tiny", None, [f"base_model={tiny_mixtral}", "top_k=13"])
    with pytest.raises(ConfigError, match=r"top_k=13: expected 1 <= top_k <= true \+ null"):
        run(JOB, too_many, tmp_path / "k")
    llama = save_tiny(tmp_path / "llama", "llama")
    dense = load_config(JOB.config_cls, "tiny", None, [f"base_model={llama}"])
    with pytest.raises(ConfigError, match="expected a Mixtral-architecture causal LM"):
        run(JOB, dense, tmp_path / "dense")
    with pytest.raises(ConfigError, match="num_null_experts=-1"):
        load_config(JOB.config_cls, "tiny", None, ["num_null_experts=-1"])


def test_ready_sweep_is_valid_and_pareto_plot_is_written(tmp_path):
    grid = JOB.sweep.grid
    for values in itertools.product(*grid.values()):
        swept = [f"{key}={value}" for key, value in zip(grid, values)]
        load_config(JOB.config_cls, "tiny", None, swept)
    with (tmp_path / "results.csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["config/num_null_experts", "config/top_k", "test/accuracy",
                         "test/moe_flops_ratio"])  # fmt: skip
        writer.writerows([[0, 2, 0.8, 1.0], [8, 4, 0.82, 0.85], [4, 2, 0.6, 0.7]])
    assert pareto(tmp_path).read_bytes()[:8] == PNG


def test_encoding_labels_completions_and_types_tokens(tiny_mixtral):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_mixtral)
    example = Example("arithmetic", "47+38=", worked_answer(47, "+", 38))
    encoded = _encode([example], tokenizer, 64)
    ids, labels, types = (encoded[k][0] for k in ("input_ids", "labels", "token_types"))
    assert tokenizer.decode(labels[labels != IGNORE]) == example.completion + "</s>"
    computed = ids[types == TOKEN_TYPES.index("computed")]
    assert tokenizer.decode(computed).replace(" ", "") == "15c18" + "85</s>"
    assert (types[labels == IGNORE] == TOKEN_TYPES.index("prompt")).all()
