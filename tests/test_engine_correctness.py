"""The engine's greedy tokens equal Hugging Face `generate`, however the work is cut up.

Mixed-length batches, chunked prefill (prompts longer than the step's token budget) and
preemption by recompute (a KV cache too small for every request) must all reproduce HF greedy
decoding token for token, and leave the block free list whole. Two negative controls show the
comparison has teeth: a runner that forgets one KV block, and one whose decode positions are off
by one, both fail it.
"""

import json
import random
import shutil
import subprocess
import sys

import pytest
import torch
from engine_models import build_tiny_llama, hf_greedy
from transformers import GenerationConfig

from conftest import REPO
from kiln.engine import LLMEngine, SamplingParams

MAX_NEW = 20
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.set_num_threads(1)
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(0)
    return [[1] + [rng.randrange(3, 250) for _ in range(n)] for n in (2, 7, 13, 21, 30, 41)]


@pytest.fixture(scope="module")
def reference(model_dir, prompts):
    # ignore_eos in the engine <-> HF generate with an eos that never occurs
    model_ref = hf_greedy(model_dir, prompts, MAX_NEW)
    assert all(len(r) == MAX_NEW for r in model_ref), "the reference stopped early at EOS"
    return model_ref


def run(model_dir, prompts, **engine_args) -> tuple[LLMEngine, list[list[int]]]:
    engine = LLMEngine(model_dir, **{"block_size": 4, **engine_args})
    outputs = engine.generate(prompts, GREEDY)
    engine.block_manager.check_invariants()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert all(o.finish_reason == "length" for o in outputs)
    return engine, [o.token_ids for o in outputs]


def test_mixed_length_batch_matches_hf_generate(model_dir, prompts, reference):
    _, tokens = run(model_dir, prompts, max_num_batched_tokens=512)
    assert tokens == reference


def test_token_prompts_and_text_prompts_agree(model_dir):
    engine = LLMEngine(model_dir, block_size=4)
    text = "12+34="
    by_text = engine.generate(text, GREEDY)[0]
    by_ids = engine.generate([engine.tokenizer(text).input_ids], GREEDY)[0]
    assert by_text.token_ids == by_ids.token_ids
    assert by_text.text == engine.tokenizer.decode(by_text.token_ids, skip_special_tokens=True)


def test_chunked_prefill_matches(model_dir, prompts, reference):
    # A budget of 8 tokens per step: the 42-token prompt is prefilled over 6 steps, and the
    # chunks share steps with other requests' decodes.
    engine, tokens = run(model_dir, prompts, max_num_batched_tokens=8)
    assert tokens == reference
    assert max(len(p) for p in prompts) > engine.scheduler.max_num_batched_tokens


def test_preemption_by_recompute_matches(model_dir, prompts, reference):
    # 24 blocks x 4 slots = 96 slots; the six requests need 194 at the end.
    engine, tokens = run(model_dir, prompts, num_blocks=24, max_num_batched_tokens=64)
    assert engine.scheduler.num_preemptions > 0
    assert tokens == reference


def test_negative_control_dropped_kv_block_is_caught(model_dir, prompts, reference, monkeypatch):
    from kiln.engine import model_runner

    original = model_runner.ModelRunner._sdpa_group

    def forget_first_block(self, members, starts, max_kv=0):
        group = original(self, members, starts, max_kv)
        group["kv_slots"][:, : self.block_size] = self.scratch_slot  # read zeros instead
        return group

    monkeypatch.setattr(model_runner.ModelRunner, "_sdpa_group", forget_first_block)
    _, tokens = run(model_dir, prompts)
    assert tokens != reference


def test_negative_control_decode_rope_off_by_one_is_caught(
    model_dir, prompts, reference, monkeypatch
):
    from kiln.engine import model_runner

    original = model_runner.ModelRunner._flatten

    def shifted_decode_positions(self, batch):
        ids, positions, slots, rows = original(self, batch)
        if all(len(b.token_ids) == 1 for b in batch):
            positions = positions + 1
        return ids, positions, slots, rows

    monkeypatch.setattr(model_runner.ModelRunner, "_flatten", shifted_decode_positions)
    _, tokens = run(model_dir, prompts)
    assert tokens != reference


