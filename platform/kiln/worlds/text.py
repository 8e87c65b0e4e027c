"""The LLM text world: arithmetic with worked answers, key-value recall, and copy passages.

Every example is `prompt` + `completion`; arithmetic and recall completions end in
`#### <answer>`, and `extract_answer` scores every task with one rule. The tasks, and what
later methods use them for:

- `arithmetic`: column addition/subtraction with the working written out, e.g.
  `47+38=` -> ` 7+8=15 c1, 4+3+1=8 #### 85`. Correct vs. plausible-wrong answers feed DPO;
  the working has easy (copied) and hard (computed) tokens for AdaMoE.
- `recall`: a long list of `key=value` pairs, then one key is asked for. Most of the context is
  irrelevant to the answer, which is what KV-cache eviction (Attention-Gate) must learn.
- `copy`: a passage from a small grammar, repeated after `->` (the whole repeat is the answer).
  Long exact repeats make prompt-lookup (n-gram) speculation and a small draft model agree
  with the target often.

Splits are disjoint by content for arithmetic (a problem's hash picks its split), so held-out
accuracy measures generalisation, not memorisation; recall and copy draw from spaces too large
to collide and use a separate random stream per split.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from kiln.config import Section

Split = Literal["train", "validation", "test"]
TASKS = ("arithmetic", "recall", "copy")
ANSWER_MARK = "####"
_SPLIT_BUCKET = {"test": 0, "validation": 1}  # of 10 hash buckets; the rest are train
_SPLIT_STREAM = {"train": 0, "validation": 1, "test": 2}

_WORDS = {
    "det": ["the", "a", "one", "every"],
    "adj": ["red", "blue", "green", "small", "big", "old", "quick", "quiet", "bright", "dark"],
    "noun": ["fox", "box", "tree", "bird", "stone", "river", "house", "lamp", "cat", "ship"],
    "verb": ["sees", "finds", "holds", "moves", "likes", "paints", "follows", "hides"],
}


class TextWorldConfig(Section):
    """What the text world generates."""

    seed: int = Field(0, description="Seed for every split.")
    max_digits: int = Field(2, ge=1, le=6, description="Digits of arithmetic operands.")
    operations: list[Literal["+", "-"]] = Field(["+", "-"], description="Arithmetic operators.")
    recall_pairs: int = Field(8, ge=1, description="key=value pairs in a recall context.")
    copy_sentences: int = Field(2, ge=1, description="Sentences in a copy passage.")
    mix: dict[str, float] = Field(
        {"arithmetic": 0.6, "recall": 0.2, "copy": 0.2},
        description="Sampling weight of each task (keys: arithmetic, recall, copy).",
    )
    train_size: int = Field(20000, ge=1, description="Training examples.")
    eval_size: int = Field(200, ge=1, description="Validation and test examples each.")

    def model_post_init(self, _context) -> None:
        unknown = set(self.mix) - set(TASKS)
        if unknown or not any(w > 0 for w in self.mix.values()):
            raise ValueError(f"mix: expected positive weights over {TASKS}, got {self.mix}")


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str
    completion: str

    @property
    def answer(self) -> str:
        return extract_answer(self.completion)

    @property
    def text(self) -> str:
        return self.prompt + self.completion


def extract_answer(completion: str) -> str:
    """The text after the last `####`, or the whole completion where there is no mark."""
    _, mark, tail = completion.rpartition(ANSWER_MARK)
    return (tail if mark else completion).strip()


def _digits(n: int, width: int) -> list[int]:
    return [int(c) for c in str(n).zfill(width)][::-1]


def worked_answer(a: int, op: str, b: int) -> str:
    """Column arithmetic from the right, one `, `-separated step per column."""
    width = max(len(str(a)), len(str(b)))
    da, db = _digits(a, width), _digits(b, width)
    steps, carry = [], 0
    for x, y in zip(da, db):
        if op == "+":
            total = x + y + carry
            step = f"{x}+{y}" + (f"+{carry}" if carry else "") + f"={total}"
            carry = total // 10
        else:
            total = x - y - carry
            step = f"{x}-{y}" + (f"-{carry}" if carry else "") + f"={total}"
            if total < 0:
                step += f" b1 {total + 10}"
            carry = int(total < 0)
        steps.append(step + (" c1" if carry else ""))
    result = a + b if op == "+" else a - b
    return " " + ", ".join(steps) + f" {ANSWER_MARK} {result}"


def arithmetic_split(a: int, op: str, b: int) -> Split:
    bucket = int(hashlib.sha256(f"{a}{op}{b}".encode()).hexdigest(), 16) % 10
    return {0: "test", 1: "validation"}.get(bucket, "train")


class TextWorld:
    """Deterministic generator of the text world's splits."""

    def __init__(self, config: TextWorldConfig | None = None):
        self.config = config or TextWorldConfig()

    def split(self, name: Split, size: int | None = None) -> list[Example]:
        if name not in _SPLIT_STREAM:
            raise ValueError(f"split={name!r}: expected one of {list(_SPLIT_STREAM)}")
        cfg = self.config
        if size is None:
            size = cfg.train_size if name == "train" else cfg.eval_size
        rng = random.Random(cfg.seed * 1000 + _SPLIT_STREAM[name])
        tasks = [t for t in TASKS if cfg.mix.get(t, 0) > 0]
        weights = [cfg.mix[t] for t in tasks]
        make = {"arithmetic": self._arithmetic, "recall": self._recall, "copy": self._copy}
        return [make[task](rng, name) for task in rng.choices(tasks, weights, k=size)]

    def wrong_answer(self, example: Example, rng: random.Random) -> str:
        """A plausible wrong completion for an arithmetic example (a slip in one column)."""
        a, op, b = _parse_problem(example.prompt)
        result = a + b if op == "+" else a - b
        wrong = result + rng.choice([-10, -1, 1, 10])
        return example.completion.rpartition(ANSWER_MARK)[0] + f"{ANSWER_MARK} {wrong}"

    def _arithmetic(self, rng: random.Random, split: Split) -> Example:
        cfg = self.config
        high = 10**cfg.max_digits - 1
        while True:
            a, b, op = rng.randint(0, high), rng.randint(0, high), rng.choice(cfg.operations)
            if op == "-" and b > a:
                a, b = b, a
            if arithmetic_split(a, op, b) == split:
                return Example("arithmetic", f"{a}{op}{b}=", worked_answer(a, op, b))

    def _recall(self, rng: random.Random, split: Split) -> Example:
        letters = "abcdefghijklmnopqrstuvwxyz"
        keys = rng.sample([x + y for x in letters for y in letters], self.config.recall_pairs)
        values = [rng.randint(10, 99) for _ in keys]
        pairs = " ".join(f"{k}={v}" for k, v in zip(keys, values))
        asked = rng.randrange(len(keys))
        return Example("recall", f"kv {pairs} ; {keys[asked]}?", f" {ANSWER_MARK} {values[asked]}")

    def _copy(self, rng: random.Random, split: Split) -> Example:
        sentences = []
        for _ in range(self.config.copy_sentences):
            words = [rng.choice(_WORDS[part]) for part in ("det", "adj", "noun", "verb")]
            words += [rng.choice(_WORDS[part]) for part in ("det", "adj", "noun")]
            sentences.append(" ".join(words) + " .")
        passage = " ".join(sentences)
        return Example("copy", f"copy: {passage} ->", f" {passage}")


def _parse_problem(prompt: str) -> tuple[int, str, int]:
    body = prompt.rstrip("=")
    op = "+" if "+" in body else "-"
    a, b = body.split(op)
    return int(a), op, int(b)
