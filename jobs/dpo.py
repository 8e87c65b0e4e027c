"""DPO with the 3D-properties diagnostics and fixes (arXiv 2406.07327), through the runner.

    python -m jobs.dpo --preset tiny [--set pairs=offline|on_policy|mixed]
        [--set beta_rejected=0.05] [--set nll_weight=1.0] [--set loss_type=ipo]
        [--set base_model=/path/to/hf/checkpoint] [--set preference_file=pairs.jsonl]

Starts from an SFT model (default: the `pretrain_lm` tiny model, trained once and cached) and
trains it on preference pairs (`kiln.dpo.data`) with the loss of `kiln.dpo.losses`: sigmoid DPO,
Flex-DPO (`beta_rejected`), DPO + λ·NLL (`nll_weight`), or IPO. Reference log-probs are computed
once, on the driver, before training; chosen and rejected share one forward per step.

Diagnostics (every logged step, on a fixed probe set, averaged over ranks): log-probs of a fixed
set of training pairs (the drastic drop), of held-out correct and wrong responses never trained
on (dispersion), and the mass left on neither response. The run directory gains
`3d_properties.png`, `assets/pairs.jsonl` (the pairs as text, with their source), and
summary.json reports held-out greedy accuracy before and after.
"""

from __future__ import annotations

import functools
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator
from transformers import AutoModelForCausalLM, AutoTokenizer

from jobs import pretrain_lm
from jobs.runner import Job, SweepSpec, TensorDataset, assets_dir, main
from kiln import lm
from kiln.config import ConfigError, JobConfig
from kiln.dpo import dpo_loss, ipo_loss, nll_regularised_dpo_loss, pair_logps
from kiln.dpo.data import (
    offline_pairs,
    on_policy_pairs,
    read_preference_file,
    tokenize_pairs,
)
from kiln.dpo.plots import plot_3d_properties
from kiln.tracking import read_metrics
from kiln.worlds.text import Example, TextWorld, TextWorldConfig


class DPOConfig(JobConfig):
    """DPO / Flex-DPO / DPO+NLL / IPO on preference pairs, with the 3D-properties diagnostics."""

    base_model: str = Field(
        "pretrain_lm:tiny",
        description="SFT model: a save_pretrained folder, or 'pretrain_lm:<preset>' to train "
        "(once, cached in $KILN_CACHE) and use that preset.",
    )
    world: TextWorldConfig = Field(
        default_factory=lambda: TextWorldConfig(mix={"arithmetic": 1.0}, eval_size=500),
        description="Text world the pairs, probes and evaluation come from (arithmetic).",
    )
    pairs: Literal["offline", "on_policy", "mixed"] = Field(
        "offline",
        description="Pair source: offline (correct vs plausible wrong answer), on_policy (both "
        "sampled from the SFT model, labelled by checking the answer), or mixed (half each).",
    )
    preference_file: str | None = Field(
        None, description="JSON lines of {prompt, chosen, rejected}; replaces the world's pairs."
    )
    num_pairs: int = Field(2000, ge=1, description="Preference pairs drawn from the world.")
    samples_per_prompt: int = Field(
        8, ge=2, description="on_policy: samples per prompt to find a correct and a wrong one."
    )
    sample_temperature: float = Field(1.0, gt=0, description="on_policy: sampling temperature.")
    loss_type: Literal["sigmoid", "ipo"] = Field("sigmoid", description="Preference loss.")
    beta: float = Field(0.1, gt=0, description="β (β⁺ of Flex-DPO; IPO's β).")
    beta_rejected: float | None = Field(
        None, gt=0, description="Flex-DPO β⁻ on the rejected side (unset: β⁻ = β, plain DPO)."
    )
    nll_weight: float = Field(
        0.0, ge=0, description="λ of the NLL term: mean NLL over chosen tokens (0 = off)."
    )
    max_length: int | None = Field(
        None, ge=2, description="Longest prompt+response in tokens (unset: the model's context)."
    )
    probe_size: int = Field(
        64, ge=0, description="Pairs in each diagnostic probe set (training, held-out); 0 = off."
    )

    @model_validator(mode="after")
    def _flex_is_sigmoid(self) -> DPOConfig:
        if self.beta_rejected is not None and self.loss_type != "sigmoid":
            raise ValueError(
                f"beta_rejected={self.beta_rejected} with loss_type={self.loss_type!r}: "
                "Flex-DPO's β⁻ applies to the sigmoid loss only"
            )
        return self

    presets = {
        "tiny": {
            "runner": {
                "max_steps": 150,
                "lr": 5e-5,
                "warmup_steps": 10,
                "micro_batch_size": 16,
                "log_every": 1,
                "checkpoint_every": 50,
            },
        },
    }


