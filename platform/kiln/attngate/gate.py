"""Attention-Gate: learned in-context KV-cache eviction (Zeng et al., arXiv 2410.12876).

A small gate before every self-attention layer reads the layer's input over the context and
decides, per token and per KV head, whether that token's key/value entry is kept for later
queries. Evicted entries are never stored, so the cache shrinks with the eviction ratio.

Equations (layer ℓ, input X ∈ R^{n×d} = the normalised hidden states the host attention reads,
H = number of KV heads):

    A  = MHA′(X)                     a small *causal* attention (`heads` × `head_dim`), own q/k/v
    G  = σ((X + A W_mix) W_o + b)    ∈ (0,1)^{n×H}, soft gate (W_o, b: `score`)
    F  = 1[G ≥ τ]                    hard keep flags, forward pass
    F̃  = F + G − stopgrad(G)         straight-through estimator: value F, gradient ∂F̃/∂G = 1
    query t may attend key j of KV head h  ⟺  j ≤ t and (F_{j,h} = 1 or j = t)
    attention_{t,j} = F̃'_{t,j} e^{s_tj} / Σ_j' F̃'_{t,j'} e^{s_tj'}, with F̃'_{t,j} = F̃_{j,h} for
        j < t, 1 for j = t, 0 for j > t. For hard flags this is exactly the masked softmax, and
        it gives F̃ (hence G) a gradient: how much the output would change if j were kept.
        Scores are shifted by the row's largest *allowed* score and capped at 0 after the shift,
        so an evicted key's "if kept" weight is at most the best kept key's (bounded gradients).
    L  = L_task + λ (r̂ − (1 − ρ*))²   r̂ = mean of F̃ over layers, heads and (non-pad) tokens,
                                       ρ* = `target_eviction`
    eviction ratio = 1 − mean(F) = the fraction of (layer, KV head, token) entries not in the cache
        after their own step (the diagonal, a token attending itself, is never counted).

Every token attends to itself at its own step, so no attention row is ever empty (no NaN even
with all flags 0). The gate is causal: F_j depends on tokens ≤ j only, so teacher-forced training
sees exactly the masks decoding will use.

Reconstructed choices (the paper's code is not public and its method section was not available;
each is a kiln choice, not the paper's confirmed setting):
- MHA′ has its own q/k/v projections (`heads`=1, `head_dim`=8 by default), no positional encoding
  (causal masking alone carries order), and a residual connection X + A·W_mix before W_o, so the
  gate sees the token itself as well as its context.
- MHA′ attends to *all* previous tokens, so decoding keeps a small full gate cache
  (2·heads·head_dim numbers per token and layer); `GateCache` counts it in its memory figures.
- Flags are per KV head (what the cache stores; GQA query heads of one group share them).
- Prompt tokens are evicted during prefill by the same rule as generated ones.
- τ = 0.5; the regulariser is two-sided squared on the straight-through retention (so its value
  is the hard retention and a sweep over ρ* lands near each target); λ = `eviction_weight`.
- The gate starts open (bias `init_bias` = 2, σ(2) ≈ 0.88), so training starts (almost) from
  the base model.
- How the hard flags receive a gradient (the multiplicative form above, with the cap) is ours:
  the paper says only that an STE trains them.
Deviations: a gated forward uses an explicit n×n weight per head (O(n²·heads) memory), fine for
kiln's contexts but not for long ones (FlexAttention would avoid it). `GateCache` handles batch
size 1 only (ragged per-head lengths; the serving engine batches by request instead).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.models.llama.modeling_llama import LlamaAttention, apply_rotary_pos_emb

SUPPORTED_MODEL_TYPES = ("llama",)
CONFIG_KEY = "attention_gate"


@dataclass(frozen=True)
class GateConfig:
    """The Attention-Gate attached to every layer, and its eviction regulariser.

    A plain dataclass (kiln.attngate imports with torch + transformers alone); each field's
    help text is in its metadata, and jobs expose it as a validated config section.
    """

    heads: int = field(default=1, metadata={"help": "Heads of the gate's causal attention MHA′."})
    head_dim: int = field(
        default=8,
        metadata={"help": "Head dimension of MHA′; its cache costs 2·heads·head_dim per token."},
    )
    threshold: float = field(
        default=0.5, metadata={"help": "τ: a KV entry is kept when the soft gate σ(·) is ≥ τ."}
    )
    init_bias: float = field(
        default=2.0,
        metadata={
            "help": "Initial gate-logit bias; positive starts with (nearly) every entry kept, "
            "i.e. from the unmodified model. Not much larger: Adam moves it by about lr per step."
        },
    )
    target_eviction: float = field(
        default=0.5,
        metadata={"help": "ρ*: the fraction of KV entries the regulariser steers toward evicting."},
    )
    eviction_weight: float = field(
        default=10.0, metadata={"help": "λ of the regulariser λ·(retention − (1 − ρ*))²."}
    )

    def __post_init__(self) -> None:
        checks = {
            "heads": (self.heads >= 1, "an integer ≥ 1"),
            "head_dim": (self.head_dim >= 1, "an integer ≥ 1"),
            "threshold": (0 < self.threshold < 1, "a value in (0, 1)"),
            "target_eviction": (0 <= self.target_eviction < 1, "a fraction in [0, 1)"),
            "eviction_weight": (self.eviction_weight >= 0, "a value ≥ 0"),
        }
        for name, (valid, expected) in checks.items():
            if not valid:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected {expected}")


class AttentionGate(nn.Module):
    """MHA′ + gating head: hidden states (b, n, d) -> gate logits (b, n, num_kv_heads)."""

    def __init__(self, hidden_size: int, num_kv_heads: int, config: GateConfig):
        super().__init__()
        self.heads, self.head_dim = config.heads, config.head_dim
        width = config.heads * config.head_dim
        self.query = nn.Linear(hidden_size, width, bias=False)
        self.key = nn.Linear(hidden_size, width, bias=False)
        self.value = nn.Linear(hidden_size, width, bias=False)
        self.mix = nn.Linear(width, hidden_size, bias=False)
        self.score = nn.Linear(hidden_size, num_kv_heads)
        nn.init.constant_(self.score.bias, config.init_bias)

    def forward(
        self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Logits for the n new tokens, and MHA′'s keys/values including `past` (its cache)."""
        b, n, _ = x.shape
        split = (b, n, self.heads, self.head_dim)
        query = self.query(x).view(split).transpose(1, 2)
        key = self.key(x).view(split).transpose(1, 2)
        value = self.value(x).view(split).transpose(1, 2)
        if past is not None:
            key, value = torch.cat([past[0], key], dim=2), torch.cat([past[1], value], dim=2)
        # New token i sits at absolute position (past length + i) and sees keys up to it.
        seen = key.shape[2] - n
        causal = torch.ones(n, key.shape[2], dtype=torch.bool, device=x.device).tril(seen)
        context = F.scaled_dot_product_attention(query, key, value, attn_mask=causal)
        context = context.transpose(1, 2).reshape(b, n, -1)
        return self.score(x + self.mix(context)), (key, value)


