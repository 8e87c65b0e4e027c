"""AdaMoE fine-tuning (arXiv 2406.13233) of a Mixtral-architecture model, through the runner.

    python -m jobs.adamoe --preset tiny            # m=4 null experts, top-k'=3 (n=4, k=2)
    python -m jobs.adamoe --preset tiny_baseline   # the same LoRA fine-tune at fixed top-2
    python -m jobs.sweep adamoe                    # grid over num_null_experts x top_k
    python -m jobs.adamoe pareto <sweep dir>       # accuracy vs FLOPs Pareto plot of a sweep

Starts from a Mixtral checkpoint (default: `pretrain_lm --preset moe`, trained once and
cached), converts every MoE block with `kiln.adamoe.convert` (null router tiled from the
pretrained one) and fine-tunes it as the paper does: LoRA (peft) on attention and on the fused
expert weights, routers (true and null) trained in full, LM loss on completion tokens plus
α·ℓ_null, α stepping from `balance_weight_start` (1e-4, the official code's) to
`balance_weight_end` (0) a quarter of the way in. The authors' 0.02 → 1e-4 at half-way is
`--set balance_weight_start=0.02 --set balance_weight_end=1e-4 --set balance_switch_fraction=0.5`;
why the defaults differ is in the module docstring of `kiln/adamoe/model.py`.

Logged every step: the LM and balance losses, α, true experts per token (overall and per token
type: prompt, copied / computed arithmetic tokens, recall, copy) and MoE FLOPs relative to the
base model's top-k. The run directory gains `routing.png`; `model/` is the merged AdaMoE model
(reload with `import kiln.adamoe` + `AutoModelForCausalLM.from_pretrained`); summary.json has
held-out accuracy per task and the routing analytics on the test split.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from transformers import AutoModelForCausalLM, AutoTokenizer

from jobs import pretrain_lm
from jobs.runner import Job, SweepSpec, TensorDataset, assets_dir, main
from kiln import lm
from kiln.adamoe import convert
from kiln.adamoe.analytics import (
    TOKEN_TYPES,
    char_types,
    moe_flops_ratio,
    per_type_means,
    plot_pareto,
    plot_routing,
    routing_counts,
)
from kiln.config import ConfigError, JobConfig
from kiln.tracking import read_metrics
from kiln.worlds.text import Example, TextWorld, TextWorldConfig

IGNORE = -100  # label of tokens the LM loss skips (prompt, padding)


class AdaMoEJobConfig(JobConfig):
    """AdaMoE: null experts + top-k' routing, LoRA fine-tuned, with routing analytics."""

    base_model: str = Field(
        "pretrain_lm:moe",
        description="Mixtral-architecture model: a save_pretrained folder, or "
        "'pretrain_lm:<preset>' to train (once, cached in $KILN_CACHE) and use that preset.",
    )
    world: TextWorldConfig = Field(
        default_factory=lambda: TextWorldConfig(
            mix={"arithmetic": 0.4, "recall": 0.3, "copy": 0.3}, eval_size=500
        ),
        description="Text world of the fine-tuning data and the held-out evaluation.",
    )
    num_null_experts: int = Field(8, ge=0, description="m: null (zero, free) experts per layer.")
    top_k: int = Field(
        4,
        ge=1,
        description="k': experts each token selects among true + null (the base model's k and "
        "num_null_experts=0 give the fixed top-k baseline).",
    )
    train_examples: int = Field(4000, ge=1, description="Fine-tuning examples from the world.")
    lora_rank: int = Field(8, ge=1, description="LoRA rank of attention and expert adapters.")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA alpha (scale = alpha / rank).")
    lora_attention: list[str] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Attention linear layers given LoRA adapters (module names).",
    )
    lora_experts: list[str] = Field(
        ["experts.gate_up_proj", "experts.down_proj"],
        description="Fused 3D expert parameters given LoRA adapters (peft target_parameters).",
    )
    balance_weight_start: float = Field(
        1e-4,
        ge=0,
        description="α of ℓ_null before the switch (balance first). Default: the official "
        "code's 1e-4. Under AdamW the authors' 0.02 moves the null router no faster (its only "
        "gradient is α·∇ℓ_null); it only pulls harder on the pretrained router "
        "(kiln/adamoe/model.py).",
    )
    balance_weight_end: float = Field(
        0.0,
        ge=0,
        description="α of ℓ_null after the switch (paper: 1e-4 in epoch 2, token freedom). "
        "Default 0: under AdamW any α > 0 keeps the null router chasing the uniform load at full "
        "speed; 0 stops it, so the rest of the fine-tune adapts to a settled routing.",
    )
    balance_switch_fraction: float = Field(
        0.25,
        ge=0,
        le=1,
        description="Fraction of max_steps after which α drops to the end value (the load "
        "settles at ℓ_null's uniform point in ~40 steps at lr 1e-3: a quarter of the tiny "
        "preset's 240).",
    )
    max_length: int = Field(
        128, ge=8, description="Longest prompt+completion in tokens; longer examples are skipped."
    )

    @model_validator(mode="after")
    def _lora_targets(self) -> AdaMoEJobConfig:
        if not self.lora_attention and not self.lora_experts:
            raise ValueError("lora_attention and lora_experts are both empty: nothing to adapt")
        return self

    presets = {
        # The paper's m = n, k' = k + 1 on the moe base (n = 4, k = 2): ℓ_null's uniform load
        # is 3·4/8 = 1.5 true experts, a quarter of the MoE FLOPs saved (BENCHMARKS.md).
        "tiny": {
            "num_null_experts": 4,
            "top_k": 3,
            "runner": {
                "max_steps": 240,
                "lr": 1e-3,
                "warmup_steps": 10,
                "micro_batch_size": 16,
                "log_every": 10,
            },
        },
        "tiny_baseline": {
            "num_null_experts": 0,
            "top_k": 2,
            "runner": {
                "max_steps": 240,
                "lr": 1e-3,
                "warmup_steps": 10,
                "micro_batch_size": 16,
                "log_every": 10,
            },
        },
    }


