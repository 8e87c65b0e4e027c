"""Causal LMs on the text world: architectures, packed training data, and task accuracy.

Models are plain Hugging Face `LlamaForCausalLM` / `MixtralForCausalLM`, so everything trained
here loads with `AutoModelForCausalLM.from_pretrained` and no kiln import, and a user's own
checkpoint goes through the same code.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Literal

import torch
from pydantic import Field
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from kiln.config import Section
from kiln.worlds.text import Example, extract_answer


class ModelConfig(Section):
    """Architecture of a model trained from scratch."""

    family: Literal["llama", "mixtral"] = Field("llama", description="Hugging Face architecture.")
    hidden_size: int = Field(128, ge=8, description="Residual width.")
    num_layers: int = Field(4, ge=1, description="Transformer blocks.")
    num_heads: int = Field(4, ge=1, description="Attention (query) heads.")
    num_kv_heads: int = Field(4, ge=1, description="Key/value heads (< num_heads: GQA).")
    intermediate_size: int = Field(384, ge=8, description="MLP (or per-expert) hidden width.")
    max_position_embeddings: int = Field(512, ge=16, description="Longest sequence (RoPE).")
    num_experts: int = Field(4, ge=1, description="Experts per MoE layer (mixtral only).")
    experts_per_token: int = Field(2, ge=1, description="Router top-k (mixtral only).")

    def model_post_init(self, _context) -> None:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, "
                f"num_kv_heads={self.num_kv_heads}: expected hidden_size divisible by num_heads "
                "and num_heads divisible by num_kv_heads"
            )
        if self.experts_per_token > self.num_experts:
            raise ValueError(
                f"experts_per_token={self.experts_per_token} exceeds num_experts={self.num_experts}"
            )


def build_model(arch: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_kv_heads,
        max_position_embeddings=arch.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    if arch.family == "mixtral":
        config = MixtralConfig(
            **common,
            num_local_experts=arch.num_experts,
            num_experts_per_tok=arch.experts_per_token,
        )
        return MixtralForCausalLM(config)
    return LlamaForCausalLM(LlamaConfig(**common))


def pack_examples(
    examples: list[Example], tokenizer: PreTrainedTokenizerBase, block_size: int
) -> torch.Tensor:
    """Concatenate `<s> text </s>` of every example and cut into [num_blocks, block_size].

    Packing keeps every position useful (no padding), so tokens/s is the real training rate.
    The tail that does not fill a block is dropped.
    """
    ids = tokenizer([e.text for e in examples], add_special_tokens=True)["input_ids"]
    stream = [token for row in ids for token in (*row, tokenizer.eos_token_id)]
    blocks = len(stream) // block_size
    if blocks == 0:
        raise ValueError(
            f"block_size={block_size} is longer than the whole dataset ({len(stream)} tokens)"
        )
    return torch.tensor(stream[: blocks * block_size]).view(blocks, block_size)


@torch.no_grad()
def generate_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 64,
) -> list[str]:
    """Greedy completions (text after the prompt, up to </s>), batched with left padding."""
    device = next(model.parameters()).device
    outputs = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(
            prompts[start : start + batch_size],
            return_tensors="pt",
            padding=True,
            padding_side="left",  # generation continues from the last column
        ).to(device)
        generated = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new_tokens = generated[:, batch["input_ids"].shape[1] :]
        outputs += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return outputs


def task_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    batch_size: int = 64,
) -> dict[str, float]:
    """Greedy exact-answer accuracy, overall (`accuracy`) and per task (`accuracy/<task>`)."""
    longest = max(
        len(tokenizer(e.completion, add_special_tokens=False).input_ids) for e in examples
    )
    was_training = model.training
    model.eval()
    completions = generate_completions(
        model, tokenizer, [e.prompt for e in examples], longest + 4, batch_size
    )
    model.train(was_training)
    hits: dict[str, list[bool]] = defaultdict(list)
    for example, completion in zip(examples, completions):
        hits[example.task].append(extract_answer(completion) == example.answer)
    metrics = {f"accuracy/{task}": sum(h) / len(h) for task, h in sorted(hits.items())}
    metrics["accuracy"] = sum(sum(h) for h in hits.values()) / len(examples)
    return metrics
