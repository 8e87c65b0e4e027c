"""Request life cycle: abort, bad input, seeded sampling, stop conditions, streaming.

Also unit tests of the pieces the engine is built from: the block manager's free list and
rollback, the scheduler's token budget and FCFS order, and the sampler's filters.
"""

import asyncio

import pytest
import torch
from engine_models import build_tiny_llama

from kiln.engine import LLMEngine, SamplingParams
from kiln.engine.block_manager import BlockManager
from kiln.engine.sampler import probs_from_logits, sample_from_probs
from kiln.engine.scheduler import Request, Scheduler


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    torch.set_num_threads(1)
    path = build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), max_positions=64)
    return LLMEngine(path, block_size=4, max_num_batched_tokens=32, max_num_seqs=8)


def assert_no_leak(engine: LLMEngine) -> None:
    engine.block_manager.check_invariants()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.has_unfinished_requests()


def test_abort_mid_generation_frees_blocks(engine):
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    engine.add_request("keep", [1, 5, 6, 7], params)
    engine.add_request("drop", [1, 8, 9, 10, 11, 12], params)
    for _ in range(5):
        engine.step()
    assert engine.block_manager.block_table("drop")
    engine.abort("drop")
    assert not engine.block_manager.block_table("drop")
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    assert final["drop"].finish_reason == "abort" and 0 < len(final["drop"].token_ids) < 30
    assert final["keep"].finish_reason == "length" and len(final["keep"].token_ids) == 30
    assert_no_leak(engine)


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        ([], SamplingParams(max_tokens=4), "empty"),
        (list(range(1, 65)), SamplingParams(max_tokens=4), "context"),
        ([1, 2], {"max_tokens": 0}, "max_tokens"),
        ([1, 2], {"max_tokens": 4, "temperature": -1.0}, "temperature"),
        ([1, 2], {"max_tokens": 4, "top_p": 0.0}, "top_p"),
        ([1, 2], SamplingParams(max_tokens=4, stop_token_ids=[10**6]), "stop_token_ids"),
        ([1, 99999], SamplingParams(max_tokens=4), "vocabulary"),
    ],
)
def test_bad_request_fails_alone(engine, prompt, params, message):
    good = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    outputs = engine.generate([[1, 5, 6], prompt, [1, 7]], [good, params, good])
    bad = outputs[1]
    assert bad.finished and bad.finish_reason == "error" and message in bad.error
    assert [o.finish_reason for o in (outputs[0], outputs[2])] == ["length", "length"]
    assert len(outputs[0].token_ids) == 6
    assert_no_leak(engine)


def test_sampling_params_validation_names_the_field():
    for field, kwargs in [
        ("max_tokens", {"max_tokens": -1}),
        ("temperature", {"temperature": -0.5}),
        ("top_p", {"top_p": 1.5}),
        ("top_k", {"top_k": -1}),
        ("stop", {"stop": "x"}),
    ]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**kwargs)


