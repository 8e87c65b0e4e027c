"""Run a Hugging Face Llama-architecture model over a paged KV cache, many requests at once.

The runner uses the checkpoint's own modules (embedding, q/k/v/o projections, RMSNorms, MLPs,
rotary embedding, lm_head) but not its forward: the tokens of every request in the step (prefill
chunks, decode tokens, speculative drafts) are flattened into one [T, hidden] batch, so every
matmul runs once per step for the whole batch (iteration-level batching, Orca, Yu et al.
OSDI'22, over vLLM's paged KV cache, arXiv 2309.06180). Only attention is per request: each
query attends to its own request's keys, read from the cache through its block table.

KV cache: per layer a K and a V tensor of shape [num_blocks + 1, block_size, kv_heads, head_dim].
The extra block (index `num_blocks`) is scratch that padding reads from and writes into. New
keys and values are scattered into their slots before attention, so a chunk attends to its
request's earlier chunks and to itself through one code path.

Attention backends:
- "sdpa" (CPU and GPU): gather each request's keys through its block table into a padded
  [group, max_context] tensor and call `scaled_dot_product_attention` with a causal-with-offset
  mask. The gather indices come from the padded block tables in a few tensor ops per step
  (slot = table[pos // block_size] * block_size + pos % block_size), never a Python loop over
  cached positions. Short queries (decodes, drafts) share one padded call; each long prefill
  chunk gets its own, so padding does not multiply its cost.
- "flex" (GPU; also runs eagerly on CPU): `flex_attention` directly over the whole paged cache
  with a block mask "query t may read slot s iff s holds a position <= t's position of t's own
  request", so no keys are gathered and foreign blocks are skipped.
A Mistral config's `sliding_window` (v0.1) adds "and fewer than `sliding_window` positions
back" to both masks, as Hugging Face's sliding-window causal mask does (HF's Llama ignores the
key, and so does the runner).
Decode-only steps on CUDA replay CUDA graphs captured per batch-size bucket (`cuda_graphs=True`),
removing the kernel-launch overhead that dominates small-batch decoding. The graphs use the
sdpa path with keys padded to `max_model_len` so every shape is static.

Logits are returned for the last `num_logits` query positions of each request: 1 for a decode or
a completed prompt, 1 + k for speculative verification, 0 for a mid-prompt chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

SHORT_QUERY = 16  # queries up to this long share one padded SDPA call
GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass
class ForwardInput:
    """One request's share of a forward pass."""

    token_ids: list[int]  # the query tokens of this step
    start_pos: int  # position of token_ids[0] = number of this request's tokens already cached
    block_table: list[int]  # physical blocks covering positions 0 .. start_pos + len(token_ids)
    num_logits: int  # return logits of the last num_logits query positions


