"""Speculative decoding inside the engine is lossless: greedy tokens equal Hugging Face
`generate` with the n-gram proposer (fixed k and SmartSpec) and with a draft model that often
disagrees with the target (so rejections and KV rollback happen), and every block is returned.
Negative control: a verifier that accepts every draft token breaks the equality."""

import dataclasses
import random

import pytest
import torch
from engine_models import build_tiny_llama, hf_greedy

from kiln.engine import LLMEngine, SamplingParams, spec_decode

MAX_NEW = 24
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0)  # stops at EOS, as HF does


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.set_num_threads(1)
    target = build_tiny_llama(tmp_path_factory.mktemp("target"), seed=0)
    draft = build_tiny_llama(tmp_path_factory.mktemp("draft"), seed=1)  # same tokenizer
    return target, draft


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(1)
    # Repeated spans give the n-gram proposer something to look up.
    spans = [[rng.randrange(3, 250) for _ in range(n)] for n in (3, 5, 8, 4)]
    return [[1, *span * repeats] for span, repeats in zip(spans, (4, 3, 2, 5))]


@pytest.fixture(scope="module")
def reference(models, prompts):
    tokens = hf_greedy(models[0], prompts, MAX_NEW)
    assert sum(len(t) == MAX_NEW for t in tokens) >= 2, "too short to exercise speculation"
    return tokens


def _generate(models, prompts, **speculation):
    target, draft = models
    if speculation.get("proposer") == "draft":
        speculation["draft_model"] = draft
    engine = LLMEngine(target, block_size=4, max_num_seqs=8, **speculation)
    outputs = engine.generate(prompts, GREEDY)
    engine.block_manager.check_invariants()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    proposed = sum(o.spec_stats["proposed"] for o in outputs)
    accepted = sum(o.spec_stats["accepted"] for o in outputs)
    return [o.token_ids for o in outputs], proposed, accepted


@pytest.mark.parametrize(
    "speculation",
    [
        {"proposer": "ngram", "speculation": 3},
        {"proposer": "ngram", "speculation": "smartspec"},
        {"proposer": "draft", "speculation": 3},
    ],
    ids=["ngram-k3", "ngram-smartspec", "draft-k3"],
)
def test_greedy_speculation_matches_hf_generate(models, prompts, reference, speculation):
    tokens, proposed, accepted = _generate(models, prompts, **speculation)
    assert tokens == reference
    if speculation["speculation"] == 3:  # fixed k always speculates where it can
        assert proposed > 0
    if speculation["proposer"] == "draft":
        assert accepted < proposed  # a different model: rejections, hence KV rollbacks


def test_the_prefill_step_verifies_drafts(models, prompts, reference):
    """A prompt's last position is sampled like a decode's, so the step that prefills it can
    verify drafts too. With the target as its own draft every greedy draft passes: the first
    step emits k + 1 tokens per request (one without this), equal to Hugging Face's."""
    target, _ = models
    k = 3
    engine = LLMEngine(target, draft_model=target, proposer="draft", speculation=k,
                       block_size=4, max_num_seqs=8)  # fmt: skip
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, GREEDY)
    first = {out.request_id: out.token_ids for out in engine.step()}
    assert engine.last_step_stats.num_drafted == {str(i): k for i in range(len(prompts))}
    long_enough = [i for i, tokens in enumerate(reference) if len(tokens) > k]
    assert long_enough, "every reference ends inside the first step"
    for i in long_enough:
        assert first[str(i)] == reference[i][: k + 1]


def _accept_all(target_logits, draft_tokens):
    """A broken greedy verifier: every draft passes, plus the target's next token."""
    return [*draft_tokens, int(target_logits[len(draft_tokens)].argmax())]


def test_negative_control_accepting_every_draft_breaks_equality(
    models, prompts, reference, monkeypatch
):
    monkeypatch.setattr(spec_decode, "verify_greedy", _accept_all)
    tokens, proposed, accepted = _generate(models, prompts, proposer="draft", speculation=3)
    # Every draft is accepted, except drafts past a request's stop (never credited): at most
    # the 3 of each request's last step.
    assert 0 < proposed - 3 * len(prompts) <= accepted <= proposed
    assert tokens != reference


