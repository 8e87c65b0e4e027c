"""The text world: deterministic, correct answers, disjoint splits, a round-trip tokenizer."""

import random

from transformers import AutoTokenizer

from kiln.worlds.text import TextWorld, TextWorldConfig, arithmetic_split, extract_answer
from kiln.worlds.tokenizer import train_tokenizer


def test_splits_are_deterministic_and_seeded():
    world = TextWorld(TextWorldConfig(train_size=300))
    assert world.split("train") == TextWorld(TextWorldConfig(train_size=300)).split("train")
    other = TextWorld(TextWorldConfig(train_size=300, seed=1)).split("train")
    assert other != world.split("train")


def test_worked_answers_are_correct_and_tasks_are_mixed():
    world = TextWorld(TextWorldConfig(train_size=2000, max_digits=3))
    examples = world.split("train")
    assert {e.task for e in examples} == {"arithmetic", "recall", "copy"}
    for example in examples:
        if example.task == "arithmetic":
            assert int(example.answer) == eval(example.prompt.rstrip("="))
        elif example.task == "recall":
            pairs = dict(p.split("=") for p in example.prompt[3:].split(" ; ")[0].split())
            assert pairs[example.prompt.split(" ; ")[1].rstrip("?")] == example.answer
        else:
            assert example.prompt.removeprefix("copy: ").removesuffix(" ->") == example.answer


def test_arithmetic_splits_are_disjoint_by_content():
    world = TextWorld(TextWorldConfig(train_size=3000, eval_size=300, mix={"arithmetic": 1}))
    problems = {
        name: {e.prompt for e in world.split(name)} for name in ("train", "validation", "test")
    }
    assert not problems["train"] & problems["test"]
    assert not problems["train"] & problems["validation"]
    assert all(arithmetic_split(*_parse(p)) == "test" for p in problems["test"])


def _parse(prompt):
    op = "+" if "+" in prompt else "-"
    a, b = prompt.rstrip("=").split(op)
    return int(a), op, int(b)


def test_wrong_answer_is_plausible_and_wrong():
    world = TextWorld(TextWorldConfig(train_size=200, mix={"arithmetic": 1}))
    rng = random.Random(0)
    for example in world.split("train"):
        wrong = world.wrong_answer(example, rng)
        assert extract_answer(wrong) != example.answer
        assert wrong.rpartition("####")[0] == example.completion.rpartition("####")[0]


def test_tokenizer_round_trips_splits_digits_and_loads_with_auto(tmp_path):
    examples = TextWorld(TextWorldConfig(train_size=500)).split("train")
    tokenizer = train_tokenizer((e.text for e in examples), vocab_size=300)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for example in examples[:50]:
        ids = loaded(example.text).input_ids
        assert ids[0] == loaded.bos_token_id
        assert loaded.decode(ids, skip_special_tokens=True) == example.text
    pieces = loaded.convert_ids_to_tokens(loaded("1234+98=", add_special_tokens=False).input_ids)
    assert [p for p in pieces if p.strip("Ġ").isdigit()] == list("123498")
