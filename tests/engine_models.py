"""Tiny random-weight Llama checkpoints (with the repo's tokenizer) for the engine tests."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

from kiln.worlds.text import TextWorld
from kiln.worlds.tokenizer import train_tokenizer


def build_tiny_llama(path: Path, seed: int = 0, max_positions: int = 96, **overrides) -> Path:
    """Save a 2-layer GQA Llama (hidden 48; or a Mistral) and a 256-token BPE tokenizer.

    A large initializer range makes next-token distributions peaked, so greedy choices are not
    near-ties that float rounding could flip between two correct implementations. `overrides`
    are config fields; `model_type="mistral"` builds a Mistral instead.
    """
    texts = [e.text for e in TextWorld().split("train", 300)]
    tokenizer = train_tokenizer(texts, vocab_size=256)
    torch.manual_seed(seed)
    mistral = overrides.pop("model_type", "llama") == "mistral"
    config = (MistralConfig if mistral else LlamaConfig)(
        vocab_size=len(tokenizer),
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        initializer_range=0.15,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **overrides,
    )
    model = (MistralForCausalLM if mistral else LlamaForCausalLM)(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):  # HF initialises them to zero; a real checkpoint's are not
                parameter.normal_(0, config.initializer_range)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def hf_greedy(path: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Reference: Hugging Face `generate`, one prompt at a time (no padding effects), stopping
    at generation_config's EOS ids."""
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
        outputs.append(out[0, len(prompt) :].tolist())
    return outputs