def _info(run_dir: Path) -> dict:
    return json.loads((assets_dir(run_dir) / "data.json").read_text())


def _encode(examples: list[Example], tokenizer, max_length: int) -> dict[str, torch.Tensor]:
    """Right-padded ids, attention mask, LM labels (completion + </s>) and token types."""
    rows = []
    for example in examples:
        encoded = tokenizer(example.text, return_offsets_mapping=True)
        types = char_types(example)
        ids = [*encoded.input_ids, tokenizer.eos_token_id]
        # A token's type is its last character's (`<s>`: prompt; `</s>`: the text's last char).
        spans = [*encoded.offset_mapping, (len(types) - 1, len(types))]
        token_types = [types[end - 1] if end else 0 for _, end in spans]
        in_completion = [end > len(example.prompt) for _, end in spans]
        if len(ids) <= max_length:
            labels = [i if keep else IGNORE for i, keep in zip(ids, in_completion)]
            rows.append((ids, labels, token_types))
    if not rows:
        raise ConfigError(f"max_length={max_length}: every example is longer; raise it")
    width = max(len(ids) for ids, _, _ in rows)

    def pad(values: list[int], fill: int) -> list[int]:
        return values + [fill] * (width - len(values))

    return {
        "input_ids": torch.tensor([pad(ids, tokenizer.pad_token_id) for ids, _, _ in rows]),
        "attention_mask": torch.tensor([pad([1] * len(ids), 0) for ids, _, _ in rows]),
        "labels": torch.tensor([pad(labels, IGNORE) for _, labels, _ in rows]),
        "token_types": torch.tensor([pad(types, 0) for _, _, types in rows]),
    }


