"""Generate an image grid from any diffusers text-to-image checkpoint on disk.

    python -m jobs.generate --model PATH --prompt "two red stars on a gray background" \\
        [--prompt ...] [--steps 25] [--guidance 5] [--images 4] [--seed 0] [--out grid.png]

PATH is a folder `DiffusionPipeline.from_pretrained` loads: the `pipeline/` of
`jobs.pretrain_diffusion`, or a Stable Diffusion checkpoint a user brings. One row per prompt,
`--images` columns; generation is deterministic in `--seed`. Nothing is added around the
pipeline call (benchmarks/generate_overhead.py measures that).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from kiln.diffusion.evaluate import generate_images, save_grid


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.generate", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--model", required=True, help="diffusers pipeline folder")
    parser.add_argument("--prompt", action="append", required=True, help="repeatable")
    parser.add_argument("--steps", type=int, default=25, help="sampling steps (default 25)")
    parser.add_argument("--guidance", type=float, default=5.0, help="CFG scale (default 5)")
    parser.add_argument("--images", type=int, default=4, help="images per prompt (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    parser.add_argument("--out", default="grid.png", help="output PNG (default grid.png)")
    args = parser.parse_args(argv)
    model = Path(args.model)
    if not (model / "model_index.json").is_file():
        parser.exit(2, f"error: --model {str(model)!r}: expected a diffusers pipeline folder "
                       "(with model_index.json)\n")  # fmt: skip
    for name in ("steps", "images"):
        if getattr(args, name) < 1:
            parser.exit(2, f"error: --{name}={getattr(args, name)}: expected a positive integer\n")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipeline = DiffusionPipeline.from_pretrained(model).to(device)
    images = generate_images(
        pipeline, args.prompt, args.images, args.steps, args.guidance, args.seed
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_grid(images, args.images, out, scale=max(1, 128 // images.shape[1]))
    print(
        f"wrote {out.resolve()} ({len(args.prompt)} prompts x {args.images} images)",
        file=sys.stderr,
    )
    return out


if __name__ == "__main__":
    main()
