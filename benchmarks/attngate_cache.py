"""Attention-Gate KV cache vs the full cache, measured side by side in one run.

    python benchmarks/attngate_cache.py [--prompt 1024] [--new 128] [--ratios 0.5 0.75]
        [--model PATH] [--device cpu|cuda]

For a long prompt, decodes `--new` tokens greedily with (a) the unmodified model and a
`DynamicCache` (full cache) and (b) the gated model and a `GateCache` at each eviction ratio
(0 = gate forced open: the cost of the gate and of per-head storage with nothing evicted).
Reports peak KV-cache bytes (host entries + the gate's own cache), decode tokens/s and the
gate's own compute (the MHA′ modules' share of decode time, timed with CUDA synchronisation
on a GPU). Without `--model` it uses a random Llama of the `pretrain_lm` tiny shape with a
longer context; random gates are calibrated (a global bias, by bisection) to each ratio, which
sets memory and speed exactly as a trained gate at that ratio would. Runs on CUDA when present.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, LlamaForCausalLM

from kiln import attngate


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def calibrated_gates(base, prompt: torch.Tensor, ratio: float):
    """A gated copy of `base` whose random gates evict `ratio` of the prompt's entries."""
    model = LlamaForCausalLM(copy.deepcopy(base.config)).to(prompt.device).eval()
    model.load_state_dict(base.state_dict())
    attngate.attach(model, attngate.GateConfig())
    layers = attngate.gated_layers(model)
    low, high = -20.0, 20.0
    for _ in range(16 if ratio > 0 else 0):
        middle = (low + high) / 2
        for layer in layers:
            layer.gate.score.bias.fill_(middle)
        model(prompt)
        kept = attngate.retention(model).item()
        low, high = (middle, high) if kept < 1 - ratio else (low, middle)
    for layer in layers:
        layer.gate.score.bias.fill_(high if ratio > 0 else 60.0)
    return model


@torch.no_grad()
def decode(model, cache, prompt: torch.Tensor, new_tokens: int, gate_timer: list[float]):
    """Prefill, then greedy decoding; returns decode tokens/s and peak cache bytes."""
    device = prompt.device
    logits = model(prompt, cache=cache, use_cache=True).logits
    token = logits[:, -1:].argmax(-1)
    gate_timer.clear()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(new_tokens):
        token = model(token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
    synchronize(device)
    elapsed = time.perf_counter() - start
    if isinstance(cache, attngate.GateCache):
        size = cache.kv_bytes()
    else:
        host = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
        size = {"host": host, "gate": 0, "total": host}
    # Caches only grow during one generation, so the final size is the peak.
    return new_tokens / elapsed, size, sum(gate_timer) / elapsed


def time_gates(model, device: torch.device, gate_timer: list[float]) -> None:
    def before(module, args):
        synchronize(device)
        module.started = time.perf_counter()

    def after(module, args, output):
        synchronize(device)
        gate_timer.append(time.perf_counter() - module.started)

    for layer in attngate.gated_layers(model):
        layer.gate.register_forward_pre_hook(before)
        layer.gate.register_forward_hook(after)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", type=int, default=1024, help="prompt tokens")
    parser.add_argument("--new", type=int, default=128, help="decoded tokens")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75])
    parser.add_argument("--model", help="a Llama save_pretrained folder (default: random)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per cache (median)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU intra-op threads (OpenMP barriers thrash "
        "when a small shared machine is oversubscribed; 1 keeps the comparison stable)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    if args.model:
        base = AutoModelForCausalLM.from_pretrained(args.model)
    else:
        config = LlamaConfig(
            vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=4,
            max_position_embeddings=args.prompt + args.new,
        )  # fmt: skip
        base = LlamaForCausalLM(config)
    base = base.to(device).eval()
    prompt = torch.randint(0, base.config.vocab_size, (1, args.prompt), device=device)
    timer: list[float] = []
    gated = {ratio: calibrated_gates(base, prompt, ratio) for ratio in [0.0, *args.ratios]}
    for model in gated.values():
        time_gates(model, device, timer)
    decode(base, DynamicCache(config=base.config), prompt, 4, [])  # warm-up
    # Rounds interleave the caches, so a contended machine slows them alike; median per cache.
    runs: dict[float | None, list] = {None: [], **{ratio: [] for ratio in gated}}
    for _ in range(args.repeats):
        runs[None].append(decode(base, DynamicCache(config=base.config), prompt, args.new, []))
        for ratio, model in gated.items():
            cache = attngate.GateCache(model.config)
            runs[ratio].append((*decode(model, cache, prompt, args.new, timer), cache))
    rows = []
    for ratio, results in runs.items():
        results.sort(key=lambda result: result[0])
        rate, size, gate_share, *cache = results[len(results) // 2]
        row = {"cache": "full" if ratio is None else "gate", "tokens_per_s": rate, **size}
        row["eviction"] = round(cache[0].eviction_ratio(), 3) if cache else 0.0
        if cache:
            row["gate_time_share"] = round(gate_share, 3)
        rows.append(row)
    full_rate, full_size = rows[0]["tokens_per_s"], rows[0]
    print(f"device={device}, prompt={args.prompt}, new={args.new}")
    header = "cache  eviction  peak KV bytes (host+gate)  vs full  decode tok/s  vs full  gate time"
    print(header)
    for row in rows:
        share = f"{row['gate_time_share']:.1%}" if "gate_time_share" in row else "-"
        print(
            f"{row['cache']:5}  {row['eviction']:8.3f}  {row['total']:>12,} "
            f"({row['host']:,}+{row['gate']:,})  {row['total'] / full_size['total']:6.3f}  "
            f"{row['tokens_per_s']:11.1f}  {row['tokens_per_s'] / full_rate:6.3f}  {share:>8}"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
