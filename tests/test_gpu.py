"""CUDA path of the core LM code (bf16 training steps and batched generation on one GPU).

Run on a GPU machine with `make test-gpu`; skipped elsewhere. Needs no Ray or DeepSpeed, so it
also runs on GPU boxes that only carry torch + transformers.
"""

import pytest
import torch

from kiln.lm import ModelConfig, build_model, pack_examples, task_accuracy
from kiln.worlds.text import TextWorld, TextWorldConfig
from kiln.worlds.tokenizer import train_tokenizer


@pytest.mark.gpu
def test_bf16_training_on_cuda_lowers_loss_and_generates():
    torch.manual_seed(0)
    world = TextWorld(TextWorldConfig(train_size=4000, eval_size=32))
    train = world.split("train")
    tokenizer = train_tokenizer((e.text for e in train), vocab_size=512)
    blocks = pack_examples(train, tokenizer, block_size=128).cuda()
    model = build_model(ModelConfig(), tokenizer).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        batch = blocks[torch.randint(len(blocks), (64,), device="cuda")]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < losses[0] - 3
    metrics = task_accuracy(model, tokenizer, world.split("test"))
    assert 0.0 <= metrics["accuracy"] <= 1.0 and "accuracy/arithmetic" in metrics
