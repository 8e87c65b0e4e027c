"""Serving throughput: kiln's LLMEngine against Hugging Face `generate` on the same model.

    python benchmarks/engine_throughput.py [--max-tokens 64] [--threads 2] [--model PATH]  # CPU
    python benchmarks/engine_throughput.py --gpu                            # CUDA, 1.1B config

CPU: the `pretrain_lm --preset tiny` model (from the kiln cache; trained there first if
missing), or --model. Prompts are text-world prompts; every request generates exactly `--max-tokens`
tokens (EOS ignored on both sides), greedy. For 1, 8 and 32 concurrent requests it reports
generated tokens/s of
- kiln: all requests submitted at once to `LLMEngine.generate` (continuous batching);
- HF sequential: `model.generate` one request at a time (measured on up to 8 requests; its
  rate does not depend on how many are waiting);
- HF static batch: `model.generate` on all requests at once, left-padded.

GPU (`--gpu`): a 1.1B Llama config (hidden 2048, 22 layers, 32 heads, 4 KV heads, vocab 32000,
random weights, bf16). Batch-1 decode tokens/s against the memory-bandwidth roofline (weight
bytes / measured device copy bandwidth: each decode step must read every weight once), and
tokens/s at 32 concurrent requests, with HF `generate` at batch 1 and 32 for scale.
Prints a JSON record; BENCHMARKS.md keeps the latest.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from kiln.engine import LLMEngine, SamplingParams
from kiln.worlds.text import TextWorld

CONCURRENCY = (1, 8, 32)


def kiln_tokens_per_s(engine: LLMEngine, prompts, max_tokens: int) -> float:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    engine.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0))  # warm-up
    start = time.perf_counter()
    outputs = engine.generate(prompts, params)
    elapsed = time.perf_counter() - start
    assert all(len(o.token_ids) == max_tokens for o in outputs)
    return len(prompts) * max_tokens / elapsed


@torch.inference_mode()
def hf_tokens_per_s(model, prompts, max_tokens: int, batch: bool, pad_id: int) -> float:
    device = next(model.parameters()).device
    groups = [prompts] if batch else [[p] for p in prompts]
    kwargs = dict(
        max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, pad_token_id=pad_id
    )
    model.generate(torch.tensor([prompts[0]], device=device), max_new_tokens=2, pad_token_id=pad_id)
    start = time.perf_counter()
    for group in groups:
        width = max(len(p) for p in group)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in group], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group], device=device)
        out = model.generate(ids, attention_mask=mask, **kwargs)
        assert out.shape[1] == width + max_tokens
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(prompts) * max_tokens / (time.perf_counter() - start)


def run_cpu(args) -> dict:
    torch.set_num_threads(args.threads)
    # Imported here: the GPU machines run --gpu without Ray, which the jobs package needs.
    from jobs.pretrain_lm import pretrained_model

    path = args.model or pretrained_model("tiny")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    pad_id = model.config.pad_token_id or 0
    engine = LLMEngine(path, max_num_seqs=32, max_num_batched_tokens=1024, device="cpu")
    rows = []
    for n in CONCURRENCY:
        prompts = [tokenizer(e.prompt).input_ids for e in TextWorld().split("test", n)]
        kiln = kiln_tokens_per_s(engine, prompts, args.max_tokens)
        sequential = hf_tokens_per_s(model, prompts[:8], args.max_tokens, False, pad_id)
        static = hf_tokens_per_s(model, prompts, args.max_tokens, True, pad_id)
        rows.append(
            {
                "concurrent": n,
                "kiln_tok_s": round(kiln, 1),
                "hf_sequential_tok_s": round(sequential, 1),
                "hf_static_batch_tok_s": round(static, 1),
                "kiln_vs_hf_sequential": round(kiln / sequential, 2),
                "kiln_vs_hf_static": round(kiln / static, 2),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    engine.block_manager.check_invariants()
    return {"model": str(path), "threads": args.threads, "rows": rows}


def copy_bandwidth_bytes_per_s(device) -> float:
    """Device memory bandwidth from a large copy (reads + writes)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    torch.cuda.synchronize()
    return 2 * src.numel() * 10 / (time.perf_counter() - start)


def run_gpu(args) -> dict:
    assert torch.cuda.is_available(), "--gpu needs CUDA"
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=2048,
    )
    workdir = Path(tempfile.mkdtemp())
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(workdir / "model")
    path = workdir / "model"
    weight_bytes = sum(
        p.numel() * p.element_size()
        for p in AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).parameters()
    )
    bandwidth = copy_bandwidth_bytes_per_s("cuda")
    roofline = bandwidth / weight_bytes
    # Random weights have no tokenizer: synthetic prompts of 8-24 token ids.
    vocab = config.vocab_size
    prompts = [[1 + (7 * i + j) % (vocab - 1) for j in range(8 + i % 17)] for i in range(32)]
    engine = LLMEngine(path, max_num_seqs=64, max_num_batched_tokens=2048, device="cuda")
    batch1 = kiln_tokens_per_s(engine, prompts[:1], args.max_tokens)
    batch32 = kiln_tokens_per_s(engine, prompts, args.max_tokens)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    hf1 = hf_tokens_per_s(hf, prompts[:1], args.max_tokens, False, 0)
    hf32 = hf_tokens_per_s(hf, prompts, args.max_tokens, True, 0)
    return {
        "model": "1.1B Llama config, random weights, bf16",
        "device": torch.cuda.get_device_name(),
        "weight_gb": round(weight_bytes / 1e9, 3),
        "copy_bandwidth_gb_s": round(bandwidth / 1e9, 1),
        "roofline_batch1_tok_s": round(roofline, 1),
        "kiln_batch1_tok_s": round(batch1, 1),
        "kiln_batch1_fraction_of_roofline": round(batch1 / roofline, 3),
        "kiln_batch32_tok_s": round(batch32, 1),
        "hf_batch1_tok_s": round(hf1, 1),
        "hf_batch32_tok_s": round(hf32, 1),
        "kiln_vs_hf_batch32": round(batch32 / hf32, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-tokens", type=int, default=64, help="generated tokens per request")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (CPU mode)")
    parser.add_argument(
        "--model", type=Path, help="CPU mode: a Llama checkpoint (default: the tiny preset)"
    )
    parser.add_argument("--gpu", action="store_true", help="the 1.1B bf16 benchmark on CUDA")
    args = parser.parse_args()
    record = run_gpu(args) if args.gpu else run_cpu(args)
    record |= {"date": date.today().isoformat(), "machine": platform.machine(), "args": vars(args)}
    print(json.dumps(record, indent=2, default=str))


if __name__ == "__main__":
    main()
