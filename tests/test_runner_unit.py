"""Runner pieces in isolation: the sharded data order, the LR schedule, the DeepSpeed config."""

import pytest

from jobs.runner import DataOrder, deepspeed_config, lr_multiplier
from kiln.config import RunnerConfig


def _order(size=50, world=2, **runner):
    return DataOrder(size, RunnerConfig(num_workers=world, **runner), world)


def test_one_epoch_visits_every_sample_once_across_ranks_and_micro_steps():
    order = _order(size=48, world=2, micro_batch_size=4, grad_accum_steps=3)
    seen = [
        i for step in (1, 2) for m in range(3) for r in range(2) for i in order.indices(step, m, r)
    ]
    assert sorted(seen) == list(range(48))


def test_order_is_a_pure_function_of_seed_and_step():
    a, b = _order(seed=3), _order(seed=3)
    later_first = [b.indices(9, 0, 1), b.indices(2, 0, 0)]  # any query order
    assert [a.indices(9, 0, 1), a.indices(2, 0, 0)] == later_first
    assert _order(seed=4).indices(2, 0, 0) != a.indices(2, 0, 0)
    # Next epoch is a fresh permutation, not a repeat of the first.
    first_epoch = [a.indices(s, 0, r) for s in range(1, 4) for r in range(2)]
    second_epoch = [a.indices(s, 0, r) for s in range(6, 9) for r in range(2)]
    assert first_epoch != second_epoch


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    runner = RunnerConfig(warmup_steps=10, max_steps=110)
    assert lr_multiplier(0, runner) == pytest.approx(0.1)
    assert lr_multiplier(9, runner) == pytest.approx(1.0)
    assert lr_multiplier(10, runner) == pytest.approx(1.0)
    assert lr_multiplier(60, runner) == pytest.approx(0.55)
    assert lr_multiplier(110, runner) == pytest.approx(0.1)


def test_deepspeed_config_follows_the_runner_config():
    cpu = deepspeed_config(RunnerConfig(zero_stage=2, micro_batch_size=8, grad_accum_steps=2))
    assert cpu["zero_optimization"] == {"stage": 2, "reduce_scatter": False}
    assert cpu["train_micro_batch_size_per_gpu"] == 8 and cpu["gradient_accumulation_steps"] == 2
    assert cpu["optimizer"]["params"]["torch_adam"] is True
    gpu = deepspeed_config(
        RunnerConfig(use_gpu=True, zero_stage=3, precision="bf16", offload_params=True)
    )
    assert gpu["zero_optimization"] == {"stage": 3, "offload_param": {"device": "cpu"}}
    assert gpu["bf16"]["enabled"] and not gpu["fp16"]["enabled"]
