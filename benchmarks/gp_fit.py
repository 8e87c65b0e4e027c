"""GP ensemble fit + predict vs a linear probe on the same features, CPU, in one run.

    python benchmarks/gp_fit.py [--base-run PATH] [--shots 16] [--repeats 5] [--threads 1]

Features of the frozen models (CLIP image tower, VAE encoder, both detector trunks of the
`pretrain_diffusion` tiny base, or of `--base-run`) are computed once for a pool of
training-split images and 512 test images (timed separately: both methods need them). Then,
for `--repeats` draws of `--shots` shots of each of the 6 shape classes:

- GP ensemble: `fit_gp` (L-BFGS on the log marginal likelihood over kernel weights,
  lengthscales, noise and mean scale/offset, float64, exact Cholesky), then `predict` on the
  test images (posterior mean, variance and quadrature probabilities);
- linear probe: scikit-learn logistic regression on the concatenated normalised features of the
  same four models, fit then `predict_proba` on the same test images.

Prints medians (seconds) and accuracies as a markdown table and as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from jobs.gp_fewshot import GPFewShotConfig, class_prompts, draw_shots, model_folders, world_splits
from kiln.gp import FeatureExtractor, fit_gp
from kiln.gp import baselines as bl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base-run", type=Path, help="pretrain_diffusion run (default: tiny)")
    parser.add_argument("--shots", type=int, default=16, help="shots per class (default 16)")
    parser.add_argument("--repeats", type=int, default=5, help="shot draws timed (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.base_run is None:
        from jobs.pretrain_diffusion import pretrained_diffusion

        args.base_run = pretrained_diffusion("tiny")
    config = GPFewShotConfig(base_run=args.base_run, test_size=512)  # as in earlier runs
    model_dirs = model_folders(config, args.base_run)
    extractor = FeatureExtractor(
        model_dirs["clip"], model_dirs, class_prompts(config.prompts), config.prior_views
    )
    data = world_splits(config)
    started = time.perf_counter()
    (pool, pool_scores), (test, test_scores) = (
        extractor(data["pool"][0]),
        extractor(data["test"][0]),
    )
    extract_s = time.perf_counter() - started
    pool_labels, test_labels = data["pool"][1], data["test"][1]
    classes = extractor.class_names
    timings = {"gp_ensemble": [], "linear_probe": []}
    accuracy = {"gp_ensemble": [], "linear_probe": []}
    for seed in range(args.repeats):
        chosen = draw_shots(pool_labels, [args.shots], seed)[args.shots]
        train = {name: block[chosen] for name, block in pool.items()}
        start = time.perf_counter()
        gp = fit_gp(train, pool_scores[chosen], pool_labels[chosen], classes)
        fitted = time.perf_counter()
        probabilities = gp.predict(test, test_scores).probabilities
        timings["gp_ensemble"].append((fitted - start, time.perf_counter() - fitted))
        accuracy["gp_ensemble"].append(bl.scores(probabilities, test_labels)["accuracy"])
        start = time.perf_counter()
        train_flat, test_flat = bl.concatenated(train), bl.concatenated(test)
        probabilities = bl.linear_probe(train_flat, pool_labels[chosen], test_flat, len(classes))
        # One call fits and predicts (the predict is a single matmul): timed as a whole.
        timings["linear_probe"].append((time.perf_counter() - start, None))
        accuracy["linear_probe"].append(bl.scores(probabilities, test_labels)["accuracy"])
    results = {
        method: {
            "fit_s": statistics.median(t[0] for t in runs),
            "predict_s": None if runs[0][1] is None else statistics.median(t[1] for t in runs),
            "total_s": statistics.median(t[0] + (t[1] or 0) for t in runs),
            "accuracy": statistics.mean(accuracy[method]),
        }
        for method, runs in timings.items()
    }
    ratio = results["gp_ensemble"]["total_s"] / results["linear_probe"]["total_s"]
    n_train, n_test = args.shots * len(classes), len(test_labels)
    print(f"\n{n_train} training images ({args.shots} shots x {len(classes)} classes), "
          f"{n_test} test images, features {({k: v.shape[1] for k, v in pool.items()})}, "
          f"{args.threads} thread(s), median of {args.repeats}; feature extraction "
          f"{extract_s:.1f} s for {len(pool_labels) + n_test} images (shared)\n")  # fmt: skip
    print("| method | fit (s) | predict (s) | fit + predict (s) | test accuracy |")
    print("| --- | --- | --- | --- | --- |")
    for method, r in results.items():
        predict = "in fit" if r["predict_s"] is None else f"{r['predict_s']:.3f}"
        print(f"| {method} | {r['fit_s']:.3f} | {predict} | {r['total_s']:.3f} | "
              f"{r['accuracy']:.3f} |")  # fmt: skip
    print(f"\nGP ensemble / linear probe, fit + predict: {ratio:.2f}x")
    print(json.dumps({"results": results, "ratio": ratio, "extract_s": extract_s}))


if __name__ == "__main__":
    main()