# Config features of real checkpoints, each with a config change that turns the feature under
# test off (rope scaling, biases, the window; a wrong head_dim fails on shapes instead).
REAL_CHECKPOINT_VARIANTS = {
    # Llama 3.1+: llama3 rope scaling and a large theta; Llama 3.2 1B/3B tie the embeddings.
    "llama3_rope_tied_embeddings": (
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
            "tie_word_embeddings": True,
        },
        {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}},
    ),
    # head_dim apart from hidden / heads (as in Mistral-Nemo), q/k/v/o and MLP biases.
    "head_dim_and_biases": (
        {"head_dim": 16, "attention_bias": True, "mlp_bias": True},
        {"attention_bias": False, "mlp_bias": False},
    ),
    # Mistral v0.1: keys more than sliding_window positions back are masked.
    "mistral_sliding_window": (
        {"model_type": "mistral", "sliding_window": 8},
        {"sliding_window": None},
    ),
}


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("variant", REAL_CHECKPOINT_VARIANTS)
def test_real_checkpoint_config_variants_match_hf_generate(variant, prompts, tmp_path):
    features, feature_off = REAL_CHECKPOINT_VARIANTS[variant]
    path = build_tiny_llama(tmp_path, **features)
    reference = hf_greedy(path, prompts, MAX_NEW)  # stops at EOS, so the engine does too
    until_eos = SamplingParams(max_tokens=MAX_NEW, temperature=0)
    # 16 tokens a step: chunked prefill; the default budget: whole prompts, one SDPA call each
    for options in ({"max_num_batched_tokens": 16}, {}, {"attention": "flex"}):
        engine = LLMEngine(path, block_size=4, **options)
        assert [o.token_ids for o in engine.generate(prompts, until_eos)] == reference
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    # Negative control: without the feature HF answers differently, so an engine that ignored
    # it would fail the comparison above.
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | feature_off))
    assert hf_greedy(path, prompts, MAX_NEW) != reference


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "dynamic", "factor": 2.0},
        {
            "rope_type": "longrope",
            "short_factor": [1.0] * 6,  # head_dim / 2 factors
            "long_factor": [2.0] * 6,
            "original_max_position_embeddings": 32,
        },
    ],
    ids=["dynamic", "longrope"],
)
def test_a_rope_that_depends_on_the_batch_is_refused(rope, tmp_path):
    path = build_tiny_llama(tmp_path, rope_parameters={**rope, "rope_theta": 10000.0})
    with pytest.raises(ValueError, match=rf"rope_type='{rope['rope_type']}': its frequencies"):
        LLMEngine(path, block_size=4)


def test_generation_config_eos_ids_stop_like_hf_generate(model_dir, prompts, reference, tmp_path):
    # Llama 3 Instruct: generation_config.json lists EOS ids that config.json does not.
    shutil.copytree(model_dir, tmp_path, dirs_exist_ok=True)
    stop = reference[3][5]  # a token greedy decoding emits, not config.json's EOS
    eos = json.loads((model_dir / "config.json").read_text())["eos_token_id"]
    GenerationConfig(eos_token_id=[stop, eos], pad_token_id=0).save_pretrained(tmp_path)
    expected = hf_greedy(tmp_path, prompts, MAX_NEW)
    assert expected != reference  # negative control: config.json's EOS alone stops nowhere
    engine = LLMEngine(tmp_path, block_size=4)
    outputs = engine.generate(prompts, SamplingParams(max_tokens=MAX_NEW, temperature=0))
    assert [o.token_ids for o in outputs] == expected
    assert outputs[3].finish_reason == "stop" and outputs[3].token_ids[-1] == stop


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_backend_matches(model_dir, prompts, reference):
    # The GPU backend, run eagerly on CPU: same tokens as the SDPA path and HF.
    _, tokens = run(model_dir, prompts[:3], attention="flex", max_num_batched_tokens=16)
    assert tokens == reference[:3]


def test_engine_imports_without_ray_or_deepspeed():
    code = (
        "import sys, kiln.engine\n"
        "bad = [m for m in ('ray', 'deepspeed') if m in sys.modules]\n"
        "assert not bad, bad"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr


@pytest.mark.gpu
def test_gpu_bf16_flex_and_cuda_graphs_match_sdpa(model_dir, prompts):
    # On a GPU in bf16, the flex-attention + CUDA-graph path must agree with the eager SDPA path
    # (bf16 rounding makes HF equality too strict; the two kiln paths share the same arithmetic).
    sdpa = LLMEngine(model_dir, device="cuda", attention="sdpa", cuda_graphs=False)
    fast = LLMEngine(model_dir, device="cuda", attention="flex", cuda_graphs=True)
    expected = [o.token_ids for o in sdpa.generate(prompts, GREEDY)]
    assert [o.token_ids for o in fast.generate(prompts, GREEDY)] == expected
    fast.block_manager.check_invariants()
