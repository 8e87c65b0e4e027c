"""Preference pairs for DPO: from the arithmetic world or a JSONL file, tokenised for training.

Sources (`pairs` in the job config):
- `offline`: chosen = the world's correct worked answer, rejected = a plausible wrong one (a
  slip in one column). Both are off-policy for the SFT model's mistakes: the case where the
  paper's 3D-properties are strongest.
- `on_policy`: both responses sampled from the SFT model at the start of training (one round,
  not iterative) and labelled by checking the answer; prompts where every sample agrees give no
  pair and are counted.
- a preference file: JSON lines `{"prompt": ..., "chosen": ..., "rejected": ...}`.

Tokenisation: `<s> prompt` then `response </s>`, each side right-padded to one width; only the
response tokens (and the closing `</s>`) count in the log-probs. Responses are tokenised from
text, so sampled, generated and file pairs go through one path. A prompt that leaves no room
for a response is an error naming the record; responses cut to fit `max_length` are counted
and the count is reported, never silent.
"""

from __future__ import annotations

import json
import random
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kiln.config import ConfigError
from kiln.worlds.text import Example, TextWorld, extract_answer

SIDES = ("chosen", "rejected")
FIELDS = ("prompt", *SIDES)


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str
    source: str  # "offline", "on_policy", or "<file>:<line>" (named in errors)


def read_preference_file(path: str | Path) -> list[PreferencePair]:
    """Read JSON lines of prompt/chosen/rejected; any bad record is an error naming its line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"preference_file={str(path)!r}: no such file")
    pairs = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"preference_file {path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{where}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise ConfigError(f"{where}: expected an object with keys {list(FIELDS)}")
        for field in FIELDS:
            if field not in record:
                raise ConfigError(f"{where}: missing field {field!r} (expected {list(FIELDS)})")
            if not isinstance(record[field], str):
                raise ConfigError(f"{where}: field {field!r} must be a string")
        for field in SIDES:
            if not record[field].strip():
                raise ConfigError(f"{where}: field {field!r} is empty (expected a response)")
        if record["chosen"] == record["rejected"]:
            raise ConfigError(f"{where}: chosen and rejected are identical")
        pairs.append(PreferencePair(record["prompt"], record["chosen"], record["rejected"], where))
    if not pairs:
        raise ConfigError(f"preference_file={str(path)!r}: no records")
    return pairs


def offline_pairs(world: TextWorld, examples: list[Example], seed: int) -> list[PreferencePair]:
    rng = random.Random(seed)
    return [
        PreferencePair(e.prompt, e.completion, world.wrong_answer(e, rng), "offline")
        for e in examples
    ]


@torch.no_grad()
def on_policy_pairs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    wanted: int,
    samples_per_prompt: int,
    temperature: float,
    seed: int,
    prompts_per_batch: int = 32,
) -> tuple[list[PreferencePair], Counter]:
    """Up to `wanted` pairs of (a correct, a wrong) sample per prompt, and why prompts gave none."""
    longest = max(len(tokenizer(e.completion).input_ids) for e in examples[:256])
    torch.manual_seed(seed)
    model.eval()
    pairs, skipped = [], Counter()
    progress = tqdm(total=wanted, desc="on-policy pairs", unit="pair", file=sys.stderr)
    for start in range(0, len(examples), prompts_per_batch):
        chunk = examples[start : start + prompts_per_batch]
        batch = tokenizer(
            [e.prompt for e in chunk], return_tensors="pt", padding=True, padding_side="left"
        )
        generated = model.generate(
            **batch,
            do_sample=True,
            temperature=temperature,
            top_k=None,
            top_p=None,
            max_new_tokens=longest + 4,
            num_return_sequences=samples_per_prompt,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )[:, batch.input_ids.shape[1] :]
        finished = (generated == tokenizer.eos_token_id).any(1).tolist()
        texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
        for i, example in enumerate(chunk):
            rows = range(i * samples_per_prompt, (i + 1) * samples_per_prompt)
            done = [texts[r] for r in rows if finished[r]]
            skipped["unfinished_samples"] += samples_per_prompt - len(done)
            right = [t for t in done if extract_answer(t) == example.answer]
            wrong = [t for t in done if extract_answer(t) != example.answer]
            if right and wrong:
                pairs.append(PreferencePair(example.prompt, right[0], wrong[0], "on_policy"))
                progress.update()
            else:
                skipped["prompts_all_correct" if right else "prompts_without_correct"] += 1
        if len(pairs) >= wanted:
            break
    progress.close()
    return pairs[:wanted], skipped


def tokenize_pairs(
    pairs: list[PreferencePair], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> tuple[dict[str, torch.Tensor], int]:
    """Right-padded `{side}_ids / _attention / _response` tensors [N, width], and how many
    responses were cut to fit max_length."""
    prompts = tokenizer([p.prompt for p in pairs]).input_ids
    rows: dict[str, list[list[int]]] = {side: [] for side in SIDES}
    starts: dict[str, list[int]] = {side: [] for side in SIDES}
    truncated = 0
    for side in SIDES:
        responses = tokenizer([getattr(p, side) for p in pairs], add_special_tokens=False)
        for pair, prompt, response in zip(pairs, prompts, responses.input_ids):
            if len(prompt) >= max_length:
                raise ConfigError(
                    f"{pair.source}: prompt is {len(prompt)} tokens, which leaves no room for a "
                    f"response within max_length={max_length} (the model's context)"
                )
            ids = prompt + response + [tokenizer.eos_token_id]
            if len(ids) > max_length:
                truncated += 1
                ids = ids[:max_length]
            rows[side].append(ids)
            starts[side].append(len(prompt))
    width = max(len(ids) for side in SIDES for ids in rows[side])
    tensors = {}
    for side in SIDES:
        n = len(pairs)
        ids = torch.full((n, width), tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros(n, width, dtype=torch.long)
        response = torch.zeros(n, width, dtype=torch.long)
        for i, (row, start) in enumerate(zip(rows[side], starts[side])):
            ids[i, : len(row)] = torch.tensor(row)
            attention[i, : len(row)] = 1
            response[i, start : len(row)] = 1
        tensors[f"{side}_ids"], tensors[f"{side}_attention"] = ids, attention
        tensors[f"{side}_response"] = response
    return tensors, truncated