def prepare(config: AdaMoEJobConfig, run_dir: Path) -> None:
    assets = assets_dir(run_dir)
    if (assets / "data.json").is_file():
        return
    assets.mkdir(parents=True, exist_ok=True)
    base = pretrain_lm.resolve_base_model(config.base_model)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(base)
    try:
        convert(model, config.num_null_experts, config.top_k)  # fails early on bad input
    except ValueError as error:
        raise ConfigError(f"base_model={config.base_model!r}: {error}") from None
    world = TextWorld(config.world)
    train = world.split("train", config.train_examples)
    tensors = _encode(train, tokenizer, config.max_length)
    test = world.split("test")
    info = {
        "base_model": str(base),
        "train_examples": len(tensors["input_ids"]),
        "skipped_too_long": len(train) - len(tensors["input_ids"]),
        "base_test_accuracy": lm.task_accuracy(model, tokenizer, test)["accuracy"],
    }
    torch.save(tensors, assets / "train.pt")
    torch.save(_encode(test, tokenizer, config.max_length), assets / "test.pt")
    (assets / "data.json").write_text(json.dumps(info, indent=2) + "\n")  # last: marks complete


def build_model(config: AdaMoEJobConfig, run_dir: Path) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(_info(run_dir)["base_model"], dtype=torch.float32)
    model = convert(base, config.num_null_experts, config.top_k)
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        target_modules=config.lora_attention or None,
        target_parameters=config.lora_experts or None,
        lora_dropout=0.0,  # peft's LoRA on fused expert parameters supports no dropout
    )
    model = get_peft_model(model, lora)
    for name, parameter in model.named_parameters():
        if name.endswith(("mlp.gate.weight", "mlp.gate.null_weight")):
            parameter.requires_grad_(True)  # the paper trains the router(s) in full
    return model


def build_dataset(config: AdaMoEJobConfig, run_dir: Path) -> TensorDataset:
    return TensorDataset(torch.load(assets_dir(run_dir) / "train.pt"))


def balance_weight(step: int, config: AdaMoEJobConfig) -> float:
    """α of ℓ_null at optimizer step `step` (0-based): balance first, then the end value."""
    switch = config.balance_switch_fraction * config.runner.max_steps
    return config.balance_weight_start if step < switch else config.balance_weight_end


def _routing(model_config, output, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    counts = routing_counts(
        output.router_logits,
        model_config.num_local_experts,
        model_config.num_experts_per_tok,
        batch["token_types"],
        batch["attention_mask"],
    )
    ratio = moe_flops_ratio(counts["true_experts_per_token"], model_config)
    return counts | {"moe_flops_ratio": ratio}


def step(model, batch: dict[str, torch.Tensor], config: AdaMoEJobConfig):
    output = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        output_router_logits=True,
    )
    lm_loss = F.cross_entropy(
        output.logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE
    )
    weight = balance_weight(model.global_steps, config)  # the DeepSpeed engine's step count
    loss = lm_loss + weight * output.aux_loss
    with torch.no_grad():
        metrics = {
            "tokens": int(batch["attention_mask"].sum()),
            "lm_loss": lm_loss.item(),
            "balance_loss": output.aux_loss.item(),
            "balance_weight": weight,
            **_routing(model.module.config, output, batch),
        }
    return loss, metrics


def export(model, config: AdaMoEJobConfig, run_dir: Path, out_dir: Path) -> None:
    model.merge_and_unload().save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(_info(run_dir)["base_model"]).save_pretrained(out_dir)