def _data_info(run_dir: Path) -> dict:
    return json.loads((assets_dir(run_dir) / "data.json").read_text())


def _load(path: Path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


@torch.no_grad()
def _batched_logps(model, tensors: dict[str, torch.Tensor], batch_size: int = 128):
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    for start in range(0, len(tensors["chosen_ids"]), batch_size):
        logps = pair_logps(model, {k: v[start : start + batch_size] for k, v in tensors.items()})
        chosen.append(logps.chosen)
        rejected.append(logps.rejected)
    model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


def _probe_metrics(model, probe: dict[str, dict[str, torch.Tensor]]) -> dict[str, float]:
    """Mean sequence log-probs of the probe sets, and the mass left on neither response."""
    metrics = {}
    names = {"train": ("chosen", "rejected"), "heldout": ("correct", "wrong")}
    for split, (first, second) in names.items():
        chosen, rejected = _batched_logps(model, probe[split])
        metrics[f"probe/{split}_{first}_logp"] = chosen.mean().item()
        metrics[f"probe/{split}_{second}_logp"] = rejected.mean().item()
        other = (1 - chosen.exp() - rejected.exp()).clamp(min=0)
        metrics[f"probe/{split}_other_mass"] = other.mean().item()
    return metrics


def _build_pairs(config: DPOConfig, model, tokenizer, world: TextWorld) -> tuple[list, dict]:
    if config.preference_file:
        return read_preference_file(config.preference_file), {}
    train = _arithmetic(world, "train")
    seed = config.runner.seed
    if config.pairs == "offline":
        return offline_pairs(world, train[: config.num_pairs], seed), {}
    offline_count = config.num_pairs // 2 if config.pairs == "mixed" else 0
    offline = offline_pairs(world, train[:offline_count], seed)
    sampled, skipped = on_policy_pairs(
        model,
        tokenizer,
        train[offline_count:],
        config.num_pairs - offline_count,
        config.samples_per_prompt,
        config.sample_temperature,
        seed,
    )
    if not sampled:
        raise ConfigError(
            "pairs=on_policy: no prompt gave both a correct and a wrong sample "
            f"({dict(skipped)}); raise sample_temperature or samples_per_prompt"
        )
    return offline + sampled, dict(skipped)


def prepare(config: DPOConfig, run_dir: Path) -> None:
    assets = assets_dir(run_dir)
    if (assets / "data.json").is_file():
        return
    assets.mkdir(parents=True, exist_ok=True)
    base = pretrain_lm.resolve_base_model(config.base_model)
    model, tokenizer = _load(base)
    context = model.config.max_position_embeddings
    max_length = config.max_length or context
    if max_length > context:
        raise ConfigError(f"max_length={max_length} exceeds the model's context ({context})")
    world = TextWorld(config.world)
    pairs, skipped = _build_pairs(config, model, tokenizer, world)
    tensors, truncated = tokenize_pairs(pairs, tokenizer, max_length)
    if truncated:
        sys.stderr.write(f"[dpo] {truncated} responses cut to max_length={max_length} tokens\n")
    tensors["ref_chosen"], tensors["ref_rejected"] = _batched_logps(model, tensors)
    probe = {}
    if config.probe_size:
        heldout = offline_pairs(
            world, _arithmetic(world, "validation")[: config.probe_size], config.runner.seed + 1
        )
        probe = {
            "train": {k: v[: config.probe_size] for k, v in tensors.items() if "ref" not in k},
            "heldout": tokenize_pairs(heldout, tokenizer, max_length)[0],
        }
    info = {
        "base_model": str(base),
        "num_pairs": len(pairs),
        "pair_sources": dict(Counter(p.source.split(" ")[0] for p in pairs)),
        "truncated_responses": truncated,
        "skipped": skipped,
        "initial_probe": _probe_metrics(model, probe) if probe else {},
        "accuracy_before": _accuracy(model, tokenizer, world),
    }
    torch.save(tensors, assets / "pairs.pt")
    torch.save(probe, assets / "probe.pt")
    with (assets / "pairs.jsonl").open("w") as file:
        for pair in pairs:
            file.write(json.dumps(pair.__dict__) + "\n")
    # data.json last: its presence marks the assets complete.
    (assets / "data.json").write_text(json.dumps(info, indent=2) + "\n")


def _arithmetic(world: TextWorld, split: str) -> list[Example]:
    """Pairs, probes and evaluation use the arithmetic task, whatever else `world.mix` holds."""
    return [e for e in world.split(split) if e.task == "arithmetic"]


def _accuracy(model, tokenizer, world: TextWorld) -> float:
    return lm.task_accuracy(model, tokenizer, _arithmetic(world, "test"))["accuracy"]


def build_model(config: DPOConfig, run_dir: Path) -> torch.nn.Module:
    return _load(Path(_data_info(run_dir)["base_model"]))[0]


def build_dataset(config: DPOConfig, run_dir: Path) -> TensorDataset:
    return TensorDataset(torch.load(assets_dir(run_dir) / "pairs.pt"))


def step(model, batch: dict[str, torch.Tensor], config: DPOConfig):
    logps = pair_logps(model, batch)
    out = dpo_loss(
        logps.chosen,
        logps.rejected,
        batch["ref_chosen"],
        batch["ref_rejected"],
        config.beta,
        config.beta_rejected,
    )
    if config.loss_type == "ipo":
        references = batch["ref_chosen"], batch["ref_rejected"]
        losses = ipo_loss(logps.chosen, logps.rejected, *references, config.beta)
        out = out._replace(losses=losses)
    loss = nll_regularised_dpo_loss(
        out, logps.chosen_token_logps, logps.chosen_token_mask, config.nll_weight
    )
    with torch.no_grad():
        nll = -(logps.chosen_token_logps.sum() / logps.chosen_token_mask.sum()).item()
        metrics = {
            "tokens": int(batch["chosen_attention"].sum() + batch["rejected_attention"].sum()),
            "preference_loss": out.losses.mean().item(),
            "chosen_nll": nll,
            "logp_chosen": logps.chosen.mean().item(),
            "logp_rejected": logps.rejected.mean().item(),
            "reward_chosen": out.chosen_rewards.mean().item(),
            "reward_rejected": out.rejected_rewards.mean().item(),
            "margin": (out.chosen_rewards - out.rejected_rewards).mean().item(),
            "reward_accuracy": (out.chosen_rewards > out.rejected_rewards).float().mean().item(),
        }
    return loss, metrics


@functools.lru_cache(maxsize=1)
def _probe(run_dir: Path) -> dict:
    return torch.load(assets_dir(run_dir) / "probe.pt")


def diagnose(model, config: DPOConfig, run_dir: Path) -> dict[str, float]:
    if not config.probe_size:
        return {}
    device = next(model.parameters()).device
    probe = {
        split: {k: v.to(device) for k, v in tensors.items()}
        for split, tensors in _probe(run_dir).items()
    }
    return _probe_metrics(model, probe)


def export(model, config: DPOConfig, run_dir: Path, out_dir: Path) -> None:
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(_data_info(run_dir)["base_model"]).save_pretrained(out_dir)


def evaluate(config: DPOConfig, run_dir: Path) -> dict:
    info = _data_info(run_dir)
    model, tokenizer = _load(run_dir / "model")
    after = _accuracy(model, tokenizer, TextWorld(config.world))
    summary = {
        "accuracy_before": info["accuracy_before"],
        "accuracy_after": after,
        "accuracy_change": after - info["accuracy_before"],
        "num_pairs": info["num_pairs"],
        "pair_sources": info["pair_sources"],
        "truncated_responses": info["truncated_responses"],
        "skipped": info["skipped"],
    }
    if info["initial_probe"]:
        rows = [{"step": 0, **info["initial_probe"]}, *read_metrics(run_dir)]
        first, last = rows[0], rows[-1]
        # Drops are start minus end: positive when the log-prob fell.
        summary |= {
            "chosen_logp_drop": first["probe/train_chosen_logp"] - last["probe/train_chosen_logp"],
            "rejected_logp_drop": first["probe/train_rejected_logp"]
            - last["probe/train_rejected_logp"],
            "heldout_correct_logp_drop": first["probe/heldout_correct_logp"]
            - last["probe/heldout_correct_logp"],
            "heldout_wrong_logp_drop": first["probe/heldout_wrong_logp"]
            - last["probe/heldout_wrong_logp"],
            "train_other_mass_start": first["probe/train_other_mass"],
            "train_other_mass_end": last["probe/train_other_mass"],
        }
        variant = (
            f"{config.loss_type}, β={config.beta}"
            + (f", β⁻={config.beta_rejected}" if config.beta_rejected is not None else "")
            + (f", λ={config.nll_weight}" if config.nll_weight else "")
            + f", pairs={'file' if config.preference_file else config.pairs}"
        )
        plot_3d_properties(rows, run_dir / "3d_properties.png", f"DPO 3D-properties ({variant})")
    return summary


JOB = Job(
    name="dpo",
    config_cls=DPOConfig,
    prepare=prepare,
    build_model=build_model,
    build_dataset=build_dataset,
    step=step,
    export=export,
    evaluate=evaluate,
    diagnose=diagnose,
    sweep=SweepSpec(
        grid={"beta_rejected": [0.1, 0.05, 0.02], "nll_weight": [0.0, 1.0]},
        metrics=("accuracy_after", "chosen_logp_drop"),
        mode="max",
    ),
)

if __name__ == "__main__":
    main(JOB)
