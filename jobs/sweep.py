"""Ray Tune sweeps over any kiln job.

    python -m jobs.sweep <job> --grid runner.lr=1e-3,3e-3 [--grid key=v1,v2 ...]
        [--samples N] [--metric M --mode min|max] [--asha] [--preset P] [--set k=v ...]
        [--output DIR]
    python -m jobs.sweep --config sweep.yaml   # keys: job, preset, set, grid, samples,
                                               # metric, mode, asha, output
    python -m jobs.sweep <job>                 # the job's ready-made sweep (Job.sweep)

Each trial is a full runner job (a Tune function trainable that builds its own TorchTrainer)
with its own run directory under `<sweep dir>/trials/`, so `tensorboard --logdir <sweep dir>`
shows every trial. Writes `results.csv`, `best_config.yaml` and `<metric>.png` (the swept metric
against each grid key; one plot per reported metric).

Resources: a trial itself holds no CPU (it only waits on its workers), and at most
`cluster CPUs // CPUs one trial's workers need` trials run at once, so a trial never holds a
slot its own workers are waiting for: no deadlock on a 2-CPU machine.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import os
import sys
from datetime import datetime
from pathlib import Path

import yaml

from jobs.runner import Job, connect_ray, run
from kiln.config import ConfigError, load_config


def _parse_grid(items: list[str]) -> dict[str, list]:
    grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise ConfigError(f"--grid {item!r}: expected key=v1,v2,...")
        grid[key.strip()] = [yaml.safe_load(v) for v in values.split(",")]
    return grid


def _load_job(name: str) -> Job:
    try:
        module = importlib.import_module(f"jobs.{name}")
    except ModuleNotFoundError:
        raise ConfigError(f"job={name!r}: no module jobs.{name}") from None
    if not isinstance(getattr(module, "JOB", None), Job):
        raise ConfigError(f"job={name!r}: jobs.{name} defines no JOB")
    return module.JOB


def _plot(frame, grid: dict, metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    column = metric
    fig, axes = plt.subplots(1, len(grid), figsize=(4.5 * len(grid), 3.6), squeeze=False)
    for ax, key in zip(axes[0], grid):
        means = frame.groupby(f"config/{key}")[column].agg(["mean", "min", "max"]).sort_index()
        positions = range(len(means))
        ax.errorbar(
            positions,
            means["mean"],
            yerr=[means["mean"] - means["min"], means["max"] - means["mean"]],
            marker="o",
            capsize=4,
        )
        ax.set_xticks(list(positions), [str(v) for v in means.index])
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{metric} per value (mean, min-max over the other keys and samples)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sweep(
    job_name: str,
    grid: dict[str, list],
    metric: str,
    mode: str,
    output: Path,
    preset: str | None = None,
    overrides: tuple[str, ...] = (),
    samples: int = 1,
    asha: bool = False,
    report: tuple[str, ...] = (),
):
    """Run the sweep; returns Tune's ResultGrid. `report` adds metrics to the table and plots."""
    import ray
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    job = _load_job(job_name)
    preset = preset or ("tiny" if "tiny" in job.config_cls.presets else None)
    if mode not in ("min", "max"):
        raise ConfigError(f"mode={mode!r}: expected 'min' or 'max'")
    if not grid:
        raise ConfigError("grid: expected at least one --grid key=v1,v2")

    def trial_config(params: dict):
        swept = [f"{key}={json.dumps(value)}" for key, value in params.items()]
        return load_config(job.config_cls, preset, None, [*overrides, *swept])

    # Every combination must be a valid config before any trial starts; the grid only varies
    # what the keys name, so any one of them tells the workers' resources.
    configs = [trial_config(dict(zip(grid, v))) for v in itertools.product(*grid.values())]
    runner = configs[0].runner
    output = output.resolve()
    trials_dir = output / "trials"

    def trial(params: dict) -> None:
        run_dir = trials_dir / tune.get_context().get_trial_name()
        summary = run(job, trial_config(params), run_dir, callbacks=[TuneReportCallback()])
        tune.report({k: v for k, v in summary.items() if isinstance(v, int | float)})

    # Judged metrics such as accuracy_after exist only in a trial's final report, not in the
    # per-checkpoint ones before it; Tune's strict check would reject those as missing it.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    connect_ray()
    per_trial = runner.num_workers * runner.cpus_per_worker
    concurrent = max(1, int(ray.cluster_resources().get("CPU", 1) // per_trial))
    scheduler = (
        tune.schedulers.ASHAScheduler(metric=metric, mode=mode, grace_period=1) if asha else None
    )
    tuner = tune.Tuner(
        # Tune needs a non-empty request: a little memory, and no CPU (see the docstring).
        tune.with_resources(trial, {"CPU": 0, "memory": 256 * 2**20}),
        param_space={key: tune.grid_search(values) for key, values in grid.items()},
        tune_config=tune.TuneConfig(
            num_samples=samples,
            max_concurrent_trials=concurrent,
            scheduler=scheduler,
            metric=None if asha else metric,
            mode=None if asha else mode,
        ),
        run_config=tune.RunConfig(name=output.name, storage_path=str(output.parent)),
    )
    results = tuner.fit()
    frame = results.get_dataframe()
    metrics = list(dict.fromkeys([metric, *report]))
    missing = [m for m in metrics if m not in frame]
    if missing:
        raise ConfigError(
            f"metric {missing[0]!r}: not reported by {job_name} "
            f"(reported: {', '.join(c for c in frame.columns if not c.startswith('config/'))})"
        )
    columns = [f"config/{k}" for k in grid] + metrics
    frame = frame.sort_values(metric, ascending=mode == "min")
    frame[[*columns, "trial_id"]].to_csv(output / "results.csv", index=False)
    best = results.get_best_result(metric=metric, mode=mode)
    (output / "best_config.yaml").write_text(yaml.safe_dump(best.config, sort_keys=False))
    for name in metrics:
        _plot(frame, grid, name, output / f"{name.replace('/', '_')}.png")
    print(frame[columns].to_string(index=False))
    print(f"\nbest {metric} = {best.metrics[metric]} with {best.config}")
    print(f"sweep directory: {output}  (tensorboard --logdir {output})", file=sys.stderr)
    return results


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.sweep", description=__doc__)
    parser.add_argument("job", nargs="?", help="job module under jobs/, e.g. pretrain_lm")
    parser.add_argument("--config", help="sweep YAML (command-line flags override it)")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2")
    parser.add_argument("--samples", type=int, help="repeats of the grid (default 1)")
    parser.add_argument("--metric", help="summary metric to compare (default: loss)")
    parser.add_argument("--mode", choices=["min", "max"], help="default: min")
    parser.add_argument("--asha", action="store_true", default=None, help="ASHA early stopping")
    parser.add_argument("--preset", help="job preset for every trial (default: tiny)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--output", help="sweep directory (default: runs/sweeps/<job>-<time>)")
    return parser


def resolve(args: argparse.Namespace) -> dict:
    """`sweep()`'s arguments: flags over the --config YAML over the job's ready sweep."""
    spec: dict = {}
    if args.config:
        spec = yaml.safe_load(Path(args.config).read_text()) or {}
        unknown = set(spec) - {
            "job", "preset", "set", "grid", "samples", "metric", "mode", "asha", "output"
        }  # fmt: skip
        if unknown:
            raise ConfigError(f"{args.config}: unknown keys {sorted(unknown)}")
    job_name = args.job or spec.get("job")
    if not job_name:
        raise ConfigError("job: expected a job name (positional or `job:` in --config)")
    grid = {k: list(v) for k, v in (spec.get("grid") or {}).items()}
    grid |= _parse_grid(args.grid)
    ready = _load_job(job_name).sweep
    if not grid and ready:
        grid = dict(ready.grid)
        spec = {"metric": ready.metrics[0], "mode": ready.mode, **spec}
    overrides = [f"{k}={json.dumps(v)}" for k, v in (spec.get("set") or {}).items()]
    output = args.output or spec.get("output")
    return dict(
        job_name=job_name,
        grid=grid,
        metric=args.metric or spec.get("metric", "loss"),
        mode=args.mode or spec.get("mode", "min"),
        output=Path(output or f"runs/sweeps/{job_name}-{datetime.now():%Y%m%d-%H%M%S}"),
        preset=args.preset or spec.get("preset"),
        overrides=(*overrides, *args.set),
        samples=args.samples or spec.get("samples", 1),
        asha=bool(args.asha if args.asha is not None else spec.get("asha", False)),
        report=ready.metrics if ready else (),
    )


def main(argv: list[str] | None = None):
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        sweep(**resolve(args))
    except ConfigError as error:
        parser.exit(2, f"error: {error}\n")


if __name__ == "__main__":
    main()
