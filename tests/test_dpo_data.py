"""Preference data for jobs.dpo: world pairs, tokenisation masks, and bad input named by record."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from kiln import lm
from kiln.config import ConfigError
from kiln.dpo.data import PreferencePair, offline_pairs, read_preference_file, tokenize_pairs
from kiln.worlds.text import TextWorld, TextWorldConfig, extract_answer
from kiln.worlds.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def world():
    return TextWorld(TextWorldConfig(mix={"arithmetic": 1.0}, train_size=200))


@pytest.fixture(scope="module")
def tokenizer(world):
    return train_tokenizer((e.text for e in world.split("train")), vocab_size=300)


def _write(path, records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


GOOD = {"prompt": "2+2=", "chosen": " 2+2=4 #### 4", "rejected": " 2+2=4 #### 5"}


def test_offline_pairs_prefer_the_correct_answer(world):
    examples = world.split("train")[:50]
    pairs = offline_pairs(world, examples, seed=0)
    for example, pair in zip(examples, pairs):
        assert pair.chosen == example.completion
        assert extract_answer(pair.rejected) != example.answer
        # Plausible: the same working, only the final answer slips.
        assert pair.rejected.rpartition("####")[0] == pair.chosen.rpartition("####")[0]


def test_response_mask_covers_exactly_the_response_and_eos(tokenizer):
    pairs = [PreferencePair("12+30=", " 2+0=2, 1+3=4 #### 42", " 2+0=2 #### 40", "t")]
    tensors, truncated = tokenize_pairs(pairs, tokenizer, max_length=64)
    assert truncated == 0
    for side in ("chosen", "rejected"):
        ids = tensors[f"{side}_ids"][0]
        response = tensors[f"{side}_response"][0].bool()
        attention = tensors[f"{side}_attention"][0].bool()
        text = tokenizer.decode(ids[response], skip_special_tokens=False)
        assert text == getattr(pairs[0], side) + tokenizer.eos_token
        prompt_ids = ids[attention & ~response]
        assert tokenizer.decode(prompt_ids) == tokenizer.bos_token + "12+30="
        assert not response[~attention].any()  # padding is never response


def test_long_responses_are_cut_and_counted_and_long_prompts_rejected(tokenizer):
    long = PreferencePair("1+1=", " " + "1+1=2, " * 20 + "#### 2", " #### 3", "file.jsonl:7")
    tensors, truncated = tokenize_pairs([long], tokenizer, max_length=24)
    assert truncated == 1 and tensors["chosen_ids"].shape[1] == 24
    with pytest.raises(ConfigError, match=r"file\.jsonl:7: prompt is \d+ tokens.*max_length=4"):
        tokenize_pairs([long], tokenizer, max_length=4)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"prompt": "2+2=", "chosen": " #### 4"}, "missing field 'rejected'"),
        ({**GOOD, "chosen": "   "}, "field 'chosen' is empty"),
        ({**GOOD, "rejected": 5}, "field 'rejected' must be a string"),
        ({**GOOD, "rejected": GOOD["chosen"]}, "chosen and rejected are identical"),
        ('{"prompt": "2+2=", ', "not valid JSON"),
    ],
)
def test_bad_preference_records_are_named_by_line(tmp_path, record, message):
    path = _write(tmp_path / "prefs.jsonl", [GOOD, GOOD, record])
    with pytest.raises(ConfigError) as error:
        read_preference_file(path)
    assert f"{path}:3" in str(error.value) and message in str(error.value)


def test_good_file_reads_every_record(tmp_path):
    pairs = read_preference_file(_write(tmp_path / "prefs.jsonl", [GOOD, GOOD]))
    assert [p.chosen for p in pairs] == [GOOD["chosen"]] * 2
    assert pairs[1].source.endswith("prefs.jsonl:2")


def test_job_exits_with_the_record_named_before_any_worker_starts(tmp_path, tokenizer):
    """The real entrypoint: a bad record is a clean exit 2, not a traceback from a worker."""
    base = tmp_path / "base"
    arch = lm.ModelConfig(
        hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=2, intermediate_size=32
    )
    torch.manual_seed(0)
    lm.build_model(arch, tokenizer).save_pretrained(base)
    tokenizer.save_pretrained(base)
    bad = _write(tmp_path / "prefs.jsonl", [GOOD, {"prompt": "1+1=", "chosen": " #### 2"}])
    done = subprocess.run(
        [sys.executable, "-m", "jobs.dpo", "--set", f"base_model={base}",
         "--set", f"preference_file={bad}", "--output", str(tmp_path / "run")],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"{bad}:2: missing field 'rejected'" in done.stderr
    assert "Traceback" not in done.stderr