def test_step_stats_report_every_draft_run_apart_from_the_estimators_counts(
    models, prompts, monkeypatch
):
    """A step's cost is every draft it ran and verified (num_drafted, SmartSpec's time model);
    the estimator's counts stop at the first rejection. Reporting only those made the draft's
    time model read an 8-pass draft call as a 1-pass one (BENCHMARKS.md, SmartSpec)."""
    monkeypatch.setattr(
        spec_decode, "verify_greedy", lambda logits, drafts: [int(logits[0].argmax())]
    )
    engine = LLMEngine(models[0], draft_model=models[1], proposer="draft", speculation=3,
                       max_num_seqs=8)  # fmt: skip
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, GREEDY)
    drafted = []
    while engine.has_unfinished_requests():
        engine.step()
        stats = engine.last_step_stats
        assert set(stats.num_proposed) == set(stats.num_drafted)
        assert all(n == 1 for n in stats.num_proposed.values())  # the first draft is rejected
        assert not any(stats.num_accepted.values())
        drafted += stats.num_drafted.values()
    assert max(drafted) == 3 and min(drafted) >= 1  # a request's last steps may draft fewer


def test_per_request_speculation_in_one_batch(models, prompts, reference):
    """Off, fixed k=2 and SmartSpec side by side on one SmartSpec engine: each request keeps
    its own setting (off proposes nothing, k=2 never more than 2 per step), all lossless."""
    engine = LLMEngine(models[0], block_size=4, max_num_seqs=8, proposer="ngram")
    settings = [0, 2, "smartspec", None]
    params = [SamplingParams(max_tokens=MAX_NEW, temperature=0, speculation=s) for s in settings]
    outputs = engine.generate(prompts, params)
    assert [o.token_ids for o in outputs] == reference
    off, fixed = outputs[0].spec_stats, outputs[1].spec_stats
    assert off["proposed"] == 0
    assert 0 < fixed["proposed"] <= 2 * fixed["steps"]
    plain = LLMEngine(models[0], block_size=4, proposer="none")
    [refused] = plain.generate([prompts[0]], SamplingParams(max_tokens=4, speculation=2))
    assert refused.finish_reason == "error" and "proposer" in refused.error


def test_drafts_past_a_stop_are_not_credited(models, prompts, monkeypatch):
    """With every draft accepted and a stop token inside a step's drafts, the step keeps the
    tokens up to the stop: only those count as generated and accepted, the estimator sees no
    rejection for the cut, finished requests leave no per-request state, and every block
    comes back."""

    monkeypatch.setattr(spec_decode, "verify_greedy", _accept_all)
    # Proposers end a proposal at a stop token they are told of; one a proposer cannot see (a
    # stop string) still lands inside the drafts. Hide the stop tokens from the proposer.
    spec_state = LLMEngine._spec_state
    monkeypatch.setattr(
        LLMEngine,
        "_spec_state",
        lambda self, req: dataclasses.replace(spec_state(self, req), stop_token_ids=frozenset()),
    )
    target, draft = models
    k = 3

    def run(stops):
        engine = LLMEngine(target, draft_model=draft, proposer="draft", speculation=k,
                           block_size=4, max_num_seqs=8)  # fmt: skip
        params = [SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True,
                                 stop_token_ids=stop) for stop in stops]  # fmt: skip
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            engine.add_request(str(i), prompt, p)
        outputs, generated, verified, accepted = {}, 0, 0, 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                outputs[out.request_id] = out
            stats = engine.last_step_stats
            generated += stats.num_generated_tokens
            verified += sum(stats.num_proposed.values())
            accepted += sum(stats.num_accepted.values())
        engine.block_manager.check_invariants()
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
        assert not engine.speculator.estimator._per_request  # nothing left of finished requests
        return [outputs[str(i)] for i in range(len(prompts))], generated, verified, accepted

    free, generated, verified, accepted = run([[] for _ in prompts])
    assert generated == sum(len(o.token_ids) for o in free) and verified == accepted > 0
    # Every step, the prefill step included, emits k drafts and one more token: stop at the
    # first output position that is a draft's, with later drafts in its step.
    stops = []
    for out in free:
        position = next(
            (p for p in range(MAX_NEW) if p % (k + 1) < k - 1
             and out.token_ids[p] not in out.token_ids[:p]),
            None,
        )  # fmt: skip
        assert position is not None, "no draft position with a first-time token to stop at"
        stops.append([out.token_ids[position]])
    stopped, generated, verified, accepted = run(stops)
    for out, stop in zip(stopped, stops):
        assert out.finish_reason == "stop" and out.token_ids[-1] == stop[0]
        assert out.spec_stats["accepted"] < out.spec_stats["proposed"]  # the unused drafts
    assert generated == sum(len(o.token_ids) for o in stopped)
    assert verified == accepted  # the cut is not a rejection