@torch.no_grad()
def _test_analytics(model, tensors: dict[str, torch.Tensor], batch_size: int = 64) -> dict:
    """Teacher-forced on the test split (prompt + reference completion): routing analytics, and
    next-token accuracy of completion tokens overall and per token type (finer-grained than
    exact answers, which a tiny model gets all or nothing)."""
    totals: dict[str, float] = {}
    tokens = 0
    for start in range(0, len(tensors["input_ids"]), batch_size):
        batch = {key: value[start : start + batch_size] for key, value in tensors.items()}
        output = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            output_router_logits=True,
        )
        real = int(batch["attention_mask"].sum())
        # Sums are additive; the two means are weighted by the batch's real tokens.
        for key, value in _routing(model.config, output, batch).items():
            weight = real if key in ("true_experts_per_token", "moe_flops_ratio") else 1
            totals[key] = totals.get(key, 0.0) + value * weight
        tokens += real
        targets, types = batch["labels"][:, 1:], batch["token_types"][:, 1:]
        hits = (output.logits[:, :-1].argmax(-1) == targets) & (targets != IGNORE)
        for index, name in enumerate(TOKEN_TYPES):
            chosen = (targets != IGNORE) & (types == index)
            totals[f"hits/{name}"] = totals.get(f"hits/{name}", 0) + int(hits[chosen].sum())
            totals[f"scored/{name}"] = totals.get(f"scored/{name}", 0) + int(chosen.sum())
    summary = {
        "test/true_experts_per_token": totals["true_experts_per_token"] / tokens,
        "test/moe_flops_ratio": totals["moe_flops_ratio"] / tokens,
        "test/token_accuracy": sum(totals[f"hits/{n}"] for n in TOKEN_TYPES)
        / sum(totals[f"scored/{n}"] for n in TOKEN_TYPES),
    }
    summary |= {f"test/{key}": value for key, value in per_type_means(totals).items()}
    return summary | {
        f"test/token_accuracy/{name}": totals[f"hits/{name}"] / totals[f"scored/{name}"]
        for name in TOKEN_TYPES
        if totals[f"scored/{name}"]
    }


def evaluate(config: AdaMoEJobConfig, run_dir: Path) -> dict:
    info = _info(run_dir)
    model = AutoModelForCausalLM.from_pretrained(run_dir / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    summary: dict = {"base_test_accuracy": info["base_test_accuracy"]}
    accuracy = lm.task_accuracy(model, tokenizer, TextWorld(config.world).split("test"))
    summary |= {f"test/{key}": value for key, value in accuracy.items()}
    summary |= _test_analytics(model, torch.load(assets_dir(run_dir) / "test.pt"))
    rows = read_metrics(run_dir)
    if rows:
        title = (
            f"AdaMoE m={config.num_null_experts}, k'={config.top_k} "
            f"(base: top-{model.config.base_top_k} of {model.config.num_local_experts})"
        )
        plot_routing(rows, run_dir / "routing.png", title)
    return summary


JOB = Job(
    name="adamoe",
    config_cls=AdaMoEJobConfig,
    prepare=prepare,
    build_model=build_model,
    build_dataset=build_dataset,
    step=step,
    export=export,
    evaluate=evaluate,
    sweep=SweepSpec(
        grid={"num_null_experts": [0, 4, 8], "top_k": [2, 3, 4]},
        metrics=(
            "test/accuracy",
            "test/moe_flops_ratio",
            "test/true_experts_per_token",
            "test/token_accuracy",
        ),
        mode="max",
    ),
)


def pareto(sweep_dir: Path) -> Path:
    """`pareto.png` of a finished `python -m jobs.sweep adamoe` run (from its results.csv)."""
    import csv

    with (sweep_dir / "results.csv").open() as file:
        rows = list(csv.DictReader(file))
    points = [
        {
            "label": f"m={row['config/num_null_experts']}, k'={row['config/top_k']}",
            "flops": float(row["test/moe_flops_ratio"]),
            "accuracy": float(row["test/accuracy"]),
        }
        for row in rows
    ]
    plot_pareto(points, sweep_dir / "pareto.png")
    return sweep_dir / "pareto.png"


if __name__ == "__main__":
    if sys.argv[1:2] == ["pareto"]:
        print(pareto(Path(sys.argv[2])))
    else:
        main(JOB)