def test_seeded_sampling_is_reproducible_across_batches(engine):
    seeded = SamplingParams(max_tokens=12, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    alone = engine.generate([[1, 5, 6, 7]], seeded)[0].token_ids
    other = SamplingParams(max_tokens=12, temperature=1.0)
    crowded = engine.generate([[1, 9, 9], [1, 5, 6, 7], [1, 3]], [other, seeded, other])
    assert crowded[1].token_ids == alone
    reseeded = SamplingParams(max_tokens=12, temperature=1.0, top_k=50, top_p=0.9, seed=8)
    assert engine.generate([[1, 5, 6, 7]], reseeded)[0].token_ids != alone
    assert_no_leak(engine)


def test_stop_strings_end_and_are_trimmed(engine):
    free = engine.generate("a", SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    stop = free.text[5:8]
    assert stop.strip(), f"pick a visible stop string from {free.text!r}"
    out = engine.generate("a", SamplingParams(max_tokens=24, temperature=0, stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == free.text[: free.text.index(stop)]
    assert stop not in out.text


def test_stop_token_ids_end_generation(engine):
    greedy = {"max_tokens": 16, "temperature": 0, "ignore_eos": True}
    free = engine.generate([[1, 4]], SamplingParams(**greedy))[0]
    stopper = free.token_ids[3]
    out = engine.generate([[1, 4]], SamplingParams(**greedy, stop_token_ids=[stopper]))[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == free.token_ids[: free.token_ids.index(stopper) + 1]


def test_stream_yields_increments_ending_in_generates_text(engine):
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    expected = engine.generate(["12+3", "copy"], params)

    async def consume(prompt):
        return [out async for out in engine.stream(prompt, params)]

    async def both():
        return await asyncio.gather(consume("12+3"), consume("copy"))

    for streamed, final in zip(asyncio.run(both()), expected):
        lengths = [len(o.token_ids) for o in streamed]
        assert lengths == sorted(lengths) and lengths[-1] == 10 and len(streamed) >= 10
        assert [o.finished for o in streamed] == [False] * (len(streamed) - 1) + [True]
        assert streamed[-1].text == final.text and streamed[-1].token_ids == final.token_ids
    assert_no_leak(engine)


def test_block_manager_rollback_and_free_keep_the_free_list_whole():
    manager = BlockManager(num_blocks=6, block_size=4)
    assert manager.allocate("a", 9)  # 3 blocks
    assert manager.allocate("b", 8)  # 2 blocks
    assert not manager.allocate("a", 8), "needs 2 more, 1 free: all or nothing"
    assert manager.num_slots["a"] == 9 and manager.num_free_blocks == 1
    manager.rollback("a", 5)  # 4 slots left -> 1 block
    assert len(manager.block_table("a")) == 1 and manager.num_free_blocks == 3
    manager.check_invariants()
    with pytest.raises(ValueError):
        manager.rollback("a", 5)
    manager.free("a")
    manager.free("b")
    manager.check_invariants()
    assert manager.num_free_blocks == 6
    manager.free_blocks.append(0)  # a double free
    with pytest.raises(AssertionError):
        manager.check_invariants()


def _request(rid: str, n: int, arrival: int) -> Request:
    return Request(rid, list(range(1, n + 1)), SamplingParams(4), torch.Generator(), arrival)


def test_scheduler_budget_chunks_and_fcfs():
    scheduler = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=10)
    for i, n in enumerate((7, 6, 3)):
        scheduler.add(_request(f"r{i}", n, i))
    first = scheduler.schedule({})
    assert [(s.request.request_id, s.num_new_tokens) for s in first.scheduled] == [
        ("r0", 7),
        ("r1", 3),  # chunk: the budget had 3 left
    ]
    first.scheduled[0].request.num_computed_tokens = 7
    first.scheduled[0].request.token_ids.append(42)  # r0 sampled a token
    first.scheduled[1].request.num_computed_tokens = 3
    second = scheduler.schedule({"r0": 2})
    plan = [(s.request.request_id, s.num_new_tokens, s.num_lookahead) for s in second.scheduled]
    assert plan == [("r0", 1, 2), ("r1", 3, 0)]  # r2 waits: max_num_seqs=2


def test_lookahead_goes_to_requests_that_reach_their_last_token():
    """Drafts can be verified wherever the last position is sampled: a decode or a prompt's
    final chunk (a new admission included), within the budget; a partial chunk gets none.
    ready_to_sample previews exactly the requests that reach their last token."""
    scheduler = Scheduler(BlockManager(64, 4), max_num_seqs=3, max_num_batched_tokens=10)
    for i, n in enumerate((5, 6, 3)):
        scheduler.add(_request(f"r{i}", n, i))
    assert [r.request_id for r in scheduler.ready_to_sample()] == ["r0"]  # 5 + 6 > 10
    first = scheduler.schedule({"r0": 2, "r1": 2})
    plan = [(s.request.request_id, s.num_new_tokens, s.num_lookahead) for s in first.scheduled]
    assert plan == [("r0", 5, 2), ("r1", 3, 0)]  # r1: a 3-token chunk of 6, no drafts
    r0, r1 = (s.request for s in first.scheduled)
    r0.num_computed_tokens, r1.num_computed_tokens = 5, 3
    r0.token_ids.append(42)
    assert [r.request_id for r in scheduler.ready_to_sample()] == ["r0", "r1", "r2"]
    second = scheduler.schedule({"r0": 1, "r1": 2, "r2": 4})
    plan = [(s.request.request_id, s.num_new_tokens, s.num_lookahead) for s in second.scheduled]
    assert plan == [("r0", 1, 1), ("r1", 3, 2), ("r2", 3, 0)]  # r2: the budget is spent


def test_scheduler_preempts_latest_arrival_when_blocks_run_out():
    manager = BlockManager(4, 4)
    scheduler = Scheduler(manager, max_num_seqs=4, max_num_batched_tokens=64)
    old, new = _request("old", 8, 0), _request("new", 8, 1)
    scheduler.add(old)
    scheduler.add(new)
    scheduler.schedule({})  # both prefilled: 4 blocks used
    for req in (old, new):
        req.num_computed_tokens = 8
        req.token_ids.append(5)
    plan = scheduler.schedule({})
    assert plan.preempted == ["new"] and [s.request for s in plan.scheduled] == [old]
    assert new.num_computed_tokens == 0 and scheduler.waiting[0] is new
    manager.check_invariants()


def test_sampler_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert probs_from_logits(logits, SamplingParams(temperature=0)).tolist() == [[1, 0, 0, 0]]
    top2 = probs_from_logits(logits, SamplingParams(top_k=2))
    assert (top2[0, 2:] == 0).all() and torch.isclose(top2.sum(), torch.tensor(1.0))
    nucleus = probs_from_logits(logits, SamplingParams(top_p=0.7))  # p = .64, .24, .09, .03
    assert (nucleus[0, :2] > 0).all() and (nucleus[0, 2:] == 0).all()
    probs = torch.tensor([[0.1, 0.6, 0.3, 0.0]]).expand(20000, 4)
    draws = sample_from_probs(probs, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4) / len(draws)
    assert torch.allclose(freq, probs[0], atol=0.015) and freq[3] == 0
