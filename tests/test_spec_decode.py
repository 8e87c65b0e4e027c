"""Lossless speculative decoding (kiln.engine.spec_decode): the brief's properties 1-4 and 9."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from engine_models import build_tiny_llama, hf_greedy
from scipy.stats import chisquare
from transformers import LlamaConfig, LlamaForCausalLM

from kiln.engine import LLMEngine
from kiln.engine.model_runner import ModelRunner
from kiln.engine.params import SamplingParams
from kiln.engine.spec_decode import (
    DraftModelProposer,
    NgramProposer,
    Speculator,
    verify_greedy,
    verify_sampled,
)
from kiln.engine.speculation_api import Proposal, SpecRequestState, StepStats

VOCAB, K, TRIALS = 8, 3, 20_000


def _markov(seed: int) -> torch.Tensor:
    """A random next-token table [V, V], no entry below 1/(2V) so every chi-square cell is full."""
    torch.manual_seed(seed)
    rows = torch.distributions.Dirichlet(torch.ones(VOCAB)).sample((VOCAB,))
    return 0.5 * rows + 0.5 / VOCAB


TARGET, DRAFT = _markov(1), _markov(2)  # p(x | previous token), q(x | previous token)
START = 0  # the context's last token


def _step(verifier, context_last: torch.Tensor, generator: torch.Generator) -> list[list[int]]:
    """One speculative step per trial: draft K tokens from the draft chain, verify them."""
    drafts, previous = [], context_last
    for _ in range(K):
        previous = torch.multinomial(DRAFT[previous], 1, generator=generator).squeeze(1)
        drafts.append(previous)
    drafts = torch.stack(drafts, 1)  # [trials, K]
    conditioning = torch.cat([context_last[:, None], drafts], 1)  # token before each position
    return [
        verifier(TARGET[cond], DRAFT[cond[:K]], draft.tolist(), generator)
        for cond, draft in zip(conditioning, drafts)
    ]


def _first_two_tokens(verifier, trials: int = TRIALS) -> np.ndarray:
    """Index t1·V + t2 of the first two emitted tokens, running a second step when needed."""
    generator = torch.Generator().manual_seed(1234)
    first = _step(verifier, torch.full((trials,), START), generator)
    short = [i for i, out in enumerate(first) if len(out) == 1]
    second = _step(
        verifier, torch.tensor([first[i][0] for i in short], dtype=torch.long), generator
    )
    for i, out in zip(short, second):
        first[i] = first[i] + out
    return np.array([out[0] * VOCAB + out[1] for out in first])


def _p_value(pairs: np.ndarray, first_only: bool) -> float:
    if first_only:
        observed = np.bincount(pairs // VOCAB, minlength=VOCAB)
        expected = TARGET[START].double().numpy()
    else:
        observed = np.bincount(pairs, minlength=VOCAB * VOCAB)
        expected = (TARGET[START][:, None] * TARGET).double().flatten().numpy()
    return chisquare(observed, expected / expected.sum() * len(pairs)).pvalue


def _resample_from_target(target_probs, draft_probs, draft_tokens, generator):
    """A biased verifier (negative control): at a rejection it samples p, not the residual."""
    for j, token in enumerate(draft_tokens):
        u = torch.rand((), generator=generator)
        if u * draft_probs[j, token] > target_probs[j, token]:
            return [
                *draft_tokens[:j],
                int(torch.multinomial(target_probs[j], 1, generator=generator)),
            ]
    return [*draft_tokens, int(torch.multinomial(target_probs[-1], 1, generator=generator))]


def _accept_always(target_probs, draft_probs, draft_tokens, generator):
    return [*draft_tokens, int(torch.multinomial(target_probs[-1], 1, generator=generator))]


def test_sampled_verification_reproduces_the_target_distribution():
    pairs = _first_two_tokens(verify_sampled)
    assert _p_value(pairs, first_only=True) > 1e-3
    assert _p_value(pairs, first_only=False) > 1e-3


@pytest.mark.parametrize("biased", [_resample_from_target, _accept_always])
def test_biased_verifiers_fail_the_same_test(biased):
    pairs = _first_two_tokens(biased, trials=TRIALS // 4)
    assert min(_p_value(pairs, True), _p_value(pairs, False)) < 1e-6


def test_point_mass_drafts_accept_with_target_probability_and_never_resample_the_draft():
    target = torch.tensor([[0.3, 0.7, 0.0], [0.2, 0.2, 0.6]])
    generator = torch.Generator().manual_seed(0)
    outs = [verify_sampled(target, None, [1], generator) for _ in range(4000)]
    accepted = np.mean([len(out) == 2 for out in outs])
    assert abs(accepted - 0.7) < 0.03  # P(accept) = p(x)
    assert all(out[0] == 0 for out in outs if len(out) == 1)  # residual puts no mass on x
    # q(x) = 0: rejected, no NaN, the residual is p itself here.
    draft_probs = torch.tensor([[0.0, 0.0, 1.0]])
    assert all(len(verify_sampled(target, draft_probs, [1], generator)) == 1 for _ in range(50))


def test_each_step_emits_between_one_and_k_plus_one_tokens():
    generator = torch.Generator().manual_seed(0)
    lengths = {
        len(out) for out in _step(verify_sampled, torch.zeros(500, dtype=torch.long), generator)
    }
    assert lengths <= set(range(1, K + 2)) and len(lengths) > 2
    assert len(verify_sampled(TARGET[:1], None, [], generator)) == 1  # k = 0: a plain sample


def test_greedy_verification_equals_step_by_step_argmax():
    logits = torch.randn(5, 11, generator=torch.Generator().manual_seed(0))
    argmax = logits.argmax(-1).tolist()
    for agree in range(5):
        drafts = argmax[:agree] + [(argmax[agree] + 1) % 11] * (4 - agree)
        assert verify_greedy(logits, drafts) == argmax[: agree + 1]
    assert verify_greedy(logits, argmax[:4]) == argmax  # all accepted, plus the bonus argmax
    assert verify_greedy(logits[:1], []) == argmax[:1]


def test_ngram_proposer_continues_the_latest_longest_match():
    proposer = NgramProposer(min_n=1, max_n=3)
    # "5 6 7" occurs earlier twice; the latest occurrence continues with 9 1.
    assert proposer.lookup([5, 6, 7, 8, 2, 5, 6, 7, 9, 1, 3, 5, 6, 7], k=2) == [9, 1]
    assert proposer.lookup([1, 2, 3, 4, 2], k=5) == [3, 4, 2]  # bigram missing, unigram "2"
    assert proposer.lookup([1, 2, 3, 4], k=3) == []  # no earlier occurrence: no proposal
    assert proposer.lookup([7], k=3) == []
    assert NgramProposer(min_n=2, max_n=3).lookup([1, 2, 3, 4, 2], k=2) == []


def _tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    return LlamaForCausalLM(config).double().eval()


def _state(
    rid: str, tokens: list[int], temperature: float = 0.0, k: int = 8, stop=frozenset()
) -> SpecRequestState:
    params = SamplingParams(max_tokens=32, temperature=temperature)
    generator = torch.Generator().manual_seed(7)
    return SpecRequestState(rid, tokens, len(tokens), params, generator, k, frozenset(stop))


@torch.inference_mode()
def test_draft_equal_to_target_is_always_accepted_and_rolls_its_cache_back():
    model = _tiny_llama()
    proposer = DraftModelProposer(model)
    context = [3, 17, 5, 9, 41]
    for _ in range(3):  # later rounds reuse the cache
        proposal = proposer.propose([_state("a", context)], {"a": 4})["a"]
        assert proposal.probs is None  # greedy: a point mass
        logits = model(torch.tensor([context + proposal.token_ids])).logits[0, -5:]
        emitted = verify_greedy(logits, proposal.token_ids)
        assert emitted[:4] == proposal.token_ids and len(emitted) == 5
        context = context + emitted
    # Rollback: only two drafts accepted, then a different token; the cropped cache must give
    # what a fresh proposer computes from scratch.
    proposal = proposer.propose([_state("a", context)], {"a": 4})["a"]
    context = context + proposal.token_ids[:2] + [(proposal.token_ids[2] + 1) % 64]
    cached = proposer.propose([_state("a", context)], {"a": 4})["a"].token_ids
    assert (
        cached == DraftModelProposer(model).propose([_state("b", context)], {"b": 4})["b"].token_ids
    )
    proposer.free("a")
    assert "a" not in proposer._cached
    proposer.block_manager.check_invariants()
    assert proposer.block_manager.num_free_blocks == proposer.block_manager.num_blocks


@torch.inference_mode()
def test_proposals_end_at_a_stop_token():
    """Drafts after a stop token can never be kept: both proposers end the proposal there
    (negative control: the same calls without the stop token propose past it)."""
    ngram = NgramProposer()
    tokens = [4, 5, 6, 7, 8, 4, 5]
    assert ngram.propose([_state("a", tokens)], {"a": 4})["a"].token_ids == [6, 7, 8, 4]
    assert ngram.propose([_state("a", tokens, stop={7})], {"a": 4})["a"].token_ids == [6, 7]
    model = _tiny_llama()
    context = [3, 17, 5, 9, 41]
    free = DraftModelProposer(model).propose([_state("a", context)], {"a": 4})["a"].token_ids
    stop = free[1]
    assert stop not in free[:1], "pick a context whose second draft is new"
    stopped = DraftModelProposer(model).propose([_state("a", context, stop={stop})], {"a": 4})
    assert stopped["a"].token_ids == free[:2]


@torch.inference_mode()
def test_batched_drafts_equal_one_request_at_a_time():
    model = _tiny_llama()
    batched = DraftModelProposer(model)
    contexts = {"a": [3, 17, 5, 9, 41], "b": [8] * 20, "c": [1, 2]}
    k = {"a": 4, "b": 1, "c": 3}
    for _ in range(2):  # the second round rolls back the unfed last draft and reuses the rest
        together = batched.propose([_state(rid, c) for rid, c in contexts.items()], k)
        for rid, context in contexts.items():
            alone = DraftModelProposer(model).propose([_state(rid, context)], {rid: k[rid]})
            assert together[rid].token_ids == alone[rid].token_ids
            contexts[rid] = context + together[rid].token_ids[:1] + [7]
    assert batched.propose([_state("a", contexts["a"])], {"a": 0}) == {}


def test_sampled_draft_returns_the_distributions_its_tokens_came_from():
    proposer = DraftModelProposer(_tiny_llama())
    proposal = proposer.propose([_state("a", [1, 2, 3], temperature=0.8)], {"a": 3})["a"]
    assert proposal.probs.shape == (3, 64)
    assert torch.allclose(proposal.probs.sum(-1), torch.ones(3, dtype=proposal.probs.dtype))
    assert all(proposal.probs[j, t] > 0 for j, t in enumerate(proposal.token_ids))


def test_speculator_with_ngram_and_fixed_k_wires_propose_verify_observe():
    speculator = Speculator(NgramProposer(), fixed_k=3)
    states = [_state("a", [4, 5, 6, 7, 4, 5], k=2), _state("b", [1, 2, 3])]
    k = speculator.choose_k(states)
    assert k == {"a": 2}  # capped by max_new_proposals; "b" has no match
    proposals = speculator.propose(states, k)
    assert proposals == {"a": Proposal([6, 7])}
    logits = torch.full((3, 10), -5.0)
    logits[0, 6] = logits[1, 0] = logits[2, 1] = 5.0  # target agrees with 6, then says 0
    out = speculator.verify(states, proposals, {"a": logits, "b": logits[:1]})
    assert out == {"a": [6, 0], "b": [6]}
    stats = StepStats(2, 4, 9, {"a": 2, "b": 0}, {"a": 1, "b": 0}, {"a": 2}, 3, 0.0, 0.01, 0.01)
    speculator.observe(stats)
    assert speculator.estimator.alpha("a") < speculator.estimator.alpha() < 0.7


def test_smartspec_speculator_calibrates_on_a_model_runner():
    speculator = Speculator(NgramProposer(), fixed_k=None, max_k=4)
    with pytest.raises(RuntimeError, match="calibrate"):
        speculator.choose_k([_state("a", [1, 2, 1, 2, 1])])
    runner = ModelRunner(_tiny_llama().float(), num_blocks=16, block_size=16)
    speculator.calibrate(runner, max_num_seqs=4)
    k = speculator.choose_k([_state("a", [1, 2, 1, 2, 1])])
    assert 0 <= k["a"] <= 2 and "spec_goodput_predicted" in speculator.metrics()


@torch.inference_mode()
def test_draft_time_samples_carry_the_catch_up_and_every_draft_that_ran():
    # The draft only runs for requests that speculate, so a call first feeds the request's
    # prompt or the steps since it last drafted: a feature of its own in the time model (read
    # as k passes, it kept SmartSpec at k = 0; BENCHMARKS.md, SmartSpec), predicted before the
    # call exactly as the call then feeds it.
    speculator = Speculator(DraftModelProposer(_tiny_llama().float()), fixed_k=None, max_k=4)
    speculator.calibrate(ModelRunner(_tiny_llama().float(), 32, 16), max_num_seqs=2)
    draft_model = speculator.controller.time_model.draft
    proposer = speculator.proposer

    def drafting_step(context: list[int], k: int, drafted: int, accepted: int) -> list[int]:
        predicted = proposer.catch_up_tokens(_state("a", context))
        drafts = speculator.propose([_state("a", context)], {"a": k})["a"].token_ids
        assert proposer.catch_up_fed == predicted
        proposed = min(k, accepted + 1)  # the estimator's count stops at the first rejection
        stats = StepStats(1, k + 1, len(context), {"a": proposed}, {"a": accepted},
                          {"a": drafted}, accepted + 1, 5.0, 0.01, 5.01)  # fmt: skip
        speculator.observe(stats)
        return context + drafts[:accepted] + [7]  # then a token the draft did not propose

    context = [3, 17, 5, 9, 41, 8, 8, 2]
    context = drafting_step(context, k=2, drafted=2, accepted=1)  # the prompt
    assert draft_model._observed[-1][0] == [1, 2, 2, 7]
    context = drafting_step(context, k=2, drafted=2, accepted=1)  # in step: one token fed
    assert draft_model._observed[-1][0] == [1, 2, 2, 0]
    # All four drafts ran, though the estimator counts one (the first was rejected).
    context = drafting_step(context, k=4, drafted=4, accepted=0)
    assert draft_model._observed[-1][0] == [1, 4, 4, 0]
    # Three plain steps later the draft must catch up their three tokens.
    drafting_step([*context, 5, 6, 9], k=1, drafted=1, accepted=0)
    assert draft_model._observed[-1][0] == [1, 1, 1, 3]


@pytest.fixture(scope="module")
def engine_models(tmp_path_factory):
    torch.set_num_threads(1)
    target = build_tiny_llama(tmp_path_factory.mktemp("target"), seed=0)
    draft = build_tiny_llama(tmp_path_factory.mktemp("draft"), seed=1)  # same tokenizer
    return target, draft


def test_batched_draft_proposer_in_the_engine_matches_hf_generate_and_frees_every_block(
    engine_models,
):
    target, draft = engine_models
    rng = random.Random(3)
    prompts = [[1] + [rng.randrange(3, 250) for _ in range(n)] for n in (2, 9, 17, 30)]
    greedy = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=16, temperature=0.9, seed=5)
    engine = LLMEngine(
        target, draft_model=draft, proposer="draft", speculation=3, block_size=4, max_num_seqs=8
    )
    outputs = engine.generate([*prompts, prompts[1]], [greedy] * len(prompts) + [sampled])
    assert [o.token_ids for o in outputs[:-1]] == hf_greedy(target, prompts, 16)
    proposed = sum(o.spec_stats["proposed"] for o in outputs)
    assert 0 < sum(o.spec_stats["accepted"] for o in outputs) < proposed  # rollbacks happened
    for blocks in (engine.block_manager, engine.speculator.proposer.block_manager):
        blocks.check_invariants()
        assert blocks.num_free_blocks == blocks.num_blocks


def test_smartspec_choosing_zero_runs_no_draft_forward(engine_models, monkeypatch):
    target, draft = engine_models
    engine = LLMEngine(target, draft_model=draft, proposer="draft", block_size=4, max_num_seqs=4)
    time_model = engine.speculator.controller.time_model
    time_model.draft.coefficients = [1.0, 1.0, 1.0, 0.0]  # a second per draft: never pays
    time_model.refit_every = 10**9
    proposer = engine.speculator.proposer

    def no_forward(batch):
        raise AssertionError("a draft forward ran although every k was 0")

    monkeypatch.setattr(proposer.runner, "execute", no_forward)
    outputs = engine.generate([[1, 5, 6, 7], [1, 9]], SamplingParams(max_tokens=8, temperature=0))
    assert all(o.spec_stats["proposed"] == 0 and o.finished for o in outputs)