def _fuse_linears(*linears: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for linears that read the same input: one matmul instead of
    several. The modules' own parameters become views into it, so no weight is held twice."""
    parts = [[linear.weight for linear in linears]]
    if linears[0].bias is not None:
        parts.append([linear.bias for linear in linears])
    fused = [torch.cat(tensors) for tensors in parts]
    for tensors, whole in zip(parts, fused):
        for tensor, view in zip(tensors, whole.split([t.shape[0] for t in tensors])):
            tensor.data = view
    return fused[0], fused[1] if len(fused) > 1 else None


def _rms_norm(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    """The model's RMSNorm (normalise in float32, cast back, scale) as one fused op: 13 µs
    against 36 µs for the module's five-op forward on a [4, 128] input, 2-core CPU."""
    normed = F.rms_norm(x.float(), (x.shape[-1],), eps=norm.variance_epsilon)
    return norm.weight * normed.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def kv_bytes_per_block(config, block_size: int, dtype: torch.dtype) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token_per_layer = 2 * config.num_key_value_heads * head_dim * dtype.itemsize
    return per_token_per_layer * block_size * config.num_hidden_layers


class ModelRunner:
    def __init__(
        self,
        model: PreTrainedModel,
        num_blocks: int,
        block_size: int,
        attention: str = "sdpa",
        cuda_graphs: bool = False,
        max_model_len: int | None = None,
    ):
        """max_model_len: the longest sequence served (default: the config's
        max_position_embeddings); CUDA graphs pad their keys to it."""
        config = model.config
        if config.model_type not in ("llama", "mistral"):
            raise ValueError(f"model_type {config.model_type!r} is not a Llama-style decoder")
        rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
        if "dynamic" in rope_type or rope_type == "longrope":
            # HF recomputes these frequencies from the longest position in each forward, which
            # here mixes requests: one request's rotation would depend on its batch mates.
            raise ValueError(
                f"rope_parameters.rope_type={rope_type!r}: its frequencies change with the "
                "longest sequence in a forward, which a batch of requests shares; expected a "
                "static rope (default, linear, llama3, yarn)"
            )
        if attention not in ("sdpa", "flex"):
            raise ValueError(f"attention must be 'sdpa' or 'flex', got {attention!r}")
        self.model = model.eval()
        self.config = config
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.scratch_slot = num_blocks * block_size  # first slot of the scratch block
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.scale = self.head_dim**-0.5
        self.max_model_len = max_model_len or config.max_position_embeddings
        # Mistral v0.1: a query sees only its last `sliding_window` positions. Older keys stay
        # cached and are masked, so the window saves no memory.
        mistral = config.model_type == "mistral"
        self.sliding_window = getattr(config, "sliding_window", None) if mistral else None
        self.attention = attention
        shape = ((num_blocks + 1) * block_size, self.num_kv_heads, self.head_dim)
        self.k_cache = [
            torch.zeros(shape, dtype=self.dtype, device=self.device)
            for _ in range(config.num_hidden_layers)
        ]
        self.v_cache = [torch.zeros_like(k) for k in self.k_cache]
        self._fused = [
            (
                _fuse_linears(
                    layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj
                ),
                _fuse_linears(layer.mlp.gate_proj, layer.mlp.up_proj),
            )
            for layer in self.layers
        ]
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, dict, torch.Tensor]] = {}
        if cuda_graphs:
            if self.device.type != "cuda":
                raise ValueError("cuda_graphs=True needs the model on a CUDA device")
            self._capture_graphs()

    # ---- public entry point ----

    @torch.inference_mode()
    def execute(self, batch: list[ForwardInput]) -> list[torch.Tensor]:
        """Run one step; returns float32 logits [num_logits, vocab] per request, in order."""
        if self.graphs and all(len(b.token_ids) == 1 and b.num_logits == 1 for b in batch):
            bucket = next((s for s in GRAPH_BATCH_SIZES if s >= len(batch)), None)
            if bucket in self.graphs:
                logits = self._replay(bucket, batch)
                return list(logits[: len(batch)].float().split(1))
        ids, positions, slots, logit_rows = self._flatten(batch)
        attn = self._sdpa_groups(batch) if self.attention == "sdpa" else self._flex_mask(batch)
        logits = self._forward(ids, positions, slots, logit_rows, attn).float()
        return list(logits.split([b.num_logits for b in batch]))

    # ---- the model ----

    def _forward(self, ids, positions, slots, logit_rows, attn) -> torch.Tensor:
        llama = self.model.model
        h = llama.embed_tokens(ids)
        cos, sin = llama.rotary_emb(h, positions[None])
        cos, sin = cos[0, :, None, :], sin[0, :, None, :]  # [T, 1, head_dim]
        num_tokens = ids.shape[0]
        heads, kv_heads = self.num_heads, self.num_kv_heads
        for layer, (qkv_proj, gate_up_proj), k_cache, v_cache in zip(
            self.layers, self._fused, self.k_cache, self.v_cache
        ):
            x = _rms_norm(h, layer.input_layernorm)
            qkv = F.linear(x, *qkv_proj).view(num_tokens, heads + 2 * kv_heads, self.head_dim)
            qk = qkv[:, : heads + kv_heads]
            qk = qk * cos + rotate_half(qk) * sin  # queries and keys rotated in one pass
            q, k = qk.split([heads, kv_heads], dim=1)
            v = qkv[:, heads + kv_heads :]
            k_cache.index_copy_(0, slots, k)
            v_cache.index_copy_(0, slots, v)
            if not isinstance(attn, list):  # a flex block mask; graphs always pass sdpa groups
                o = self._flex_attend(q.contiguous(), k_cache, v_cache, attn)
            else:
                o = self._sdpa_attend(q, k_cache, v_cache, attn)
            h = h + layer.self_attn.o_proj(o.reshape(num_tokens, -1))
            gate, up = F.linear(_rms_norm(h, layer.post_attention_layernorm), *gate_up_proj).chunk(
                2, -1
            )
            h = h + layer.mlp.down_proj(layer.mlp.act_fn(gate) * up)
        return self.model.lm_head(_rms_norm(h[logit_rows], llama.norm))

    @property
    def layers(self):
        return self.model.model.layers

    # ---- batch metadata (computed once per step, shared by all layers) ----

    def _slots(self, block_table: list[int], start: int, stop: int) -> list[int]:
        bs = self.block_size
        return [block_table[p // bs] * bs + p % bs for p in range(start, stop)]

    def _flatten(self, batch: list[ForwardInput]):
        ids, positions, slots, logit_rows = [], [], [], []
        for inp in batch:
            n = len(inp.token_ids)
            logit_rows += range(len(ids) + n - inp.num_logits, len(ids) + n)
            ids += inp.token_ids
            positions += range(inp.start_pos, inp.start_pos + n)
            slots += self._slots(inp.block_table, inp.start_pos, inp.start_pos + n)
        return (
            torch.tensor(x, dtype=torch.long, device=self.device)
            for x in (ids, positions, slots, logit_rows)
        )

    def _sdpa_groups(self, batch: list[ForwardInput]) -> list[dict]:
        starts, offset = [], 0
        for inp in batch:
            starts.append(offset)
            offset += len(inp.token_ids)
        short = [i for i, inp in enumerate(batch) if len(inp.token_ids) <= SHORT_QUERY]
        groups = ([short] if short else []) + [
            [i] for i, inp in enumerate(batch) if len(inp.token_ids) > SHORT_QUERY
        ]
        return [self._sdpa_group([batch[i] for i in g], [starts[i] for i in g]) for g in groups]

    def _sdpa_group(self, members: list[ForwardInput], starts: list[int], max_kv: int = 0) -> dict:
        """Padded index tensors for one SDPA call over `members` (flat rows from `starts`).

        Built with a handful of tensor ops over the block tables, not per key position: a
        Python loop over every cached position took 1.0 ms at 8 requests and 3.7 ms at 32
        (context 120, 2-core CPU; BENCHMARKS.md), which a draft pays once per draft pass.
        """
        bs = self.block_size
        lengths = torch.tensor([len(m.token_ids) for m in members])
        start_pos = torch.tensor([m.start_pos for m in members])
        max_q = int(lengths.max())
        max_kv = max(max_kv, int((start_pos + lengths).max()))
        num_blocks = -(-max_kv // bs)
        # Block tables padded with the scratch block: keys past a request's context read
        # scratch slots, which its mask hides.
        tables = torch.tensor(
            [
                m.block_table[:num_blocks] + [self.num_blocks] * (num_blocks - len(m.block_table))
                for m in members
            ]
        )
        key_pos = torch.arange(max_kv)
        kv_slots = tables[:, key_pos // bs] * bs + key_pos % bs
        query = torch.arange(max_q)
        real = query < lengths[:, None]
        # Padded query rows repeat the last real row and position: they see >= 1 key, no NaN.
        offset = torch.minimum(query, lengths[:, None] - 1)
        q_index = torch.tensor(starts)[:, None] + offset
        q_pos = start_pos[:, None] + offset
        # key <= query position also keeps every key inside the request's own context.
        key_pos, q_pos = key_pos[None, None, :], q_pos[:, :, None]
        mask = key_pos <= q_pos
        if self.sliding_window:
            mask &= key_pos > q_pos - self.sliding_window
        tensors = {
            "q_index": q_index,
            "kv_slots": kv_slots,
            "mask": mask[:, None],
            "rows": torch.arange(len(members) * max_q)[real.flatten()],
            "flat": q_index[real],
        }
        return {name: t.to(self.device) for name, t in tensors.items()}

    def _sdpa_attend(self, q, k_cache, v_cache, groups: list[dict]) -> torch.Tensor:
        out = torch.empty_like(q)
        for g in groups:
            qg = q[g["q_index"]].transpose(1, 2)  # [G, heads, max_q, head_dim]
            # index_select on the flat slots: 2.5x faster than k_cache[kv_slots] on a 2-core
            # CPU (7 against 18 µs for 2 requests x 112 keys), twice per layer
            slots, shape = g["kv_slots"].view(-1), (*g["kv_slots"].shape, *k_cache.shape[1:])
            kg = k_cache.index_select(0, slots).view(shape).transpose(1, 2)
            vg = v_cache.index_select(0, slots).view(shape).transpose(1, 2)
            o = F.scaled_dot_product_attention(
                qg,
                kg,
                vg,
                attn_mask=g["mask"],
                scale=self.scale,
                enable_gqa=self.num_heads != self.num_kv_heads,
            )
            out[g["flat"]] = o.transpose(1, 2).flatten(0, 1)[g["rows"]]
        return out

    # ---- flex attention over the paged cache ----

    def _flex_mask(self, batch: list[ForwardInput]):
        from torch.nn.attention.flex_attention import create_block_mask

        num_slots = self.k_cache[0].shape[0]
        slot_owner = torch.full((num_slots,), -1, dtype=torch.long)
        slot_pos = torch.zeros(num_slots, dtype=torch.long)
        q_owner, q_pos = [], []
        for r, inp in enumerate(batch):
            ctx = inp.start_pos + len(inp.token_ids)
            slots = torch.tensor(self._slots(inp.block_table, 0, ctx))
            slot_owner[slots] = r
            slot_pos[slots] = torch.arange(ctx)
            q_owner += [r] * len(inp.token_ids)
            q_pos += range(inp.start_pos, ctx)
        slot_owner, slot_pos = slot_owner.to(self.device), slot_pos.to(self.device)
        q_owner = torch.tensor(q_owner, device=self.device)
        q_pos = torch.tensor(q_pos, device=self.device)

        window = self.sliding_window

        def own_causal(b, h, q_idx, kv_idx):
            return (slot_owner[kv_idx] == q_owner[q_idx]) & (slot_pos[kv_idx] <= q_pos[q_idx])

        def own_causal_in_window(b, h, q_idx, kv_idx):
            recent = slot_pos[kv_idx] > q_pos[q_idx] - window
            return own_causal(b, h, q_idx, kv_idx) & recent

        return create_block_mask(
            own_causal_in_window if window else own_causal,
            None,
            None,
            len(q_pos),
            num_slots,
            device=self.device.type,
        )

    def _flex_attend(self, q, k_cache, v_cache, block_mask) -> torch.Tensor:
        from torch.nn.attention.flex_attention import flex_attention

        attend = _compiled_flex() if q.is_cuda else flex_attention
        o = attend(
            q.transpose(0, 1)[None],
            k_cache.transpose(0, 1)[None],
            v_cache.transpose(0, 1)[None],
            block_mask=block_mask,
            scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return o[0].transpose(0, 1)

    # ---- CUDA graphs for decode ----

    def _graph_inputs(self, bucket: int) -> dict:
        """Static buffers of a decode step with `bucket` requests (padding points at scratch)."""
        pad = ForwardInput([0], 0, [self.num_blocks], 1)
        return {
            "ids": torch.zeros(bucket, dtype=torch.long, device=self.device),
            "positions": torch.zeros(bucket, dtype=torch.long, device=self.device),
            "slots": torch.full((bucket,), self.scratch_slot, device=self.device),
            "logit_rows": torch.arange(bucket, device=self.device),
            "group": self._sdpa_group([pad] * bucket, list(range(bucket)), self.max_model_len),
        }

    def _capture_graphs(self) -> None:
        for bucket in GRAPH_BATCH_SIZES:
            inputs = self._graph_inputs(bucket)
            args = (
                inputs["ids"],
                inputs["positions"],
                inputs["slots"],
                inputs["logit_rows"],
                [inputs["group"]],
            )
            with torch.inference_mode():
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    self._forward(*args)  # warm-up allocations outside the graph
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    logits = self._forward(*args)
            self.graphs[bucket] = (graph, inputs, logits)

    def _replay(self, bucket: int, batch: list[ForwardInput]) -> torch.Tensor:
        graph, inputs, logits = self.graphs[bucket]
        padded = batch + [ForwardInput([0], 0, [self.num_blocks], 1)] * (bucket - len(batch))
        fresh = self._sdpa_group(padded, list(range(bucket)), self.max_model_len)
        ids, positions, slots, _ = self._flatten(padded)
        inputs["ids"].copy_(ids)
        inputs["positions"].copy_(positions)
        inputs["slots"].copy_(slots)
        for name, tensor in fresh.items():
            inputs["group"][name].copy_(tensor)
        graph.replay()
        return logits


_FLEX = None


def _compiled_flex():
    """flex_attention is only fast when compiled; compile once per process."""
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX = torch.compile(flex_attention, dynamic=True)
    return _FLEX
