"""SmartSpec against fixed speculation lengths under Poisson load (issue 7, acceptance 3).

    python benchmarks/smartspec.py [--requests 32] [--max-tokens 64] [--loads 0.1,0.5,0.9]
        [--repeats 3]
    python benchmarks/smartspec.py --model PATH --draft PATH --proposers ngram

Target: `pretrain_lm --preset spec`, draft: `pretrain_lm --preset spec_draft` (the tiny shape
at 8 layers and the draft shape, on a copy-heavy text world; both from the kiln cache, trained
there first if missing; or --model / --draft). Prompts are test prompts of that world (half
copy, the rest arithmetic and key-value recall: the copy task is input-grounded, where prompt
lookup shines).
Requests are greedy and stop at EOS or --max-tokens, so every policy produces the same tokens
(speculation is lossless) and the same work.

Load: first the saturated capacity C (requests/s with all requests submitted at once and no
speculation, the median of three runs); then, per load factor f, arrivals are a seeded Poisson
process of rate f·C. Policies per proposer (draft model, n-gram): no speculation, fixed k in
{1, 2, 4, 8}, SmartSpec. Latency = finish time - arrival time. SmartSpec cells also record the
share of steps on which it speculated, its explorations (`explore_every`), its final global α
and its fitted step-time model. Each (rate, policy) cell is measured `--repeats` times,
interleaved: repeat r replays the arrivals of seed + r for every policy in an order rotated by
r, so drift in the machine's speed hits every policy alike; a cell reports the median over
repeats of the mean and of the p99 latency. Writes results.json, results.md (the table) and
latency_vs_rate.png to --out, and prints the table with the issue's two goals checked:
SmartSpec within 5% of the best fixed policy at every rate, and at most 0.7x the
no-speculation latency at the lowest rate. It also prints and records both models' held-out
exact accuracy per task: the gains hinge on it (a target that does not copy leaves prompt
lookup little to be accepted).

How the goals are judged: the best fixed policy is the one with the lowest median mean latency,
and SmartSpec's ratio to it is the median over repeats of the paired ratio (the two serves of
one repeat replay the same arrivals, seconds apart), with a bootstrap 90% interval of that
median. Why not the ratio of the two medians (also printed): on the 2-core VM the same matmul
loop takes 1.52-2.07 s from one run to the next (user time, not steal: BENCHMARKS.md,
SmartSpec, 2026-12-03 fourth session), so one policy's repeats on the same arrivals spread
±10-15% and the smallest of several medians is biased low; pairing cancels the arrivals' share
of that spread and the machine's slow drift. More, shorter repeats (e.g. --requests 64
--repeats 12) then tighten it.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from datetime import date
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from transformers import AutoModelForCausalLM, AutoTokenizer

from jobs import pretrain_lm
from kiln import lm
from kiln.config import load_config
from kiln.engine import LLMEngine, SamplingParams
from kiln.worlds.text import TextWorld

POLICIES: tuple[str | int, ...] = (0, 1, 2, 4, 8, "smartspec")
MAX_NUM_SEQS = 32


def make_engine(model: Path, draft: Path, proposer: str, policy: str | int) -> LLMEngine:
    if policy == 0:
        return LLMEngine(model=model, max_num_seqs=MAX_NUM_SEQS)
    return LLMEngine(
        model=model,
        draft_model=draft if proposer == "draft" else None,
        proposer=proposer,
        speculation=policy,
        max_num_seqs=MAX_NUM_SEQS,
    )


def serve(engine: LLMEngine, prompts, params, arrivals: list[float]) -> dict:
    """Replay arrivals (seconds from start) in real time; per-request latencies and spec stats."""
    engine.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0))  # warm-up
    order = sorted(range(len(prompts)), key=lambda i: arrivals[i])
    finished: dict[str, float] = {}
    proposed = accepted = 0
    # SmartSpec's own decisions, so that a cell which never drafts says so (and why: α)
    decisions = speculating = explored = 0
    controller = engine.speculator.controller if engine.speculator is not None else None
    start, submitted = time.perf_counter(), 0
    while len(finished) < len(prompts):
        now = time.perf_counter() - start
        while submitted < len(order) and arrivals[order[submitted]] <= now:
            i = order[submitted]
            engine.add_request(str(i), prompts[i], params)
            submitted += 1
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, arrivals[order[submitted]] - now))
            continue
        outputs = engine.step()
        decision = controller.metrics() if controller is not None else {}
        if decision:
            decisions += 1
            speculating += decision["spec_k_max"] > 0
            explored += int(decision["spec_explored"])
        for output in outputs:
            if output.finished:
                finished[output.request_id] = time.perf_counter() - start
                proposed += output.spec_stats["proposed"]
                accepted += output.spec_stats["accepted"]
    latencies = np.array([finished[str(i)] - arrivals[i] for i in range(len(prompts))])
    return {
        "mean_s": float(latencies.mean()),
        "p99_s": float(np.percentile(latencies, 99)),
        "acceptance": accepted / proposed if proposed else None,
        "speculating_steps": speculating / decisions if decisions else None,
        "explored_steps": explored,
        "alpha_end": engine.speculator.estimator.alpha() if controller is not None else None,
        # The step-time model as fitted at the end (ms per unit of each feature), to tell
        # which cost term moves a controller that speculates too much or too little.
        "time_model_ms": None
        if controller is None
        else {
            part: dict(zip(model.feature_names, (round(c * 1e3, 4) for c in model.coefficients)))
            for part, model in (
                ("target", controller.time_model.target),
                ("draft", controller.time_model.draft),
            )
            if model.coefficients is not None
        },
    }


def median_run(repeats: list[dict]) -> dict:
    """One table cell: the median over repeats of each latency statistic."""
    acceptance = [r["acceptance"] for r in repeats if r["acceptance"] is not None]
    return {
        "mean_s": float(np.median([r["mean_s"] for r in repeats])),
        "p99_s": float(np.median([r["p99_s"] for r in repeats])),
        "acceptance": float(np.median(acceptance)) if acceptance else None,
        "repeats_mean_s": [r["mean_s"] for r in repeats],
        "speculating_steps": [r["speculating_steps"] for r in repeats],
        "explored_steps": [r["explored_steps"] for r in repeats],
        "alpha_end": [r["alpha_end"] for r in repeats],
        "time_model_ms": repeats[-1]["time_model_ms"],
    }


def poisson_arrivals(n: int, rate: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out


def table(results: dict, loads: list[float], rates: list[float]) -> str:
    lines = []
    for proposer, by_policy in results.items():
        lines.append(
            f"\n**{proposer}** (mean / p99 latency, s; acceptance; SmartSpec: share of its"
            " steps that speculated)\n"
        )
        header = " | ".join(f"load {f} ({r:.2f} req/s)" for f, r in zip(loads, rates))
        lines.append(f"| policy | {header} |")
        lines.append("| --- |" + " --- |" * len(loads))
        for policy, runs in by_policy.items():
            cells = []
            for run in runs:
                acc = "" if run["acceptance"] is None else f"; {run['acceptance']:.2f}"
                if policy == "smartspec":
                    acc += f"; speculates {np.median(run['speculating_steps']):.0%} of steps"
                cells.append(f"{run['mean_s']:.3f} / {run['p99_s']:.3f}{acc}")
            lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_ratio(smart: dict, fixed: dict, rng: np.random.Generator) -> tuple[float, float, float]:
    """Median over repeats of SmartSpec's mean latency over a fixed policy's on the same
    arrivals, and a bootstrap 90% interval of that median."""
    ratios = np.array(smart["repeats_mean_s"]) / np.array(fixed["repeats_mean_s"])
    resampled = rng.choice(ratios, size=(2000, len(ratios)))
    low, high = np.percentile(np.median(resampled, axis=1), [5, 95])
    return float(np.median(ratios)), float(low), float(high)


def goals(results: dict, loads: list[float]) -> list[str]:
    rng = np.random.default_rng(0)
    checks = []
    for proposer, by_policy in results.items():
        smart = by_policy["smartspec"]
        fixed = [k for k in by_policy if k != "smartspec"]
        for i, load in enumerate(loads):
            best = min(fixed, key=lambda k: by_policy[k][i]["mean_s"])
            ratio, low, high = paired_ratio(smart[i], by_policy[best][i], rng)
            of_medians = smart[i]["mean_s"] / by_policy[best][i]["mean_s"]
            checks.append(
                f"{proposer} load {load}: SmartSpec/best ({best}) = {ratio:.3f} paired"
                f" [90% {low:.3f}-{high:.3f}], {of_medians:.3f} of medians; {ratio <= 1.05}"
            )
        ratio, low, high = paired_ratio(smart[0], by_policy["none"][0], rng)
        checks.append(
            f"{proposer} lowest load: SmartSpec/no-spec = {ratio:.3f} paired"
            f" [90% {low:.3f}-{high:.3f}]; {ratio <= 0.7}"
        )
    return checks


def plot(results: dict, rates: list[float], path: Path) -> None:
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (proposer, by_policy) in zip(axes[0], results.items()):
        for policy, runs in by_policy.items():
            style = {"lw": 2.5, "color": "black"} if policy == "smartspec" else {}
            ax.plot(rates, [r["mean_s"] for r in runs], marker="o", label=policy, **style)
        ax.set(title=f"proposer: {proposer}", xlabel="request rate (req/s)")
        ax.set(ylabel="mean request latency (s)", yscale="log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="target checkpoint (default: spec preset)")
    parser.add_argument("--draft", type=Path, help="draft checkpoint (default: spec_draft preset)")
    parser.add_argument("--proposers", default="draft,ngram")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--loads", default="0.1,0.5,0.9", help="fractions of saturated capacity")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per cell")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/smartspec"))
    args = parser.parse_args()
    proposers = args.proposers.split(",")
    model = args.model or pretrain_lm.pretrained_model("spec")
    draft = args.draft or (
        pretrain_lm.pretrained_model("spec_draft") if "draft" in proposers else None
    )
    tokenizer = AutoTokenizer.from_pretrained(model)
    world = TextWorld(load_config(pretrain_lm.PretrainLMConfig, "spec").world)
    prompts = [tokenizer(e.prompt).input_ids for e in world.split("test", args.requests)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0)
    # The workload hinges on what the pair can do: a target that does not copy leaves prompt
    # lookup and the draft little to be accepted, and one preset trained on two machines has
    # copied at 1.00 and at 0.00 (BENCHMARKS.md, SmartSpec 2026-12-07).
    test_examples = world.split("test")
    skills = {
        role: lm.task_accuracy(AutoModelForCausalLM.from_pretrained(path), tokenizer, test_examples)
        for role, path in (("target", model), ("draft", draft))
        if path is not None
    }
    print("held-out exact accuracy:", json.dumps(skills))

    baseline = make_engine(model, draft, "none", 0)
    baseline.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0))
    saturated = []  # the median of three: one timing on a machine whose speed drifts sets every
    for _ in range(3):  # load, and a load factor near 1 is sensitive to it
        start = time.perf_counter()
        baseline.generate(prompts, params)
        saturated.append(time.perf_counter() - start)
    capacity = len(prompts) / float(np.median(saturated))
    loads = [float(f) for f in args.loads.split(",")]
    rates = [f * capacity for f in loads]

    results: dict[str, dict[str, list[dict]]] = {}
    for proposer in proposers:
        engines = {
            "none" if policy == 0 else str(policy): (
                baseline if policy == 0 else make_engine(model, draft, proposer, policy)
            )
            for policy in POLICIES
        }
        runs: dict[str, list[list[dict]]] = {name: [[] for _ in rates] for name in engines}
        names = list(engines)
        for i, rate in enumerate(rates):
            for repeat in range(args.repeats):
                arrivals = poisson_arrivals(len(prompts), rate, args.seed + repeat)
                for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
                    runs[name][i].append(serve(engines[name], prompts, params, arrivals))
        results[proposer] = {
            name: [median_run(cell) for cell in cells] for name, cells in runs.items()
        }
        for name, cells in results[proposer].items():
            print(proposer, name, [round(cell["mean_s"], 4) for cell in cells])

    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()} {platform.processor()}".strip(),
        "model": str(model),
        "draft": str(draft),
        "requests": args.requests,
        "repeats": args.repeats,
        "max_tokens": args.max_tokens,
        "accuracy": skills,
        "capacity_req_per_s": capacity,
        "loads": loads,
        "rates": rates,
        "results": results,
        "goals": goals(results, loads),
    }
    (args.out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    text = table(results, loads, rates) + "\n\n" + "\n".join(record["goals"]) + "\n"
    text += f"\nheld-out exact accuracy: {json.dumps(skills)}\n"
    (args.out / "results.md").write_text(text)
    plot(results, rates, args.out / "latency_vs_rate.png")
    print(text)


if __name__ == "__main__":
    main()
