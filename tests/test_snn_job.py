"""`python -m jobs.spikezip` end to end through Ray, shortened to a few steps: the QANN stage
(2 workers, ZeRO-2), export, SNN conversion and evaluation; artifacts, summary fields, exact
SNN/QANN agreement, moved weights.

It calls the command line's `main(JOB, argv)` in this process (what `python -m jobs.spikezip`
runs) on the session's Ray cluster. The teacher stage's cache entry is made beforehand with
that stage's own hooks in a plain loop: a second Ray Train run would add its fixed start-up
cost (30-70 s on a 2-core machine) to CI for the same runner code path.
"""

import json

import pytest
import torch

from jobs.runner import collate, main
from jobs.spikezip import (
    FP_JOB,
    JOB,
    build_model,
    build_teacher,
    evaluate_teacher,
    export,
    teacher_config,
    teacher_dataset,
    teacher_step,
)
from kiln import snn
from kiln.config import load_config

FEW_STEPS = ["runner.max_steps=4", "runner.log_every=2", "levels=8", "data.test_size=50"]


def _cache_teacher(config, kiln_cache) -> tuple[torch.nn.Module, float]:
    """What cached_run(FP_JOB, ...) leaves in the cache, from a few plain training steps."""
    teacher = teacher_config(config)
    run_dir = kiln_cache / FP_JOB.name / teacher.fingerprint()
    torch.manual_seed(0)
    model = build_teacher(teacher, run_dir)
    dataset = teacher_dataset(teacher, run_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(60):
        first = step * 64 % (len(dataset) - 64)
        batch = collate(dataset, list(range(first, first + 64)), torch.device("cpu"))
        loss, _ = teacher_step(model, batch, teacher)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    export(model, teacher, run_dir, run_dir / "model")
    (run_dir / "config.yaml").write_text(teacher.to_yaml())
    accuracy = evaluate_teacher(teacher, run_dir)["accuracy"]
    (run_dir / "summary.json").write_text(json.dumps({"accuracy": accuracy}))
    return model, accuracy


def test_entrypoint_trains_the_qann_and_the_snn_agrees_exactly(ray_cluster, kiln_cache, tmp_path):
    config = load_config(JOB.config_cls, "tiny", None, FEW_STEPS)
    teacher, teacher_accuracy = _cache_teacher(config, kiln_cache)
    assert teacher_accuracy > 0.4  # 60 plain steps learn digits well above chance (0.1)

    out = tmp_path / "run"
    sets = [arg for item in FEW_STEPS for arg in ("--set", item)]
    returned = main(JOB, ["--preset", "tiny", *sets, "--output", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    assert summary == returned
    assert summary["agreement_snn_qann"] == 1.0
    assert summary["max_abs_diff_snn_qann"] <= 1e-5
    assert summary["accuracy_snn"] == summary["accuracy_qann"]
    assert summary["accuracy_fp"] == teacher_accuracy
    assert 0 <= summary["accuracy_qann"] <= 1
    assert summary["snn_converged"] is True and summary["levels"] == 8
    assert 0 < summary["steps_to_silence_mean"] <= summary["steps_to_silence"]
    assert summary["steps_to_silence"] < config.max_snn_steps
    assert summary["spikes_per_image"] > 0 and summary["spikes_per_image/quant_patch"] > 0

    for artifact in ("config.yaml", "metrics.jsonl", "model/config.json",
                     "model/model.safetensors", "assets/teacher/model.safetensors",
                     "assets/teacher_logits.pt"):  # fmt: skip
        assert (out / artifact).is_file(), artifact
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert list((out / "checkpoints").glob("step_*/kiln_state.json"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [2, 4]

    qann = snn.load_pretrained(out / "model", levels=8)
    initial = build_model(config, out).state_dict()  # what every worker started from
    assert torch.equal(initial["head.weight"], teacher.state_dict()["head.weight"])
    trained = qann.state_dict()
    moved = [name for name, value in initial.items() if not torch.equal(value, trained[name])]
    assert len(moved) == len(initial) == len(dict(qann.named_parameters()))
    with pytest.raises(ValueError, match="levels=8 but levels=16 was asked for"):
        snn.load_pretrained(out / "model", levels=16)
