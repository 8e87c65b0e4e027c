"""Run tracking: metrics.jsonl, TensorBoard events and a progress line, written by one rank.

Resuming from a checkpoint at step s truncates metrics.jsonl to rows with step <= s and purges
TensorBoard events after s, so a resumed run's history never repeats or skips a step.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class RunLogger:
    """Appends one JSON object per logged step; prints `step/total, loss, tok/s, ETA`."""

    def __init__(self, run_dir: Path, name: str, total_steps: int, start_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.name, self.total_steps, self.start_step = name, total_steps, start_step
        path = Path(run_dir) / METRICS_FILE
        kept = [row for row in read_metrics(run_dir) if row["step"] <= start_step]
        path.write_text("".join(json.dumps(row) + "\n" for row in kept))
        self._file = path.open("a")
        self._tensorboard = SummaryWriter(
            str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1 if start_step else None
        )
        self._started = time.perf_counter()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        elapsed = time.perf_counter() - self._started
        row = {"step": step, **metrics, "elapsed_s": round(elapsed, 3)}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        for key, value in metrics.items():
            self._tensorboard.add_scalar(key, value, step)
        done = step - self.start_step
        eta = elapsed / done * (self.total_steps - step) if done else float("nan")
        rate = metrics.get("tokens_per_s")
        # sys.stdout.write, not print: Ray Train patches print and would show each line twice.
        sys.stdout.write(
            f"[{self.name}] step {step}/{self.total_steps} ({100 * step / self.total_steps:.0f}%)"
            f" loss {metrics.get('loss', float('nan')):.4f}"
            + (f" | {rate / 1000:.1f}k tok/s" if rate else "")
            + f" | elapsed {_clock(elapsed)} | ETA {_clock(eta)}\n"
        )
        sys.stdout.flush()

    def close(self) -> None:
        self._file.close()
        self._tensorboard.close()
