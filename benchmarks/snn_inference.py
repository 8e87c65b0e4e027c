"""SpikeZIP-TF inference: the converted SNN against its QANN (the peer), side by side.

    python benchmarks/snn_inference.py [--run runs/spikezip/tiny] [--batch-sizes 32,360]
        [--repeats 5] [--threads N]

For the QANN of a finished `python -m jobs.spikezip` run, on the run's held-out digits, per
device (CPU, and CUDA when available), dtype and batch size:
- QANN: one forward pass;
- SNN step by step: `SpikingViT.run`, the image at t = 0, stopped at the first silent step;
- SNN multi-step: one call on [T, batch, ...] with T = the steps the step-by-step run used + 1
  (the cost when the settling time is known in advance; no early stop).
Wall times are medians over --repeats after one warm-up; both SNN modes are checked against
the QANN (agreement of predicted classes, max |difference| of the summed logits).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from jobs.spikezip import JOB, digits
from kiln import snn
from kiln.config import load_config


def _median_seconds(function, device: torch.device, repeats: int) -> tuple[float, object]:
    result = function()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        result = function()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


@torch.no_grad()
def measure(qann: snn.ViT, images: torch.Tensor, device, dtype, repeats: int, max_steps: int):
    qann = qann.to(device, dtype)
    images = images.to(device, dtype)
    spiking = snn.convert(qann)
    qann_s, qann_logits = _median_seconds(lambda: qann(images), device, repeats)
    run_s, result = _median_seconds(lambda: spiking.run(images, max_steps), device, repeats)
    silence = torch.zeros(result.steps, *images.shape, device=device, dtype=dtype)
    sequence = torch.cat([images[None], silence])

    def multi_step():
        spiking.reset()
        return spiking(sequence).sum(0)

    multi_s, multi_logits = _median_seconds(multi_step, device, repeats)
    qann_pred = qann_logits.argmax(-1)
    return {
        "qann_ms": 1000 * qann_s,
        "snn_ms": 1000 * run_s,
        "snn_multi_ms": 1000 * multi_s,
        "steps": result.steps,
        "converged": result.converged,
        "agreement": min(
            (result.output.argmax(-1) == qann_pred).float().mean().item(),
            (multi_logits.argmax(-1) == qann_pred).float().mean().item(),
        ),
        "max_abs_diff": max(
            (result.output - qann_logits).abs().max().item(),
            (multi_logits - qann_logits).abs().max().item(),
        ),
        "spikes_per_image": sum(result.spikes_per_layer.values()) / len(images),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/spikezip/tiny", help="a finished spikezip run")
    parser.add_argument("--batch-sizes", default="32,360", help="comma-separated")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    run = Path(args.run)
    if not (run / "summary.json").is_file():
        parser.exit(2, f"error: {run} is not a finished run; first: python -m jobs.spikezip\n")
    config = load_config(JOB.config_cls, None, run / "config.yaml")
    qann = snn.load_pretrained(run / "model", levels=config.levels)
    images, _ = digits(config.data, "test")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])

    print(f"QANN of {run} (levels={config.levels}); CPU threads: {torch.get_num_threads()}")
    header = (
        "| device | dtype | batch | QANN ms | SNN step-by-step ms (steps) | SNN multi-step ms "
        "| step-by-step / QANN | multi-step / QANN | agreement | max abs diff | spikes/image |"
    )
    print(header)
    print("|" + " --- |" * header.count(" | ") + " --- |")
    for device in devices:
        for dtype in (torch.float32, torch.float64):
            for batch in (int(b) for b in args.batch_sizes.split(",")):
                r = measure(qann, images[:batch], device, dtype, args.repeats, config.max_snn_steps)
                steps = f"{r['steps']}" + ("" if r["converged"] else ", not silent")
                print(
                    f"| {device.type} | {str(dtype).removeprefix('torch.')} | {batch} "
                    f"| {r['qann_ms']:.2f} | {r['snn_ms']:.1f} ({steps}) | {r['snn_multi_ms']:.1f} "
                    f"| {r['snn_ms'] / r['qann_ms']:.1f} | {r['snn_multi_ms'] / r['qann_ms']:.1f} "
                    f"| {r['agreement']:.4f} | {r['max_abs_diff']:.1e} "
                    f"| {r['spikes_per_image']:.0f} |"
                )


if __name__ == "__main__":
    main()