def test_proposers_are_told_the_requests_stop_tokens(models, prompts):
    engine = LLMEngine(models[0], draft_model=models[1], proposer="draft", speculation=2)
    eos = engine.eos_token_ids
    assert eos, "the test model needs an EOS token"
    engine.add_request("a", prompts[0], SamplingParams(max_tokens=4, stop_token_ids=[5]))
    engine.add_request("b", prompts[1], SamplingParams(max_tokens=4, ignore_eos=True))
    states = {rid: engine._spec_state(r) for rid, r in engine.requests.items()}
    assert states["a"].stop_token_ids == {5, *eos}
    assert states["b"].stop_token_ids == frozenset()


def test_smartspec_learns_output_lengths_from_finished_requests(models, prompts, reference):
    """SmartSpec's stop model sees every finished request once: its output length, and
    whether a stop ended it (a stop token here) or max_tokens did (censored)."""
    engine = LLMEngine(models[0], block_size=4, max_num_seqs=8, proposer="ngram")
    stop_tokens = [[ref[len(ref) // 2]] if i % 2 else [] for i, ref in enumerate(reference)]
    params = [SamplingParams(max_tokens=MAX_NEW, temperature=0, stop_token_ids=stop)
              for stop in stop_tokens]  # fmt: skip
    outputs = engine.generate(prompts, params)
    stops = [len(o.token_ids) for o in outputs if o.finish_reason == "stop"]
    assert stops and len(stops) < len(outputs)  # both kinds of ending
    lengths = engine.speculator.controller.lengths
    for m in range(1, MAX_NEW + 2):
        at_risk = sum(len(o.token_ids) >= m for o in outputs)
        assert lengths.hazard(m) == pytest.approx(stops.count(m) / (at_risk + 1))


def test_max_model_len_caps_the_context_and_the_draft_cache(models, prompts, reference):
    # A 131072-token checkpoint (Llama 3.1) would otherwise size the draft's cache (and
    # SmartSpec's start-up profile) for its full context.
    target, draft = models
    cap = 32  # the models' own context is 96
    engine = LLMEngine(
        target, draft_model=draft, proposer="draft", block_size=4, max_num_seqs=8, max_model_len=cap
    )
    proposer = engine.speculator.proposer
    assert engine.runner.max_model_len == proposer.runner.max_model_len == cap
    assert proposer.block_manager.num_blocks == 8 * cap // 4  # uncapped: 8 * 96 // 4
    outputs = engine.generate(prompts, GREEDY)
    for prompt, output, expected in zip(prompts, outputs, reference):
        assert output.token_ids == expected[: cap - len(prompt)]
    assert sum(len(o.token_ids) < len(e) for o, e in zip(outputs, reference)) >= 2  # cut short
    too_long = engine.generate([[1] * cap], GREEDY)[0]
    assert too_long.finish_reason == "error" and f"{cap}" in too_long.error
    with pytest.raises(ValueError, match=r"max_model_len=97: expected 2..96"):
        LLMEngine(target, max_model_len=97)
    with pytest.raises(ValueError, match=r"max_model_len=5: SmartSpec verifies up to max_k=8"):
        LLMEngine(target, proposer="ngram", max_model_len=5)
