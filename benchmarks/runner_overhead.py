"""Platform overhead: pretrain_lm through the runner (Ray Train + DeepSpeed, one worker) against a
plain single-process PyTorch loop on the same model, data, batch, optimizer and machine.

    python benchmarks/runner_overhead.py [--steps 300] [--preset tiny] [--zero-stage 2]

Both sides use every CPU of the machine (the worker reserves them all; the plain loop sets
torch's thread count to match). Steady-state tokens/s skips the first `--warmup` steps
(start-up, allocator warm-up); wall time includes everything (Ray start, worker spawn, DeepSpeed
initialisation). Prints a JSON record; BENCHMARKS.md keeps the latest one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from jobs.pretrain_lm import JOB, build_dataset, build_model, prepare, step
from jobs.runner import DataOrder, collate, lr_multiplier, run
from kiln.config import load_config
from kiln.tracking import read_metrics


def plain_loop(config, run_dir: Path, warmup: int) -> dict:
    """The peer: what a user would write by hand, no Ray, no DeepSpeed."""
    runner = config.runner
    torch.manual_seed(runner.seed)
    model = build_model(config, run_dir)
    dataset = build_dataset(config, run_dir)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=runner.lr, betas=(0.9, 0.95), weight_decay=runner.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, runner))
    order = DataOrder(len(dataset), runner, world_size=1)
    started = time.perf_counter()
    tokens = 0
    for index in range(1, runner.max_steps + 1):
        if index == warmup + 1:
            steady_start, tokens = time.perf_counter(), 0
        batch = collate(dataset, order.indices(index, 0, 0), torch.device("cpu"))
        loss, metrics = step(model, batch, config)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), runner.grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += metrics["tokens"]
    end = time.perf_counter()
    return {
        "tokens_per_s": tokens / (end - steady_start),
        "wall_s": end - started,
        "final_loss": loss.item(),
    }


def through_runner(config, run_dir: Path, warmup: int) -> dict:
    started = time.perf_counter()
    summary = run(JOB, config, run_dir)
    wall = time.perf_counter() - started - summary["eval_s"]
    rows = [r for r in read_metrics(run_dir) if r["step"] > warmup]
    # Each row's rate covers the log window ending at that step; weight windows by their steps.
    seconds = sum(config.runner.log_every / r["tokens_per_s"] for r in rows)
    return {
        "tokens_per_s": config.runner.log_every * len(rows) / seconds,
        "wall_s": wall,
        "train_wall_s": summary["train_wall_s"],
        "final_loss": rows[-1]["loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--zero-stage", type=int, default=2)
    args = parser.parse_args()
    cpus = os.cpu_count()
    torch.set_num_threads(cpus)
    overrides = [
        f"runner.max_steps={args.steps}", "runner.num_workers=1",
        f"runner.cpus_per_worker={cpus}", f"runner.zero_stage={args.zero_stage}",
        "runner.log_every=10", "runner.checkpoint_every=0", "world.eval_size=8",
    ]  # fmt: skip
    # Batch per step equals the preset's global batch on its worker count.
    preset = load_config(JOB.config_cls, args.preset)
    overrides.append(f"runner.micro_batch_size={preset.runner.global_batch_size}")
    config = load_config(JOB.config_cls, args.preset, None, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        run_dir.mkdir()
        prepare(config, run_dir)
        plain = plain_loop(config, run_dir, args.warmup)
        ours = through_runner(config, run_dir, args.warmup)
    record = {
        "benchmark": "runner_overhead",
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {cpus} CPUs, torch {torch.__version__}",
        "preset": args.preset,
        "steps": args.steps,
        "tokens_per_step": config.runner.global_batch_size * config.block_size,
        "plain_loop": plain,
        "runner": ours,
        "throughput_ratio": ours["tokens_per_s"] / plain["tokens_per_s"],
        "wall_ratio": plain["wall_s"] / ours["wall_s"],
    }
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
