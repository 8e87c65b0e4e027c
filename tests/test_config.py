"""Config precedence and the bad-config errors users see before any worker starts."""

import subprocess
import sys
import time

import pytest
import yaml

from conftest import REPO
from jobs.pretrain_lm import PretrainLMConfig
from kiln.config import ConfigError, load_config


def test_precedence_defaults_preset_yaml_set(tmp_path):
    defaults = PretrainLMConfig()
    preset = load_config(PretrainLMConfig, "draft")
    assert defaults.model.hidden_size == 128 and preset.model.hidden_size == 64
    file = tmp_path / "over.yaml"
    file.write_text(yaml.safe_dump({"model": {"hidden_size": 96}, "runner": {"lr": 0.01}}))
    from_yaml = load_config(PretrainLMConfig, "draft", file)
    assert from_yaml.model.hidden_size == 96 and from_yaml.model.num_layers == 2  # merged
    final = load_config(PretrainLMConfig, "draft", file, ["model.hidden_size=32", "runner.lr=1e-4"])
    assert final.model.hidden_size == 32 and final.runner.lr == 1e-4
    assert final.runner.max_steps == preset.runner.max_steps  # untouched keys keep the preset


def test_saved_config_reproduces_the_run_config(tmp_path):
    config = load_config(PretrainLMConfig, "moe", None, ["runner.seed=7"])
    file = tmp_path / "config.yaml"
    file.write_text(config.to_yaml())
    # A run's config.yaml alone (whatever preset is applied first) gives the same config.
    assert load_config(PretrainLMConfig, "tiny", file) == config
    assert load_config(PretrainLMConfig, None, file).fingerprint() == config.fingerprint()


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["runner.bogus=1"], "runner.bogus: unknown key (expected one of: checkpoint_every, "),
        (["modle.hidden_size=8"], "modle: unknown key"),
        (["runner.zero_stage=abc"], "runner.zero_stage='abc': Input should be 0, 1, 2 or 3"),
        (["runner.max_steps=many"], "runner.max_steps='many': Input should be a valid integer"),
        (["runner.resume_from=/no/such/checkpoint"], "which does not exist"),
        (["runner.zero_stage=2", "runner.offload_params=true"], "needs zero_stage=3 (got"),
        (["runner.offload_optimizer=true", "runner.zero_stage=0"], "needs zero_stage >= 1"),
        (["runner.precision=fp16"], "precision='fp16' needs use_gpu=True"),
        (["block_size=1024"], "block_size=1024 exceeds model.max_position_embeddings=512"),
        (["model.num_heads=3"], "expected hidden_size divisible by num_heads"),
        (["runner.lr"], "expected key.sub=value"),
    ],
)  # fmt: skip
def test_bad_config_names_field_value_and_expectation(overrides, expected):
    with pytest.raises(ConfigError) as error:
        load_config(PretrainLMConfig, "tiny", None, overrides)
    assert expected in str(error.value)


def test_good_zero3_offload_combination_is_accepted():
    # Negative control for the ZeRO checks: the same option with its required stage is fine.
    config = load_config(
        PretrainLMConfig, "tiny", None, ["runner.zero_stage=3", "runner.offload_params=true"]
    )
    assert config.runner.offload_params


def test_unknown_preset_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown preset for PretrainLMConfig.*tiny"):
        load_config(PretrainLMConfig, "huge")
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a YAML mapping"):
        load_config(PretrainLMConfig, None, listed)
    with pytest.raises(ConfigError, match="file does not exist"):
        load_config(PretrainLMConfig, None, tmp_path / "missing.yaml")


def test_command_line_fails_fast_before_any_worker(tmp_path):
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "jobs.pretrain_lm", "--set", "runner.zero_stage=7",
         "--output", str(tmp_path / "run")],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 2
    assert "runner.zero_stage=7: Input should be 0, 1, 2 or 3" in done.stderr
    assert "Ray" not in done.stderr + done.stdout and not (tmp_path / "run").exists()
    assert time.monotonic() - started < 60


def test_help_describes_every_config_field():
    done = subprocess.run(
        [sys.executable, "-m", "jobs.pretrain_lm", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert done.returncode == 0
    assert "runner.zero_stage (default 2): DeepSpeed ZeRO stage" in done.stdout
    assert "world.max_digits (default 2): Digits of arithmetic operands." in done.stdout
    assert "): None" not in done.stdout  # no field lacks a description


def test_partial_override_keeps_a_sections_factory_defaults():
    from jobs.dpo import DPOConfig

    config = load_config(DPOConfig, "tiny", None, ["world.eval_size=7"])
    assert config.world.eval_size == 7
    assert config.world.mix == {"arithmetic": 1.0}  # DPOConfig's default, not the world's
