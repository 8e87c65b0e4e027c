"""A 2-trial Ray Tune sweep through the real entrypoint: table, best config, plot, TensorBoard."""

import csv
import os
import subprocess
import sys

import yaml

from conftest import REPO, SMALL


def test_two_trial_sweep_writes_table_plot_and_tensorboard(ray_cluster, tmp_path):
    spec = tmp_path / "sweep.yaml"
    spec.write_text(yaml.safe_dump({
        "job": "pretrain_lm",
        "set": dict(item.split("=") for item in SMALL if "steps" not in item),
        "metric": "loss",
        "mode": "min",
    }))  # fmt: skip
    out = tmp_path / "sweep"
    # One worker per trial, so the two trials run at once on the 2-CPU test cluster (88 s -> 64 s).
    done = subprocess.run(
        [sys.executable, "-m", "jobs.sweep", "--config", str(spec),
         "--grid", "runner.lr=0.0003,0.003", "--set", "runner.max_steps=6",
         "--set", "runner.num_workers=1", "--output", str(out)],
        capture_output=True, text=True, cwd=REPO, env=os.environ, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    with (out / "results.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert sorted(float(r["config/runner.lr"]) for r in rows) == [0.0003, 0.003]
    assert all(float(r["loss"]) > 0 for r in rows)
    best = yaml.safe_load((out / "best_config.yaml").read_text())
    assert best["runner.lr"] == float(rows[0]["config/runner.lr"])  # sorted best first
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    trials = sorted((out / "trials").iterdir())
    assert len(trials) == 2
    for trial in trials:
        assert list((trial / "tensorboard").glob("events.out.tfevents.*"))
        assert [r for r in (trial / "metrics.jsonl").read_text().splitlines()]


def test_sweep_rejects_bad_grid_before_running(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "jobs.sweep", "pretrain_lm", "--grid", "runner.zero_stage=2,9",
         "--output", str(tmp_path / "never")],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 2 and "runner.zero_stage=9" in done.stderr
    assert not (tmp_path / "never").exists()


def test_a_job_without_grid_gets_its_ready_sweep():
    from jobs.dpo import JOB
    from jobs.sweep import _parser, resolve

    plan = resolve(_parser().parse_args(["dpo"]))
    assert plan["grid"] == JOB.sweep.grid and len(plan["grid"]) == 2
    assert (plan["metric"], plan["mode"]) == ("accuracy_after", "max")
    assert plan["report"] == ("accuracy_after", "chosen_logp_drop")
    # An explicit grid replaces the ready one; the job's metrics are still reported.
    plan = resolve(_parser().parse_args(["dpo", "--grid", "beta=0.1,0.2", "--metric", "loss"]))
    assert plan["grid"] == {"beta": [0.1, 0.2]} and plan["metric"] == "loss"
