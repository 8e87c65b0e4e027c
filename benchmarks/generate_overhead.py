"""Images/s of `jobs.generate` against a plain diffusers pipeline call (the peer), side by side.

    python benchmarks/generate_overhead.py [--model PATH] [--prompts 16] [--images 4]
        [--steps 25] [--guidance 5] [--repeats 5]

Both sides use the same loaded pipeline, prompts, step count, guidance and seed: ours is
`kiln.diffusion.evaluate.generate_images` (what `python -m jobs.generate` calls, with its uint8
conversion and batching), the peer one `pipeline(prompt=..., output_type="np")` call. The two
alternate within each repeat (so drift on a shared machine hits both) and the report gives
medians and their ratio; ~1.0 means the command adds nothing. --model defaults to the cached
`pretrain_diffusion --preset tiny` pipeline (trained on first use).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from kiln.diffusion.evaluate import generate_images
from kiln.worlds.shapes import ShapesWorld


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="diffusers pipeline folder (default: the tiny base)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--images", type=int, default=4, help="images per prompt")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.model:
        model = Path(args.model)
    else:
        from jobs.pretrain_diffusion import pretrained_diffusion

        model = pretrained_diffusion("tiny") / "pipeline"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipeline = DiffusionPipeline.from_pretrained(model).to(device)
    pipeline.set_progress_bar_config(disable=True)
    prompts = ShapesWorld().prompts("test")[: args.prompts]
    count = len(prompts) * args.images

    def ours():
        generate_images(pipeline, prompts, args.images, args.steps, args.guidance, 0,
                        prompts_per_batch=len(prompts), progress=False)  # fmt: skip

    def plain():
        pipeline(prompt=prompts, num_images_per_prompt=args.images, num_inference_steps=args.steps,
                 guidance_scale=args.guidance, generator=torch.Generator().manual_seed(0),
                 output_type="np")  # fmt: skip

    times: dict[str, list[float]] = {"ours": [], "plain": []}
    for call in (ours, plain):
        call()  # warm-up
    for _ in range(args.repeats):
        for name, call in (("ours", ours), ("plain", plain)):
            started = time.perf_counter()
            call()
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - started)
    rate = {name: count / statistics.median(t) for name, t in times.items()}
    print(f"pipeline {model} on {device}, torch threads {torch.get_num_threads()}; "
          f"{len(prompts)} prompts x {args.images} images, {args.steps} steps, "
          f"guidance {args.guidance:g}, median of {args.repeats}")  # fmt: skip
    print("| | images/s |\n| --- | --- |")
    print(f"| plain diffusers call | {rate['plain']:.1f} |")
    print(f"| jobs.generate (generate_images) | {rate['ours']:.1f} |")
    print(f"| ratio ours / plain | {rate['ours'] / rate['plain']:.3f} |")


if __name__ == "__main__":
    main()
