"""The shared Ray Train + DeepSpeed runner behind every kiln training job.

A job declares *what* to train (`Job`: config class, model, dataset, step function, export and
evaluation); the runner owns *how*: connecting to Ray, a `TorchTrainer` with one DeepSpeed
engine per worker (ZeRO 0-3, precision, accumulation and clipping from `RunnerConfig`), the
deterministic sharded data order, metrics, checkpoints, resume and the exported model.

Data order: the global sample sequence is a concatenation of per-epoch permutations seeded by
`runner.seed`; optimizer step s reads the next `global_batch_size` samples of it, split by
micro-step and rank. The order is a pure function of (seed, step), so a resumed run reads
exactly the samples an uninterrupted run would have.

Checkpoints: every `checkpoint_every` steps and at the end, each rank writes its DeepSpeed
shards to a local folder and reports it with `ray.train.report`; Ray merges them into
`<run dir>/checkpoints/step_NNNNNN`, and each rank then marks its part complete. When a worker
dies, Ray Train (FailureConfig) restarts the group and every worker resumes from the newest
complete checkpoint (`latest_checkpoint`); re-running a crashed job with the same `--output`
does the same.

Run directory: config.yaml, metrics.jsonl, summary.json, tensorboard/, checkpoints/, model/.
Run directories must be on storage every node sees (true on one machine; NFS on a cluster).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch

from kiln.config import ConfigError, JobConfig, RunnerConfig, describe_fields, load_config
from kiln.tracking import RunLogger

C = TypeVar("C", bound=JobConfig)
# Fault injection for the resume test: rank world_size-1 SIGKILLs itself at this step, once.
KILL_AT_STEP_ENV = "KILN_KILL_WORKER_AT_STEP"
STATE_FILE = "kiln_state.json"
CACHE_ENV = "KILN_CACHE"
DEEPSPEED_TAG = "deepspeed"


@dataclass(frozen=True)
class Job(Generic[C]):
    """What a training job is made of; the runner calls these hooks.

    prepare(config, run_dir): on the driver before any worker starts; writes what workers
        share (tokenizer, packed data) under run_dir. Must be deterministic and idempotent.
    build_model(config, run_dir) -> nn.Module: on every worker, same seed on every rank.
    build_dataset(config, run_dir) -> indexable of dict[str, Tensor]: the whole dataset;
        the runner picks each rank's samples.
    step(model, batch, config) -> (loss, metrics): one micro-batch forward. A `tokens` entry
        in metrics is summed across ranks into tokens/s; other entries are averaged.
    export(model, config, run_dir, out_dir): on rank 0 after training; writes a
        `save_pretrained` folder that loads without kiln.
    evaluate(config, run_dir) -> metrics: on the driver after export; goes into summary.json.
    diagnose(model, config, run_dir) -> metrics (optional): no-grad measurements of the model
        on every rank after each logged optimizer step (e.g. log-probs of a fixed probe set);
        averaged across ranks and logged with the step's metrics.
    sweep (optional): the job's ready-made Tune sweep, used by `python -m jobs.sweep <job>`
        when no --grid is given.
    """

    name: str
    config_cls: type[C]
    prepare: Callable[[C, Path], None]
    build_model: Callable[[C, Path], torch.nn.Module]
    build_dataset: Callable[[C, Path], Any]
    step: Callable[[Any, dict[str, torch.Tensor], C], tuple[torch.Tensor, dict[str, float]]]
    export: Callable[[torch.nn.Module, C, Path, Path], None]
    evaluate: Callable[[C, Path], dict[str, float]]
    diagnose: Callable[[Any, C, Path], dict[str, float]] | None = None
    sweep: SweepSpec | None = None


@dataclass(frozen=True)
class SweepSpec:
    """A job's default sweep: the grid, and the summary metrics to report (first = objective)."""

    grid: dict[str, list]
    metrics: tuple[str, ...]
    mode: str = "max"


def deepspeed_config(runner: RunnerConfig) -> dict:
    zero: dict[str, Any] = {"stage": runner.zero_stage}
    if not runner.use_gpu:
        # gloo has no reduce_scatter; ZeRO then reduces gradients with all-reduce.
        zero["reduce_scatter"] = False
    if runner.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if runner.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": runner.micro_batch_size,
        "gradient_accumulation_steps": runner.grad_accum_steps,
        "gradient_clipping": runner.grad_clip,
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": runner.lr,
                "betas": [0.9, 0.95],
                "eps": 1e-8,
                "weight_decay": runner.weight_decay,
                # torch's AdamW: no fused-op compile on CPU workers.
                "torch_adam": True,
            },
        },
        "bf16": {"enabled": runner.precision == "bf16"},
        "fp16": {"enabled": runner.precision == "fp16"},
        "steps_per_print": 10**9,
    }