def straight_through_flags(logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """Hard 0/1 keep flags in the forward pass, the sigmoid's gradient in the backward pass."""
    soft = torch.sigmoid(logits)
    hard = (soft >= threshold).to(soft.dtype)
    return hard + soft - soft.detach()


def key_weights(keep: torch.Tensor, query_heads: int) -> torch.Tensor:
    """The host mask as weights (b, query_heads, n, n): F_j below the diagonal, 1 on it, 0 above.

    `keep` is (b, n, kv_heads). Nonzero entries are exactly the keys a query may attend; this is
    the gate's whole rule, a plain function any attention kernel (or the serving engine) can use.
    """
    _, n, kv_heads = keep.shape
    per_query_head = keep.transpose(1, 2).repeat_interleave(query_heads // kv_heads, dim=1)
    earlier = torch.ones(n, n, dtype=torch.bool, device=keep.device).tril(-1)
    diagonal = torch.eye(n, dtype=keep.dtype, device=keep.device)
    return per_query_head[:, :, None, :] * earlier + diagonal


def masked_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, weights: torch.Tensor, scaling
) -> torch.Tensor:
    """softmax over the keys `weights` allows, differentiable in the weights (see the docstring)."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = query @ key.transpose(2, 3) * scaling
    allowed = weights.detach() > 0
    shift = scores.masked_fill(~allowed, float("-inf")).amax(-1, keepdim=True).detach()
    # Allowed scores are ≤ shift. Capping the evicted ones there too keeps every exponential
    # ≤ 1 (no 0·inf, bounded straight-through gradients): an evicted key scores at most as
    # much as the best kept one when asking "what if it were kept".
    exponentials = torch.exp((scores - shift).clamp(max=0.0)) * weights
    return (exponentials / exponentials.sum(-1, keepdim=True)) @ value


class GatedLlamaAttention(LlamaAttention):
    """LlamaAttention whose keys are filtered by its `gate`; instances are made by `attach`.

    Parallel path (no cache: training, scoring): the masked attention above, with
    straight-through flags stored in `self.keep` (b, n, kv_heads) for the regulariser.
    Cache path (`GateCache`: prefill and decoding): hard flags, evicted entries never stored.
    """

    gate: AttentionGate
    gate_config: GateConfig

    def forward(self, hidden_states, position_embeddings=None, cache=None, **_):
        b, n, _ = hidden_states.shape
        hidden_shape = (b, n, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        threshold = self.gate_config.threshold
        if cache is None:
            logits, _ = self.gate(hidden_states)
            self.keep = straight_through_flags(logits, threshold)
            weights = key_weights(self.keep, query.shape[1])
            output = masked_attention(query, key, value, weights, self.scaling)
        elif isinstance(cache, GateCache):
            layer = cache.layers[self.layer_idx]
            logits, layer.gate_states = self.gate(hidden_states, layer.gate_states)
            self.keep = torch.sigmoid(logits) >= threshold
            output = layer.attend_and_store(query, key, value, self.keep, self.scaling)
        else:
            raise TypeError(
                f"a gated model decodes with kiln.attngate.GateCache, got {type(cache).__name__}; "
                "pass cache=GateCache(model.config) to generate"
            )
        output = output.transpose(1, 2).reshape(b, n, -1)
        return self.o_proj(output), None


class GateCacheLayer(CacheLayerMixin):
    """One layer's cache: per KV head its own (1, length_h, head_dim) keys and values.

    Only kept entries are stored, so lengths differ across heads (ragged); plus MHA′'s full
    gate cache `gate_states`. `seen` counts every token processed (RoPE positions need it).
    """

    def __init__(self):
        super().__init__()
        self.head_keys: list[torch.Tensor] = []
        self.head_values: list[torch.Tensor] = []
        self.gate_states: tuple[torch.Tensor, torch.Tensor] | None = None
        self.seen = 0

    def lazy_initialization(self, key_states, value_states) -> None:
        empty = key_states[:, 0, :0]
        self.head_keys = [empty.clone() for _ in range(key_states.shape[1])]
        self.head_values = [empty.clone() for _ in range(key_states.shape[1])]
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise TypeError("GateCache is filled by gated attention layers (kiln.attngate.attach)")

    def attend_and_store(self, query, key, value, keep, scaling) -> torch.Tensor:
        """Attention of the n new queries over stored + new keys, then store the kept new ones.

        query (1, Hq, n, d); key/value (1, Hkv, n, d); keep (1, n, Hkv) bool.
        """
        if query.shape[0] != 1:
            raise ValueError(f"GateCache holds one sequence, got a batch of {query.shape[0]}")
        if not self.is_initialized:
            self.lazy_initialization(key, value)
        kv_heads, n = key.shape[1], key.shape[2]
        groups = query.shape[1] // kv_heads
        new_allowed = key_weights(keep.to(query.dtype), kv_heads)[0] > 0  # (Hkv, n, n)
        outputs = []
        for head in range(kv_heads):
            stored = self.head_keys[head].shape[1]
            keys = torch.cat([self.head_keys[head], key[:, head]], dim=1)
            values = torch.cat([self.head_values[head], value[:, head]], dim=1)
            allowed = torch.cat(
                [new_allowed.new_ones(n, stored), new_allowed[head]], dim=1
            )  # every stored entry was kept and lies in the past
            heads = query[:, head * groups : (head + 1) * groups]
            outputs.append(
                F.scaled_dot_product_attention(
                    heads, keys[:, None], values[:, None], attn_mask=allowed, scale=scaling
                )
            )
            kept = keep[0, :, head]
            self.head_keys[head] = torch.cat([self.head_keys[head], key[:, head, kept]], dim=1)
            self.head_values[head] = torch.cat(
                [self.head_values[head], value[:, head, kept]], dim=1
            )
        self.seen += n
        return torch.cat(outputs, dim=1)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def stored_entries(self) -> list[int]:
        """Kept KV entries per head."""
        return [keys.shape[1] for keys in self.head_keys]

    def host_bytes(self) -> int:
        return sum(t.nbytes for t in (*self.head_keys, *self.head_values))

    def gate_bytes(self) -> int:
        return sum(t.nbytes for t in self.gate_states) if self.gate_states else 0


class GateCache(Cache):
    """A `transformers` Cache that physically drops evicted KV entries per head.

    `model.generate(ids, cache=GateCache(model.config))` works (batch size 1).
    """

    def __init__(self, config):
        super().__init__(layers=[GateCacheLayer() for _ in range(config.num_hidden_layers)])

    def kv_bytes(self) -> dict[str, int]:
        """Bytes held now: host KV entries, the gate's own cache, and their total."""
        host = sum(layer.host_bytes() for layer in self.layers)
        gate = sum(layer.gate_bytes() for layer in self.layers)
        return {"host": host, "gate": gate, "total": host + gate}

    def eviction_ratio(self) -> float:
        """1 − stored / (layers × KV heads × tokens seen)."""
        stored = sum(sum(layer.stored_entries()) for layer in self.layers)
        heads = len(self.layers[0].head_keys)
        return 1 - stored / (len(self.layers) * heads * self.layers[0].seen)


def attach(model: PreTrainedModel, config: GateConfig) -> PreTrainedModel:
    """Add an Attention-Gate to every attention layer of a Llama-architecture model, in place.

    The host weights are untouched (the gates' parameters are new, under
    `...self_attn.gate.`); the gate config is recorded in `model.config.attention_gate`, so
    `save_pretrained` + `load_gated` round-trips.
    """
    model_type = getattr(model.config, "model_type", None)
    attentions = [m for m in model.modules() if isinstance(m, LlamaAttention)]
    if model_type not in SUPPORTED_MODEL_TYPES or not attentions:
        raise ValueError(
            f"attach: model_type={model_type!r} ({type(model).__name__}) is not supported; "
            f"expected a Llama-architecture model (model_type in {SUPPORTED_MODEL_TYPES})"
        )
    if any(isinstance(m, GatedLlamaAttention) for m in attentions):
        raise ValueError("attach: the model already has Attention-Gates")
    host = next(model.parameters())
    for attention in attentions:
        gate = AttentionGate(model.config.hidden_size, model.config.num_key_value_heads, config)
        attention.__class__ = GatedLlamaAttention
        attention.gate = gate.to(host.device, host.dtype)
        attention.gate_config = config
    setattr(model.config, CONFIG_KEY, asdict(config))
    # A plain forward must not build a DynamicCache the gated layers cannot use.
    model.config.use_cache = False
    return model


def gated_layers(model: nn.Module) -> list[GatedLlamaAttention]:
    return [m for m in model.modules() if isinstance(m, GatedLlamaAttention)]


def retention(model: nn.Module, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean straight-through keep flag of the last forward, over layers, heads and tokens.

    `token_mask` (b, n) excludes padding. Its value is the hard retention 1 − eviction ratio;
    its gradient reaches every gate through the straight-through estimator.
    """
    keep = torch.stack([layer.keep for layer in gated_layers(model)])  # (layers, b, n, heads)
    if token_mask is None:
        return keep.mean()
    weights = token_mask[None, :, :, None].to(keep.dtype).expand_as(keep)
    return (keep * weights).sum() / weights.sum()


def eviction_loss(model: nn.Module, config: GateConfig, token_mask=None) -> torch.Tensor:
    """λ·(retention − (1 − ρ*))²."""
    target_retention = 1 - config.target_eviction
    return config.eviction_weight * (retention(model, token_mask) - target_retention) ** 2


def load_gated(path: str | Path, **kwargs) -> PreTrainedModel:
    """Load a gated `save_pretrained` folder: the host model, its gates and their weights."""
    path = Path(path)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    settings = json.loads((path / "config.json").read_text()).get(CONFIG_KEY)
    if settings is None:
        raise ValueError(f"{path} has no '{CONFIG_KEY}' in config.json: not a gated model")
    attach(model, GateConfig(**settings))
    weights = load_file(path / "model.safetensors")
    gates = {name: tensor for name, tensor in weights.items() if ".gate." in name}
    missing = {n for n, _ in model.named_parameters() if ".gate." in n} - set(gates)
    if missing:
        raise ValueError(f"{path}: gate weights missing from model.safetensors: {sorted(missing)}")
    model.load_state_dict(gates, strict=False)
    return model
