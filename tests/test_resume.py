"""A worker SIGKILLed mid-run: Ray Train restarts the group from the latest checkpoint, the step
counter neither repeats nor skips, and the data order (hence every loss) matches a run that
was never interrupted."""

import json
from pathlib import Path

import pytest

from conftest import REPO, SMALL
from jobs.pretrain_lm import JOB
from jobs.runner import KILL_AT_STEP_ENV, run
from kiln.config import load_config
from kiln.tracking import read_metrics


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    run(JOB, load_config(JOB.config_cls, "tiny", None, SMALL), run_dir)
    return run_dir


def test_killed_worker_resumes_with_contiguous_steps(uninterrupted, tmp_path, monkeypatch):
    monkeypatch.setenv(KILL_AT_STEP_ENV, "10")
    summary = run(JOB, load_config(JOB.config_cls, "tiny", None, SMALL), tmp_path)

    assert (tmp_path / ".kill_injected").exists()  # the worker really died
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert events == [{"event": "resume", "step": 8}]  # from the latest checkpoint, not scratch
    steps = [row["step"] for row in read_metrics(tmp_path)]
    assert steps == list(range(1, 13))
    assert summary["steps"] == 12 and (tmp_path / "model" / "model.safetensors").is_file()

    reference = {row["step"]: row["loss"] for row in read_metrics(uninterrupted)}
    for row in read_metrics(tmp_path):
        assert row["loss"] == pytest.approx(reference[row["step"]], rel=1e-5, abs=1e-6), row


def test_resume_from_another_runs_checkpoint_continues_its_trajectory(
    uninterrupted, tmp_path, monkeypatch
):
    # Relative to the launching directory, as a user types it: the workers run elsewhere.
    monkeypatch.chdir(uninterrupted)
    checkpoint = Path("checkpoints") / "step_000008"
    config = load_config(JOB.config_cls, "tiny", None, [*SMALL, f"runner.resume_from={checkpoint}"])
    monkeypatch.chdir(REPO)
    run(JOB, config, tmp_path)
    # Ignoring resume_from would log steps 1-12; restoring weights without the optimizer state
    # would change the losses below.
    assert [row["step"] for row in read_metrics(tmp_path)] == [9, 10, 11, 12]
    reference = {row["step"]: row["loss"] for row in read_metrics(uninterrupted)}
    for row in read_metrics(tmp_path):
        assert row["loss"] == pytest.approx(reference[row["step"]], rel=1e-5, abs=1e-6), row


def test_finished_run_is_not_trained_again(uninterrupted):
    before = (uninterrupted / "metrics.jsonl").read_text()
    summary = run(JOB, load_config(JOB.config_cls, "tiny", None, SMALL), uninterrupted)
    assert summary == json.loads((uninterrupted / "summary.json").read_text())
    assert (uninterrupted / "metrics.jsonl").read_text() == before


def test_same_output_with_another_config_is_refused(uninterrupted):
    from kiln.config import ConfigError

    changed = load_config(JOB.config_cls, "tiny", None, [*SMALL, "runner.lr=0.1"])
    with pytest.raises(ConfigError, match=r"holds a run with a different config\.yaml"):
        run(JOB, changed, uninterrupted)