def lr_multiplier(step: int, runner: RunnerConfig) -> float:
    """Linear warm-up to the peak, then cosine decay to 10% of it at max_steps."""
    if step < runner.warmup_steps:
        return (step + 1) / runner.warmup_steps
    progress = (step - runner.warmup_steps) / max(1, runner.max_steps - runner.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class DataOrder:
    """Deterministic global sample order, sharded by (step, micro-step, rank)."""

    def __init__(self, size: int, runner: RunnerConfig, world_size: int):
        self.size, self.runner, self.world_size = size, runner, world_size
        self._permutations: dict[int, torch.Tensor] = {}

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._permutations:
            generator = torch.Generator().manual_seed(self.runner.seed * 100_003 + epoch)
            self._permutations = {epoch: torch.randperm(self.size, generator=generator)}
        return self._permutations[epoch]

    def indices(self, step: int, micro_step: int, rank: int) -> list[int]:
        """Sample indices for 1-based optimizer `step`."""
        micro = self.runner.micro_batch_size
        first = ((step - 1) * self.runner.grad_accum_steps + micro_step) * self.world_size * micro
        first += rank * micro
        return [
            int(self._permutation(i // self.size)[i % self.size])
            for i in range(first, first + micro)
        ]


class TensorDataset(torch.utils.data.Dataset):
    """Equal-length tensors by name; item i is {name: tensor[i]} (what `collate` stacks)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: value[index] for key, value in self.tensors.items()}


def collate(dataset, indices: list[int], device: torch.device) -> dict[str, torch.Tensor]:
    items = [dataset[i] for i in indices]
    return {key: torch.stack([item[key] for item in items]).to(device) for key in items[0]}


def _mean_across_ranks(
    values: dict[str, float], world_size: int, device: torch.device
) -> dict[str, float]:
    import torch.distributed as dist

    keys = sorted(values)
    # On the worker's device: NCCL reduces only CUDA tensors.
    packed = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    if world_size > 1:
        dist.all_reduce(packed)
    return {k: v / (1 if k == "tokens" else world_size) for k, v in zip(keys, packed.tolist())}


def _train_worker(payload: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train

    job: Job = payload["job"]
    config = job.config_cls.model_validate(payload["config"])
    runner, run_dir = config.runner, Path(payload["run_dir"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if runner.use_gpu else "cpu")
    import deepspeed

    # DeepSpeed JIT-compiles a shared-memory all-reduce op when each CPU worker starts (a
    # minute of a 2-core machine, repeated whenever the cached build's flags differ). Only its
    # inference all-reduce uses the op, never training, so the runner skips building it.
    # (`deepspeed.comm.torch` is the torch package re-exported, hence import_module.)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None

    device = torch.device(f"cuda:{context.get_local_rank()}" if runner.use_gpu else "cpu")
    if runner.use_gpu:
        torch.cuda.set_device(device)
    torch.manual_seed(runner.seed)
    model = job.build_model(config, run_dir)
    dataset = job.build_dataset(config, run_dir)
    # DeepSpeed broadcasts parameters viewed as bytes, which fails for 0-dim ones (CLIP's
    # logit_scale): they train as shape [1] and get their own shape back for the export.
    scalars = [p for p in model.parameters() if p.dim() == 0]
    for p in scalars:
        p.data = p.data.reshape(1)
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=deepspeed_config(runner),
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_multiplier(step, runner)
        ),
    )

    start_step = 0
    checkpoint = latest_checkpoint(run_dir) or runner.resume_from
    if checkpoint is not None:
        engine.load_checkpoint(str(checkpoint), tag=DEEPSPEED_TAG)
        start_step = json.loads((checkpoint / STATE_FILE).read_text())["step"]

    logger = RunLogger(run_dir, job.name, runner.max_steps, start_step) if rank == 0 else None
    if logger and start_step:
        sys.stdout.write(f"[{job.name}] resumed from the checkpoint of step {start_step}\n")
        with (run_dir / "events.jsonl").open("a") as events:
            events.write(json.dumps({"event": "resume", "step": start_step}) + "\n")
    order = DataOrder(len(dataset), runner, world_size)
    kill_at = payload.get("kill_at_step")
    window_start, window_first_step = time.perf_counter(), start_step + 1
    sums: dict[str, float] = {}
    reduced: dict[str, float] = {}
    for step in range(start_step + 1, runner.max_steps + 1):
        if kill_at == step and rank == world_size - 1:
            marker = run_dir / ".kill_injected"
            if not marker.exists():
                marker.touch()
                os.kill(os.getpid(), signal.SIGKILL)
        for micro_step in range(runner.grad_accum_steps):
            batch = collate(dataset, order.indices(step, micro_step, rank), device)
            loss, metrics = job.step(engine, batch, config)
            engine.backward(loss)
            engine.step()
            for key, value in {"loss": loss.item(), **metrics}.items():
                sums[key] = sums.get(key, 0.0) + float(value)
        last = step == runner.max_steps
        if step % runner.log_every == 0 or last:
            micro_steps = runner.grad_accum_steps * (step - window_first_step + 1)
            means = {k: v / (1 if k == "tokens" else micro_steps) for k, v in sums.items()}
            # The window's wall time is taken before diagnostics, which are not training work.
            now = time.perf_counter()
            means["step_time_s"] = (now - window_start) / (step - window_first_step + 1)
            if job.diagnose is not None:
                with torch.no_grad():
                    means |= job.diagnose(engine, config, run_dir)
            reduced = _mean_across_ranks(means, world_size, device)
            reduced["tokens_per_s"] = reduced.pop("tokens", 0.0) / (now - window_start)
            reduced["lr"] = engine.get_lr()[0]
            if logger:
                logger.log(step, reduced)
            window_start, window_first_step, sums = time.perf_counter(), step + 1, {}
        if (runner.checkpoint_every and step % runner.checkpoint_every == 0) or last:
            _save_and_report(engine, step, rank, world_size, run_dir, {"step": step, **reduced})
    if logger:
        logger.close()
    for p in scalars:
        p.data = p.data.reshape(())
    _export(job, engine, config, run_dir, rank)


def _save_and_report(
    engine, step: int, rank: int, world_size: int, run_dir: Path, metrics: dict
) -> None:
    import ray.train

    name = f"step_{step:06d}"
    with tempfile.TemporaryDirectory() as folder:
        engine.save_checkpoint(folder, tag=DEEPSPEED_TAG)
        if rank == 0:
            state = {"step": step, "world_size": world_size}
            (Path(folder) / STATE_FILE).write_text(json.dumps(state))
        # SYNC upload: when report returns, this rank's files are in the run directory.
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(folder),
            checkpoint_dir_name=name,
        )
    (run_dir / "checkpoints" / name / f"rank_{rank}.complete").touch()


def assets_dir(run_dir: Path) -> Path:
    """Where a job's `prepare` writes what its workers share (tokenizer, data, teacher)."""
    return run_dir / "assets"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint of run_dir that every rank finished writing.

    Not `ray.train.get_checkpoint()`: Ray registers a checkpoint only when its controller polls
    the report, so a worker killed just after reporting would send the run back one checkpoint
    (and repeat those steps) although the files were complete. The per-rank markers, written
    after each rank's upload returned, say the same thing without the race.
    """
    complete = []
    for folder in (run_dir / "checkpoints").glob("step_*"):
        state_file = folder / STATE_FILE
        if state_file.is_file():
            state = json.loads(state_file.read_text())
            ranks = range(state["world_size"])
            if all((folder / f"rank_{rank}.complete").is_file() for rank in ranks):
                complete.append((state["step"], folder))
    return max(complete)[1] if complete else None


def _export(job: Job, engine, config: JobConfig, run_dir: Path, rank: int) -> None:
    import deepspeed

    module = engine.module
    # ZeRO-3 holds a shard of each parameter per rank; gather full ones for the export.
    gathered = (
        deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
        if config.runner.zero_stage == 3
        else contextlib.nullcontext()
    )
    with gathered:
        if rank == 0:
            # A run killed after its export but before summary.json re-exports on the re-run.
            staging, final = run_dir / "model.partial", run_dir / "model"
            shutil.rmtree(staging, ignore_errors=True)
            job.export(module, config, run_dir, staging)
            shutil.rmtree(final, ignore_errors=True)
            staging.replace(final)


def connect_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (or the one this process runs in), else start one."""
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)


def check_config(config: JobConfig, run_dir: Path) -> None:
    """Write run_dir/config.yaml, refusing to resume a run that was started with another one."""
    config_file, resolved = run_dir / "config.yaml", config.to_yaml()
    if config_file.exists() and config_file.read_text() != resolved:
        raise ConfigError(
            f"--output {str(run_dir)!r} holds a run with a different config.yaml; "
            "resume it with --config that file, or choose a new --output"
        )
    config_file.write_text(resolved)


def run(job: Job[C], config: C, run_dir: str | Path, callbacks: list | None = None) -> dict:
    """Train `job` with `config` into `run_dir`; returns the summary (also in summary.json).

    Re-running with the same run_dir resumes from its latest checkpoint.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    runner = config.runner
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    check_config(config, run_dir)
    summary_file = run_dir / "summary.json"
    if summary_file.is_file():
        print(f"[{job.name}] {run_dir} is already complete; not training again", file=sys.stderr)
        return json.loads(summary_file.read_text())
    job.prepare(config, run_dir)
    connect_ray()
    resources = {"CPU": runner.cpus_per_worker} | ({"GPU": 1} if runner.use_gpu else {})
    # Read by Ray Train's controller (it propagates RAY_TRAIN_* variables to it).
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(runner.worker_start_timeout_s)
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={
            "job": job,
            "config": config.model_dump(mode="json"),
            "run_dir": str(run_dir),
            "kill_at_step": int(os.environ[KILL_AT_STEP_ENV])
            if os.environ.get(KILL_AT_STEP_ENV)
            else None,
        },
        scaling_config=ScalingConfig(
            num_workers=runner.num_workers,
            use_gpu=runner.use_gpu,
            resources_per_worker=resources,
        ),
        run_config=RunConfig(
            name="checkpoints",
            storage_path=str(run_dir),
            failure_config=FailureConfig(max_failures=runner.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=runner.keep_checkpoints),
            callbacks=callbacks,
        ),
    )
    started = time.perf_counter()
    result = trainer.fit()
    trained = time.perf_counter()
    evaluation = job.evaluate(config, run_dir)
    summary = {
        **{k: v for k, v in (result.metrics or {}).items() if k != "step"},
        "steps": runner.max_steps,
        "train_wall_s": round(trained - started, 2),
        "eval_s": round(time.perf_counter() - trained, 2),
        **evaluation,
    }
    staging = run_dir / "summary.json.partial"
    staging.write_text(json.dumps(summary, indent=2) + "\n")
    staging.replace(summary_file)  # summary.json appears only once the run is complete
    return summary


def cached_run(job: Job[C], config: C) -> Path:
    """The run directory of `job` trained with `config`, training it only the first time."""
    return cached(job.name, config, lambda run_dir: run(job, config, run_dir))


def cached(name: str, config: JobConfig, train: Callable[[Path], Any]) -> Path:
    """`train(run_dir)` once per config: base models later jobs start from are cached by config
    fingerprint under $KILN_CACHE (default ~/.cache/kiln); an interrupted run resumes where it
    stopped."""
    root = Path(os.environ.get(CACHE_ENV, "~/.cache/kiln")).expanduser()
    run_dir = root / name / config.fingerprint()
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir.parent / f"{run_dir.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two processes asking for one base train it once
        train(run_dir)
    return run_dir


def main(job: Job, argv: list[str] | None = None) -> dict:
    """The command line every runner job shares: --preset, --config, --set, --output."""
    if job.step.__module__ == "__main__":
        # Under `python -m jobs.<name>` the hooks live in __main__, which workers cannot import;
        # the module's own JOB pickles by reference like any library code.
        job = importlib.import_module(f"jobs.{job.name}").JOB
    summary, run_dir = cli(
        job.name, job.config_cls, lambda config, out: run(job, config, out), argv
    )
    print(
        f"  model:       {run_dir / 'model'}  (a save_pretrained folder)\n"
        f"  metrics:     {run_dir / 'metrics.jsonl'}, {run_dir / 'summary.json'}\n"
        f"  checkpoints: {run_dir / 'checkpoints'}\n"
        f"  tensorboard: tensorboard --logdir {run_dir / 'tensorboard'}",
        file=sys.stderr,
    )
    return summary


def cli(
    name: str,
    config_cls: type[C],
    train: Callable[[C, Path], dict],
    argv: list[str] | None = None,
) -> tuple[dict, Path]:
    """Parse --preset/--config/--set/--output for `python -m jobs.<name>` and call `train`."""
    presets = sorted(config_cls.presets)
    parser = argparse.ArgumentParser(
        prog=f"python -m jobs.{name}",
        description=config_cls.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config fields (set with --set key=value or in --config YAML):\n"
        + "\n".join(describe_fields(config_cls)),
    )
    parser.add_argument(
        "--preset",
        default="tiny" if "tiny" in presets else None,
        help=f"named preset ({', '.join(presets) or 'none'}); default: %(default)s",
    )
    parser.add_argument("--config", help="YAML file of overrides (e.g. a run's config.yaml)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one field, e.g. --set runner.num_workers=2 (repeatable)",
    )
    parser.add_argument(
        "--output", help="run directory (default: runs/<job>/<timestamp>); reuse one to resume"
    )
    args = parser.parse_args(argv)
    try:
        config = load_config(config_cls, args.preset, args.config, args.set)
    except ConfigError as error:
        parser.exit(2, f"error: {error}\n")
    run_dir = Path(args.output or f"runs/{name}/{datetime.now():%Y%m%d-%H%M%S}")
    try:
        summary = train(config, run_dir)
    except ConfigError as error:  # bad input found while preparing data, before any worker
        parser.exit(2, f"error: {error}\n")
    print(json.dumps(summary, indent=2))
    print(f"\nrun directory: {run_dir.resolve()}", file=sys.stderr)
    return summary, run_dir
