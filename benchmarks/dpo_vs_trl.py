"""DPO step time: `jobs.dpo` (runner, one Ray Train worker, DeepSpeed ZeRO-2) against TRL's
`DPOTrainer` on the same tiny model, the same preference pairs, batch size, β, optimizer
settings and number of steps, in one process run side by side.

    python benchmarks/dpo_vs_trl.py [--steps 60] [--warmup 10] [--batch 16]

Peers: TRL with its defaults for the reference (a reference forward every step,
`precompute_ref_log_probs=False`), and TRL with `precompute_ref_log_probs=True` (reference
log-probs computed once up front, as kiln always does). Both run fp32 with 2 torch threads
(TRL's default on CPU is bf16 autocast; kiln's tiny preset trains fp32). Step times are medians
over the steps after `--warmup`; kiln's come from its per-step `step_time_s` metric, so Ray's
start-up (worker spawn, DeepSpeed initialisation) is reported separately, not mixed into them.
Prints a JSON record; BENCHMARKS.md keeps the latest one.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from jobs.dpo import JOB
from jobs.runner import connect_ray, run
from kiln.config import load_config
from kiln.tracking import read_metrics


def trl_step_times(base: Path, pairs: list[dict], args: argparse.Namespace, precompute: bool):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class StepClock(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_begin(self, *_, **__):
            self._start = time.perf_counter()

        def on_step_end(self, *_, **__):
            self.times.append(time.perf_counter() - self._start)

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base)
    clock = StepClock()
    with tempfile.TemporaryDirectory() as output:
        config = DPOConfig(
            output_dir=output,
            per_device_train_batch_size=args.batch,
            max_steps=args.steps,
            learning_rate=args.lr,
            lr_scheduler_type="cosine",  # the schedule does not change the time per step
            warmup_steps=10,
            adam_beta1=0.9,
            adam_beta2=0.95,
            weight_decay=0.0,
            max_grad_norm=1.0,
            beta=0.1,
            loss_type=["sigmoid"],
            precompute_ref_log_probs=precompute,
            bf16=False,
            use_cpu=True,
            report_to="none",
            save_strategy="no",
            logging_steps=args.steps,
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        trainer = DPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(base),
            ref_model=AutoModelForCausalLM.from_pretrained(base),
            args=config,
            train_dataset=Dataset.from_list(pairs),
            processing_class=tokenizer,
            callbacks=[clock],
        )
        started = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - started
    return clock.times, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16, help="preference pairs per step")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--output", default="runs/bench/dpo_vs_trl")
    args = parser.parse_args()
    torch.set_num_threads(2)

    out = Path(args.output).resolve()
    overrides = [
        "probe_size=0",  # TRL has no diagnostics; kiln's probes are off for a like-for-like step
        "runner.num_workers=1",
        "runner.cpus_per_worker=2",
        f"runner.micro_batch_size={args.batch}",
        f"runner.max_steps={args.steps}",
        f"runner.lr={args.lr}",
        "runner.log_every=1",
        "runner.checkpoint_every=0",
    ]
    config = load_config(JOB.config_cls, "tiny", None, overrides)
    connect_ray()
    started = time.perf_counter()
    summary = run(JOB, config, out / "kiln")
    kiln_wall = time.perf_counter() - started
    kiln_times = [row["step_time_s"] for row in read_metrics(out / "kiln")][args.warmup :]
    base = Path(json.loads((out / "kiln/assets/data.json").read_text())["base_model"])
    pairs = [
        {key: row[key] for key in ("prompt", "chosen", "rejected")}
        for row in map(json.loads, (out / "kiln/assets/pairs.jsonl").read_text().splitlines())
    ]

    record = {
        "date": str(date.today()),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "steps": args.steps,
        "pairs_per_step": args.batch,
        "kiln_step_s": statistics.median(kiln_times),
        "kiln_train_wall_s": summary["train_wall_s"],
        "kiln_total_wall_s": round(kiln_wall, 2),
    }
    for name, precompute in (("trl", False), ("trl_precompute_ref", True)):
        times, wall = trl_step_times(base, pairs, args, precompute)
        record[f"{name}_step_s"] = statistics.median(times[args.warmup :])
        record[f"{name}_wall_s"] = round(wall, 2)
        record[f"ratio_vs_{name}"] = record["kiln_step_s"] / record[f"{name}_step_s"]
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
