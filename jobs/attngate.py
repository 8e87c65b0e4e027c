"""Attention-Gate (arXiv 2410.12876): train KV-eviction gates on a pretrained LM (runner job).

    python -m jobs.attngate --preset tiny [--set mode=cpt|sft] [--set gate.target_eviction=0.5]
        [--set lora_rank=8] [--set base_model=/path/to/llama/checkpoint]
    python -m jobs.sweep attngate      # target eviction 0.3 / 0.5 / 0.7, gate vs both baselines

Starts from a Llama-architecture model (default: the `pretrain_lm` tiny model, trained once and
cached), attaches an Attention-Gate to every layer (`kiln.attngate`) and trains the gates (plus
LoRA adapters when `lora_rank` > 0; the host weights are otherwise frozen) with the task loss +
the eviction regulariser:
- `cpt`: continual pre-training, causal-LM loss on packed text-world blocks;
- `sft`: supervised fine-tuning on the evaluated tasks, loss on the completion tokens only.

Evaluation (summary.json): greedy exact-answer accuracy per task (`eval_tasks`) with the full
cache, the gate (`GateCache`, evicted entries never stored), and StreamingLLM and H2O at the
gate's measured eviction ratio, all on the same host weights (the base, or base + merged LoRA).
The run directory gains `accuracy_vs_eviction.png`; in a sweep, the sweep directory gains the
same plot over every finished trial.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, create_model, model_validator
from transformers import AutoModelForCausalLM, AutoTokenizer

from jobs import pretrain_lm
from jobs.runner import Job, SweepSpec, TensorDataset, assets_dir, main
from kiln import attngate, lm
from kiln.attngate.evaluation import accuracy_under_eviction, make_cache
from kiln.config import ConfigError, JobConfig, Section
from kiln.worlds.text import TextWorld, TextWorldConfig

METHODS = ("full", "gate", "streaming", "h2o")
SUMMARY_PLOT = "accuracy_vs_eviction.png"


class _ValidGate(Section):
    @model_validator(mode="after")
    def _gate_accepts_it(self):
        attngate.GateConfig(**self.model_dump())  # its ValueError names the field
        return self


# The job's `gate` section mirrors kiln.attngate.GateConfig (a plain dataclass), help included.
GateSection = create_model(
    "GateSection",
    __base__=_ValidGate,
    __doc__="The Attention-Gate on every layer, and its eviction regulariser.",
    **{
        spec.name: (
            typing.get_type_hints(attngate.GateConfig)[spec.name],
            Field(spec.default, description=spec.metadata["help"]),
        )
        for spec in dataclasses.fields(attngate.GateConfig)
    },
)


def gate_config(config: AttnGateConfig) -> attngate.GateConfig:
    return attngate.GateConfig(**config.gate.model_dump())


class AttnGateConfig(JobConfig):
    """Train Attention-Gates (learned in-context KV eviction) by CPT or SFT, vs baselines."""

    base_model: str = Field(
        "pretrain_lm:tiny",
        description="Llama-architecture model: a save_pretrained folder, or "
        "'pretrain_lm:<preset>' to train (once, cached in $KILN_CACHE) and use that preset.",
    )
    mode: Literal["cpt", "sft"] = Field(
        "cpt",
        description="cpt: causal-LM loss on packed text-world blocks; sft: completion loss on "
        "examples of `eval_tasks`.",
    )
    gate: GateSection = Field(
        default_factory=GateSection, description="The gate and its regulariser."
    )
    lora_rank: int = Field(
        0, ge=0, description="Rank of LoRA adapters on q/k/v/o (0 = gates only; alpha = 2·rank)."
    )
    world: TextWorldConfig = Field(
        default_factory=lambda: TextWorldConfig(train_size=8000),
        description="Text world the training data comes from (CPT uses its whole mix).",
    )
    block_size: int = Field(128, ge=8, description="cpt: tokens per packed training sequence.")
    eval_tasks: list[Literal["arithmetic", "recall", "copy"]] = Field(
        ["recall", "arithmetic"],
        min_length=1,
        description="Tasks evaluated (and, in sft mode, trained on).",
    )
    eval_examples: int = Field(100, ge=1, description="Held-out test examples per task and method.")

    presets = {
        "tiny": {
            "runner": {
                "max_steps": 300,
                "lr": 1e-2,
                "warmup_steps": 20,
                "micro_batch_size": 16,
                "log_every": 10,
                "checkpoint_every": 100,
            },
        },
    }


def _base_path(run_dir: Path) -> Path:
    return Path(json.loads((assets_dir(run_dir) / "data.json").read_text())["base_model"])


def _task_examples(config: AttnGateConfig, task: str, split: str, size: int):
    world = config.world.model_copy(update={"mix": {task: 1.0}})
    return TextWorld(world).split(split, size)


def _sft_tensors(config: AttnGateConfig, tokenizer) -> dict[str, torch.Tensor]:
    """Right-padded prompt+completion rows; labels only on the completion and </s>."""
    per_task = config.world.train_size // len(config.eval_tasks)
    rows = []
    for task in config.eval_tasks:
        for example in _task_examples(config, task, "train", per_task):
            prompt = tokenizer(example.prompt).input_ids
            completion = tokenizer(example.completion, add_special_tokens=False).input_ids
            rows.append((prompt, [*completion, tokenizer.eos_token_id]))
    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, (prompt, completion) in enumerate(rows):
        length = len(prompt) + len(completion)
        ids[i, :length] = torch.tensor(prompt + completion)
        labels[i, len(prompt) : length] = torch.tensor(completion)
        mask[i, :length] = True
    return {"input_ids": ids, "labels": labels, "token_mask": mask}


def prepare(config: AttnGateConfig, run_dir: Path) -> None:
    assets = assets_dir(run_dir)
    if (assets / "data.json").is_file():
        return
    assets.mkdir(parents=True, exist_ok=True)
    base = pretrain_lm.resolve_base_model(config.base_model)
    model = AutoModelForCausalLM.from_pretrained(base)
    attngate.attach(model, gate_config(config))  # unsupported architectures fail here, before Ray
    tokenizer = AutoTokenizer.from_pretrained(base)
    if config.mode == "cpt":
        train = TextWorld(config.world).split("train")
        blocks = lm.pack_examples(train, tokenizer, config.block_size)
        tensors = {"input_ids": blocks, "labels": blocks}
    else:
        tensors = _sft_tensors(config, tokenizer)
    context = model.config.max_position_embeddings
    if tensors["input_ids"].shape[1] > context:
        raise ConfigError(
            f"training sequences of {tensors['input_ids'].shape[1]} tokens exceed the model's "
            f"context ({context}); lower block_size or world.recall_pairs"
        )
    torch.save(tensors, assets / "train.pt")
    (assets / "data.json").write_text(json.dumps({"base_model": str(base)}) + "\n")


def build_model(config: AttnGateConfig, run_dir: Path) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(_base_path(run_dir), dtype=torch.float32)
    model.requires_grad_(False)
    attngate.attach(model, gate_config(config))
    if config.lora_rank:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=config.lora_rank,
            lora_alpha=2 * config.lora_rank,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        )
        model = get_peft_model(model, lora)
    for layer in attngate.gated_layers(model):
        layer.gate.requires_grad_(True)
    return model


def build_dataset(config: AttnGateConfig, run_dir: Path) -> TensorDataset:
    return TensorDataset(torch.load(assets_dir(run_dir) / "train.pt"))


def step(model, batch: dict[str, torch.Tensor], config: AttnGateConfig):
    output = model(input_ids=batch["input_ids"], labels=batch["labels"])
    token_mask = batch.get("token_mask")
    regulariser = attngate.eviction_loss(model, gate_config(config), token_mask)
    with torch.no_grad():
        kept = attngate.retention(model, token_mask).item()
    tokens = int(token_mask.sum()) if token_mask is not None else batch["input_ids"].numel()
    metrics = {
        "tokens": tokens,
        "task_loss": output.loss.item(),
        "eviction_loss": regulariser.item(),
        "eviction": 1 - kept,
    }
    return output.loss + regulariser, metrics


def export(model, config: AttnGateConfig, run_dir: Path, out_dir: Path) -> None:
    if config.lora_rank:
        model = model.merge_and_unload()  # plain Llama weights + gates: loads without peft
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(_base_path(run_dir)).save_pretrained(out_dir)


def _evaluate_methods(config: AttnGateConfig, run_dir: Path) -> dict[str, float]:
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    # The full cache and the baselines run on the gated model's host weights (the base model,
    # or base + merged LoRA), so methods differ only in what they evict. A plain load of the
    # export is that host (it ignores the gate weights). Eager attention returns the weights
    # H2O accumulates; the gate computes its own.
    base = AutoModelForCausalLM.from_pretrained(run_dir / "model", attn_implementation="eager")
    attngate.observe_attention(base)
    gated = attngate.load_gated(run_dir / "model")
    metrics: dict[str, float] = {}
    for task in config.eval_tasks:
        examples = _task_examples(config, task, "test", config.eval_examples)
        full = accuracy_under_eviction(
            base, tokenizer, examples, lambda n: make_cache(base, "full", 1.0, n)
        )
        gate = accuracy_under_eviction(
            gated, tokenizer, examples, lambda n: make_cache(gated, "gate", 1.0, n)
        )
        results = {"full": full, "gate": gate}
        keep = 1 - gate["eviction"]  # the baselines' budget: the gate's measured retention
        for method in ("streaming", "h2o"):
            results[method] = accuracy_under_eviction(
                base, tokenizer, examples, lambda n, m=method, k=keep: make_cache(base, m, k, n)
            )
        for method, result in results.items():
            metrics[f"{method}/accuracy/{task}"] = result["accuracy"]
            metrics[f"{method}/eviction/{task}"] = result["eviction"]
    for method in METHODS:
        for key in ("accuracy", "eviction"):
            values = [metrics[f"{method}/{key}/{task}"] for task in config.eval_tasks]
            metrics[f"{method}/{key}"] = sum(values) / len(values)
    metrics["accuracy_drop"] = metrics["full/accuracy"] - metrics["gate/accuracy"]
    best_baseline = max(metrics["streaming/accuracy"], metrics["h2o/accuracy"])
    metrics["gate_minus_best_baseline"] = metrics["gate/accuracy"] - best_baseline
    return metrics


def plot_accuracy_vs_eviction(summaries: list[dict], tasks: list[str], path: Path) -> None:
    """One panel per task: accuracy against measured eviction ratio, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for method, marker in zip(METHODS, "s*ov"):
            points = sorted(
                (s[f"{method}/eviction/{task}"], s[f"{method}/accuracy/{task}"]) for s in summaries
            )
            ax.plot(*zip(*points), marker=marker, label=method)
        ax.set_title(task)
        ax.set_xlabel("KV entries evicted (fraction)")
        ax.set_ylabel("greedy exact-answer accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Attention-Gate vs StreamingLLM / H2O at the same eviction ratio")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def evaluate(config: AttnGateConfig, run_dir: Path) -> dict[str, float]:
    metrics = _evaluate_methods(config, run_dir)
    plot_accuracy_vs_eviction([metrics], config.eval_tasks, run_dir / SUMMARY_PLOT)
    if run_dir.parent.name == "trials":  # a sweep trial: redraw the sweep's plot
        finished = [json.loads(p.read_text()) for p in run_dir.parent.glob("*/summary.json")]
        plot_accuracy_vs_eviction(
            [metrics, *finished], config.eval_tasks, run_dir.parent.parent / SUMMARY_PLOT
        )
    return metrics


JOB = Job(
    name="attngate",
    config_cls=AttnGateConfig,
    prepare=prepare,
    build_model=build_model,
    build_dataset=build_dataset,
    step=step,
    export=export,
    evaluate=evaluate,
    sweep=SweepSpec(
        grid={"gate.target_eviction": [0.3, 0.5, 0.7]},
        metrics=("gate/accuracy", "gate/eviction", "streaming/accuracy", "h2o/accuracy"),
        mode="max",
    ),
)

if __name__ == "__main__":
    main(JOB)
