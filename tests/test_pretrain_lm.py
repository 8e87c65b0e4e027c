"""`pretrain_lm --preset tiny`: 2 Ray Train workers, ZeRO-2 on CPU, an exported model that plain
transformers loads and that answers held-out arithmetic at the accuracy the preset promises."""

import json
import subprocess
import sys
import time

from jobs.pretrain_lm import JOB
from jobs.runner import cached_run
from kiln.config import load_config
from kiln.worlds.text import TextWorld

# Plain transformers, no kiln on the path: greedy answers to held-out problems.
_PLAIN_EVAL = """
import json, sys
sys.path = [p for p in sys.path if p not in ("", ".")]
from transformers import AutoModelForCausalLM, AutoTokenizer
assert "kiln" not in sys.modules
model_dir, problems = sys.argv[1], json.loads(sys.argv[2])
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
tokenizer.padding_side = "left"
batch = tokenizer([p for p, _ in problems], return_tensors="pt", padding=True)
out = model.generate(**batch, max_new_tokens=40, do_sample=False,
                     pad_token_id=tokenizer.pad_token_id)
texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
hits = [t.rpartition("####")[2].strip() == answer for t, (_, answer) in zip(texts, problems)]
print(json.dumps({"accuracy": sum(hits) / len(hits)}))
"""


def test_tiny_preset_trains_with_two_workers_and_meets_its_promise(tiny_lm, tmp_path):
    config = load_config(JOB.config_cls, "tiny")
    assert config.runner.num_workers == 2 and config.runner.zero_stage == 2
    summary = json.loads((tiny_lm / "summary.json").read_text())
    assert summary["test/accuracy/arithmetic"] >= config.min_test_accuracy >= 0.9
    assert summary["meets_promise"] is True

    for artifact in ("config.yaml", "metrics.jsonl", "summary.json", "model/config.json",
                     "model/model.safetensors", "model/tokenizer.json"):  # fmt: skip
        assert (tiny_lm / artifact).is_file(), artifact
    assert list((tiny_lm / "tensorboard").glob("events.out.tfevents.*"))
    assert list((tiny_lm / "checkpoints").glob("step_*/kiln_state.json"))
    rows = [json.loads(line) for line in (tiny_lm / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == config.runner.max_steps
    assert rows[-1]["loss"] < rows[0]["loss"] - 2  # it learned, not just ran

    test = [e for e in TextWorld(config.world).split("test") if e.task == "arithmetic"][:60]
    done = subprocess.run(
        [sys.executable, "-c", _PLAIN_EVAL, str(tiny_lm / "model"),
         json.dumps([(e.prompt, e.answer) for e in test])],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["accuracy"] >= config.min_test_accuracy


def test_base_model_is_cached_by_config_hash(tiny_lm):
    started = time.monotonic()
    again = cached_run(JOB, load_config(JOB.config_cls, "tiny"))
    assert again == tiny_lm and time.monotonic() - started < 10
    other = load_config(JOB.config_cls, "tiny", None, ["runner.seed=1"])
    assert other.fingerprint() != load_config(JOB.config_cls, "tiny").fingerprint()


def test_meets_promise_needs_every_promised_task(tiny_lm, monkeypatch):
    import jobs.pretrain_lm

    scores = {"accuracy/arithmetic": 0.95, "accuracy/copy": 0.5, "accuracy": 0.7}
    monkeypatch.setattr(jobs.pretrain_lm.lm, "task_accuracy", lambda *args: scores)
    for arithmetic, copy, kept in [(0.9, 0.0, True), (0.9, 0.5, True), (0.9, 0.6, False),
                                   (0.96, 0.0, False)]:  # fmt: skip
        overrides = [f"min_test_accuracy={arithmetic}", f"min_copy_accuracy={copy}"]
        config = load_config(JOB.config_cls, "tiny", overrides=overrides)
        assert jobs.pretrain_lm.evaluate(config, tiny_lm)["meets_promise"] is kept, overrides
