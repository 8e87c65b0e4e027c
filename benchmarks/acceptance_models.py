"""Which acceptance model predicts speculative verification best (issue 7, SmartSpec's α).

    python benchmarks/acceptance_models.py [--model PATH --draft PATH] [--requests 512]

Serves the test prompts of the `spec` world (the SmartSpec benchmark's) at a fixed k = 8 with
each proposer and records every verification (request, proposals, accepted before the first
rejection). Then replays those records, in step order, through five acceptance models, each
predicting a step's outcome before it observes it (prequential, as SmartSpec uses them):
  - `constant`: the paper's one α per request at every position (`AcceptanceEstimator.alpha`);
  - `level_everywhere`: the global per-position rate scaled at every position by the request's
    pooled rate over the global one (the landed model until 2026-12-07);
  - `global_profile`: the global per-position rate alone;
  - `level_at_position_1`: the request's level scales position 1 only, and later positions take
    the global conditional rates; tried on 2026-12-03 because prompt-lookup acceptance is
    bimodal (BENCHMARKS.md, SmartSpec);
  - `kiln`: `AcceptanceEstimator.position_alphas` as landed, which uses `level_everywhere` or
    `global_profile`, whichever has predicted the verifications so far better.
Reports the mean log-likelihood of the observed outcomes (higher is better) and the RMS error of
the predicted number of accepted proposals. Prints a table and writes results.json to --out.
A better prediction need not give lower latency: the SmartSpec section says what it gave.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import operator
import platform
from datetime import date
from pathlib import Path

from smartspec import make_engine  # benchmarks/smartspec.py, beside this script
from transformers import AutoTokenizer

from jobs import pretrain_lm
from kiln.config import load_config
from kiln.engine import SamplingParams
from kiln.engine.smartspec import AcceptanceEstimator, verification_likelihood
from kiln.worlds.text import TextWorld

MAX_K = 8


class LevelAtPosition1(AcceptanceEstimator):
    """The alternative: min(1, α_1 · α_i / α) at position 1, then the global α_j."""

    def position_alphas(self, request_id: object, k: int) -> list[float]:
        profile = self.rates_at_positions(request_id, k, request_level=False)
        level = self.alpha(request_id) / self.alpha()
        return [min(1.0, rate * level) if j == 0 else rate for j, rate in enumerate(profile)]


class LevelEverywhere(AcceptanceEstimator):
    def position_alphas(self, request_id: object, k: int) -> list[float]:
        return self.rates_at_positions(request_id, k, request_level=True)


class GlobalProfile(AcceptanceEstimator):
    def position_alphas(self, request_id: object, k: int) -> list[float]:
        return self.rates_at_positions(request_id, k, request_level=False)


class Constant(AcceptanceEstimator):
    def position_alphas(self, request_id: object, k: int) -> list[float]:
        return [self.alpha(request_id)] * k


def record(model: Path, draft: Path | None, proposer: str, prompts, max_tokens: int) -> list:
    engine = make_engine(model, draft, proposer, MAX_K)  # the SmartSpec benchmark's engine
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    steps = []
    while engine.has_unfinished_requests():
        engine.step()
        stats = engine.last_step_stats
        steps.append([(rid, n, stats.num_accepted[rid]) for rid, n in stats.num_proposed.items()])
    return steps


def replay(steps: list, estimator: AcceptanceEstimator) -> dict[str, float]:
    log_likelihood, squared_error, count = 0.0, 0.0, 0
    for step in steps:
        predicted = {rid: estimator.position_alphas(rid, n) for rid, n, _ in step if n}
        for rid, n, accepted in step:
            if not n:
                continue
            rates = predicted[rid]
            log_likelihood += math.log(max(verification_likelihood(rates, accepted), 1e-12))
            expected = sum(itertools.accumulate(rates, operator.mul))  # Σ_j α_1·…·α_j
            squared_error += (expected - accepted) ** 2
            count += 1
        for rid, n, accepted in step:
            estimator.observe(rid, n, accepted)
    return {
        "log_likelihood": log_likelihood / count,
        "rmse_accepted": math.sqrt(squared_error / count),
        "verifications": count,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="target checkpoint (default: spec preset)")
    parser.add_argument("--draft", type=Path, help="draft checkpoint (default: spec_draft preset)")
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/acceptance_models"))
    args = parser.parse_args()
    model = args.model or pretrain_lm.pretrained_model("spec")
    draft = args.draft or pretrain_lm.pretrained_model("spec_draft")
    tokenizer = AutoTokenizer.from_pretrained(model)
    world = TextWorld(load_config(pretrain_lm.PretrainLMConfig, "spec").world)
    prompts = [tokenizer(e.prompt).input_ids for e in world.split("test", args.requests)]
    models = {
        "constant": Constant,
        "level_everywhere": LevelEverywhere,
        "global_profile": GlobalProfile,
        "level_at_position_1": LevelAtPosition1,
        "kiln": AcceptanceEstimator,
    }
    results = {}
    print("| proposer | model | log-likelihood / verification | RMSE accepted |")
    print("| --- | --- | --- | --- |")
    for proposer in ("draft", "ngram"):
        steps = record(model, draft, proposer, prompts, args.max_tokens)
        results[proposer] = {name: replay(steps, cls()) for name, cls in models.items()}
        for name, r in results[proposer].items():
            print(f"| {proposer} | {name} | {r['log_likelihood']:.3f} | {r['rmse_accepted']:.3f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(
        json.dumps(
            {
                "date": date.today().isoformat(),
                "machine": f"{platform.machine()} {platform.processor()}".strip(),
                "model": str(model),
                "draft": str(draft),
                "requests": args.requests,
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
