"""Every pretrain_lm preset resolves; the Mixtral (`moe`) one trains through the runner."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralForCausalLM

from conftest import SMALL
from jobs.pretrain_lm import JOB, build_model
from jobs.runner import run
from kiln.config import load_config


@pytest.mark.parametrize("preset", sorted(JOB.config_cls.presets))
def test_preset_resolves(preset):
    config = load_config(JOB.config_cls, preset)
    assert config.block_size <= config.model.max_position_embeddings
    assert (config.model.family == "mixtral") == (preset == "moe")
    assert config.runner.use_gpu == (preset == "small")


def test_moe_preset_trains_moves_parameters_and_exports_mixtral(ray_cluster, tmp_path):
    config = load_config(JOB.config_cls, "moe", None, [*SMALL, "runner.max_steps=3"])
    run(JOB, config, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert isinstance(model, MixtralForCausalLM)
    assert model.config.num_local_experts == config.model.num_experts
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(row["router_aux_loss"] > 0 for row in rows)
    torch.manual_seed(config.runner.seed)
    initial = build_model(config, tmp_path).state_dict()  # what every worker started from
    trained = model.state_dict()
    moved = [name for name, value in initial.items() if not torch.equal(value, trained[name])]
    assert len(moved) == len(initial), set(initial) - set(moved)
