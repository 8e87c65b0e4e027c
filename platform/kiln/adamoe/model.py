"""AdaMoE: token-adaptive routing with null experts for Mixtral-architecture models.

Paper: Zeng, Miao, Gao, Zhang, Deng, "AdaMoE: Token-Adaptive Routing with Null Experts for
Mixture-of-Experts Language Models", Findings of EMNLP 2024, arXiv 2406.13233.

A top-k MoE layer spends k expert FFNs on every token. AdaMoE adds m *null experts* (the zero
map, free) beside the n true experts and raises the top-k to k' > k; a token whose selection
includes nulls uses fewer true experts, so compute adapts per token.

Router (n true experts, m nulls; x is a token's hidden state):

    h(x) = [W_g x ; W_null x]            W_g: the pretrained router (n x d); W_null: m x d
    p    = softmax(h(x))                 over all n + m experts
    S    = TopK(p, k'),  S_T = S ∩ {true experts}
    y(x) = Σ_{i∈S_T} p_i / (Σ_{j∈S_T} p_j) · E_i(x)      and y(x) = 0 when S_T is empty

Null-router initialisation: W_null row j = W_g row (j mod n), so every null starts tied with a
true-expert twin (the official code tiles W_g m/n times). The ties are exact, so the tie order
decides which of a true expert and its twins fill the k' slots at step 0. `select_experts`
breaks ties toward true experts (a stable sort; torch.topk, which the official code uses, has
no documented tie order and on CPU puts nulls first, so m = 2n, k' = 2k would start near top-1,
|S_T| ≈ 1.1). With true experts first, the ranking at step 0 is A, its twins, B, its twins, ...,
so whenever k' ≥ (m/n + 1)(k − 1) + 1 (the paper's m = n, k' = k + 1 and m = 2n, k' = 2k, and
m = 8, k' = 5 on n = 4, k = 2) the converted model starts exactly equal to the original top-k
model, and fine-tuning moves away from it (tested).

Load balancing, ℓ_null: with f_i the fraction of routing slots sent to expert i and P_i the mean
router probability of expert i (both over tokens and layers, as Hugging Face's Mixtral loss),
every null's f_j is replaced by the null mean f̄ = (1/m) Σ_{j null} f_j:

    L_aux = (n + m) · [ Σ_{i true} f_i P_i + f̄ · Σ_{j null} P_j ]

so the loss is indifferent to how load splits among the (free) nulls. With m = 0 it is exactly
Hugging Face's `load_balancing_loss_func`. Under uniform routing it equals k'.
Weight schedule: the authors describe α = 0.02 in epoch 1 (balance first), then α = 1e-4 (give
tokens freedom); the official Mixtral code hard-codes 1e-4 throughout. The job steps α at a
fraction of its steps, by default from 1e-4 to 0, for the reason at the end of this docstring.

Deviations from the paper / official code, and why:
- The official Mixtral loss meant to average the null loads but sliced the top-k axis of a
  [k', n+m] tensor, which selects nothing (a no-op: plain Switch balancing of every null). This
  file implements ℓ_null as written in the paper; tests/test_adamoe_math.py pins the difference.
- Null experts are zero maps only (the identity variant changes the layer's output).
- Dispatch is native, not a monkey-patch: `NullSkippingExperts` gathers only (token, true
  expert) pairs, so a null slot never reaches an expert matmul and saves real time, not only
  FLOPs. Its parameters keep Mixtral's fused names (`experts.gate_up_proj`, `experts.down_proj`),
  so checkpoints, LoRA `target_parameters` and merges work unchanged.
- `convert` builds the converted model next to the original (two copies in memory for a
  moment): fine for the checkpoints kiln trains, not for Mixtral-8x7B on one host. Loading a
  plain Mixtral checkpoint straight into `AdaMoEForCausalLM.from_pretrained` is not supported
  (its null router would keep a random init and `base_top_k` would be unset).
- The balancing weight is a step function of training progress rather than of epochs, and by
  default it drops to 0, not 1e-4, after the balance phase (why: the end of this docstring).

A property worth knowing [derived]: w_i = p_i / Σ_{S_T} p_j depends only on the selected true
experts' logits (the softmax denominator cancels), so the LM loss sends no gradient to the null
router, and a token with a single true expert gives that expert weight 1 whatever p is. How
many true experts a token uses is therefore moved by ℓ_null, and by the LM loss only indirectly
(through the true logits' ranks against the nulls). A consequence for α [derived, measured]: the
null router's only gradient is α·∇ℓ_null, and Adam-type optimizers normalise a parameter's step
by its own gradient scale, so W_null moves at the same speed whatever α > 0 is (above Adam's ε).
The load reaches ℓ_null's uniform point k'·n/(n+m) in the same ~40 steps at α = 0.02 as at
1e-4, and any α > 0 keeps W_null chasing that point for the rest of the run: the paper's small
epoch-2 α gives tokens no freedom. The size of α only sets how hard ℓ_null pulls the pretrained
router W_g (at the converted start, α = 0.02 makes that pull 1-49% of the LM gradient's norm on
W_g, first to last layer of the moe base; 1e-4, under 0.3%). The job therefore steps α from
1e-4 (the official code's value) to 0 a quarter of the way in: the null router then stops
(within ~20 steps, as Adam's momentum decays), and the experts and adapters fine-tune against a
settled routing. That, not the size of α, closed the accuracy gap on the embedded world
(BENCHMARKS.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM
from transformers.models.mixtral.modeling_mixtral import (
    MixtralExperts,
    MixtralSparseMoeBlock,
    MixtralTopKRouter,
)


@strict
class AdaMoEConfig(MixtralConfig):
    """A Mixtral config plus the null experts; `num_experts_per_tok` is k' (true + null slots)."""

    model_type = "adamoe"
    num_null_experts: int = 0
    base_top_k: int | None = None  # k of the model it was converted from: the FLOPs baseline


def select_experts(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the top_k largest logits per row, ties broken toward the lower index.

    Softmax is monotonic, so this is the top-k of the routing probabilities without computing
    them. True experts come first in the router's columns, so a true expert wins a tie with its
    null twin (module docstring). Ties are the rule, not the exception: twin nulls start equal
    and ℓ_null, symmetric in the nulls, gives them equal gradients, so they stay tied through
    training (43% of a trained m = 8, k' = 5 layer's rows tie at the k'-th slot). Hence a stable
    sort rather than torch.topk, which documents no tie order.
    """
    ordered = torch.sort(router_logits, dim=-1, descending=True, stable=True)
    return ordered.values[..., :top_k], ordered.indices[..., :top_k]


def route(
    router_logits: torch.Tensor, num_experts: int, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k' over true + null experts; weights renormalised over the selected true experts.

    Returns (weights, indices), both [tokens, top_k]. Indices >= num_experts are null slots;
    their weight is 0, and a token whose every slot is null gets all-zero weights (no NaN: the
    zero denominator is clamped away from 0). p_i / Σ_{S_T} p_j is a softmax over the selected
    true logits alone (the full softmax's denominator cancels), which skips a softmax over all
    n + m columns: on CPU that was most of the router's time.
    """
    selected, indices = select_experts(router_logits, top_k)  # as the loss, in the model's dtype
    selected = selected.float().masked_fill(indices >= num_experts, -torch.inf)
    # Shifting by the row's largest true logit keeps exp finite; an all-null row shifts by 0.
    shift = selected.amax(dim=-1, keepdim=True).detach().nan_to_num(neginf=0.0)
    unnormalised = torch.exp(selected - shift)
    total = unnormalised.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return unnormalised / total, indices


def true_experts_per_token(router_logits: torch.Tensor, num_experts: int, top_k: int):
    """|S_T| of every token (row) of one layer's router logits: how many true FFNs it runs."""
    return (select_experts(router_logits, top_k)[1] < num_experts).sum(dim=-1)


def null_aware_balance_loss(
    router_logits: tuple[torch.Tensor, ...],
    num_experts: int,
    num_null_experts: int,
    top_k: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """ℓ_null over every layer's [tokens, n + m] router logits (padding excluded by the mask)."""
    total_experts = num_experts + num_null_experts
    device = router_logits[0].device
    load = torch.zeros(total_experts, device=device)
    importance = torch.zeros(total_experts, device=device)
    rows = torch.zeros((), device=device)
    for logits in router_logits:
        probs = F.softmax(logits.float(), dim=-1)
        token_weight = (
            torch.ones(len(probs), device=device)
            if attention_mask is None
            else attention_mask.reshape(-1).to(device, torch.float32)
        )
        selected = select_experts(logits, top_k)[1]
        load = load.scatter_add(0, selected.reshape(-1), token_weight.repeat_interleave(top_k))
        importance = importance + (probs * token_weight[:, None]).sum(dim=0)
        rows = rows + token_weight.sum()
    load, importance = load / rows, importance / rows
    if num_null_experts:
        null_mean = load[num_experts:].mean().expand(num_null_experts)
        load = torch.cat([load[:num_experts], null_mean])
    return total_experts * (load * importance).sum()


class AdaMoERouter(MixtralTopKRouter):
    """The pretrained router (`weight`, n x d) plus the null router (`null_weight`, m x d).

    A MixtralTopKRouter subclass, so Hugging Face records its [tokens, n + m] logits as
    `router_logits` when a forward asks for them.
    """

    def __init__(self, config: AdaMoEConfig):
        super().__init__(config)
        # `convert` ties it to the pretrained router; built from a config it starts at logit 0.
        self.null_weight = nn.Parameter(torch.zeros(config.num_null_experts, self.hidden_dim))
        # False: null logits at -inf, i.e. vanilla top-k over the true experts (the layer
        # benchmark's reference at the same code; tests).
        self.nulls_enabled = True

    def forward(self, hidden_states: torch.Tensor):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        if self.nulls_enabled:  # one matmul over both routers: half the time of two on CPU
            router_logits = F.linear(hidden_states, torch.cat([self.weight, self.null_weight]))
        else:
            nulls = hidden_states.new_full((len(hidden_states), len(self.null_weight)), -torch.inf)
            router_logits = torch.cat([F.linear(hidden_states, self.weight), nulls], -1)
        weights, indices = route(router_logits, self.num_experts, self.top_k)
        return router_logits, weights, indices


class NullSkippingExperts(MixtralExperts):
    """Mixtral's fused experts; only (token, true expert) pairs are gathered and computed."""

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        token, slot = torch.nonzero(top_k_index < self.num_experts, as_tuple=True)
        expert = top_k_index[token, slot]
        order = torch.argsort(expert, stable=True)
        token, slot = token[order], slot[order]
        counts = torch.bincount(expert, minlength=self.num_experts).tolist()
        output = torch.zeros_like(hidden_states)
        start = 0
        for expert_index, count in enumerate(counts):
            tokens = token[start : start + count]
            weights = top_k_weights[tokens, slot[start : start + count], None]
            start += count
            if count:
                expert_out = self.expert_ffn(expert_index, hidden_states[tokens]) * weights
                output.index_add_(0, tokens, expert_out.to(output.dtype))
        return output

    def expert_ffn(self, expert_index: int, x: torch.Tensor) -> torch.Tensor:
        """One expert's SwiGLU on the rows routed to it (tests spy on this to count calls)."""
        gate, up = F.linear(x, self.gate_up_proj[expert_index]).chunk(2, dim=-1)
        return F.linear(self.act_fn(gate) * up, self.down_proj[expert_index])


class AdaMoESparseMoeBlock(MixtralSparseMoeBlock):
    """Mixtral's block (same forward: jitter, route, experts) with the AdaMoE router/experts."""

    def __init__(self, config: AdaMoEConfig):
        nn.Module.__init__(self)
        self.top_k = config.num_experts_per_tok
        self.jitter_noise = config.router_jitter_noise
        self.gate = AdaMoERouter(config)
        self.experts = NullSkippingExperts(config)


def tie_null_router(router: AdaMoERouter) -> None:
    """The paper's initialisation: null row j = true row (j mod n)."""
    copies = -(-router.null_weight.shape[0] // router.num_experts)
    with torch.no_grad():
        router.null_weight.copy_(router.weight.repeat(copies, 1)[: router.null_weight.shape[0]])


class AdaMoEForCausalLM(MixtralForCausalLM):
    """MixtralForCausalLM with AdaMoE blocks; `aux_loss` is ℓ_null."""

    config_class = AdaMoEConfig

    def __init__(self, config: AdaMoEConfig):
        super().__init__(config)
        for layer in self.model.layers:
            layer.mlp = AdaMoESparseMoeBlock(config)
        # Sizes Mixtral's forward uses for its own balancing term over the recorded [tokens,
        # n + m] logits; that term (plain Switch over every expert, null or not: the official
        # code's effective loss) is then replaced by ℓ_null in `forward`.
        self.num_experts = config.num_local_experts + config.num_null_experts
        self.post_init()

    def forward(self, *args, labels=None, attention_mask=None, output_router_logits=None, **kw):
        config = self.config
        if output_router_logits is None:
            output_router_logits = config.output_router_logits
        # Labels are withheld from Mixtral's forward, whose loss would add the Switch balancing
        # term; the LM loss and ℓ_null are added here instead.
        output = super().forward(
            *args,
            attention_mask=attention_mask,
            output_router_logits=output_router_logits,
            **kw,
        )
        if output_router_logits:
            output.aux_loss = null_aware_balance_loss(
                output.router_logits,
                config.num_local_experts,
                config.num_null_experts,
                config.num_experts_per_tok,
                attention_mask,
            )
        if labels is not None:
            output.loss = self.loss_function(output.logits, labels, self.vocab_size, **kw)
            if output_router_logits:
                output.loss = output.loss + self.router_aux_loss_coef * output.aux_loss
        return output


AutoConfig.register(AdaMoEConfig.model_type, AdaMoEConfig)
AutoModelForCausalLM.register(AdaMoEConfig, AdaMoEForCausalLM)


def convert(model: nn.Module, num_null_experts: int, top_k: int) -> AdaMoEForCausalLM:
    """A copy of a Mixtral-architecture causal LM with every sparse MoE block made AdaMoE.

    The pretrained router and experts are kept; the null router is tiled from the pretrained
    one. `top_k` is k' (true + null slots). With num_null_experts=0 and the model's own top-k
    the result computes exactly what the original does.
    """
    blocks = [m for m in model.modules() if isinstance(m, MixtralSparseMoeBlock)]
    if not isinstance(model, MixtralForCausalLM) or not blocks:
        raise ValueError(
            f"convert: expected a Mixtral-architecture causal LM (MixtralForCausalLM with "
            f"MixtralSparseMoeBlock layers), got {type(model).__name__} with "
            f"{len(blocks)} sparse MoE blocks"
        )
    if isinstance(model, AdaMoEForCausalLM):
        raise ValueError("convert: the model is already an AdaMoE model")
    num_experts = model.config.num_local_experts
    if num_null_experts < 0:
        raise ValueError(f"num_null_experts={num_null_experts}: expected >= 0")
    if not 1 <= top_k <= num_experts + num_null_experts:
        raise ValueError(
            f"top_k={top_k}: expected 1 <= top_k <= true + null experts "
            f"({num_experts} + {num_null_experts} = {num_experts + num_null_experts})"
        )
    settings = {k: v for k, v in model.config.to_dict().items() if k != "model_type"}
    config = AdaMoEConfig(
        **settings
        | {
            "num_null_experts": num_null_experts,
            "num_experts_per_tok": top_k,
            "base_top_k": model.config.num_experts_per_tok,
        }
    )
    parameter = next(model.parameters())
    converted = AdaMoEForCausalLM(config).to(parameter.device, parameter.dtype)
    missing, unexpected = converted.load_state_dict(model.state_dict(), strict=False)
    null_keys = {k for k in converted.state_dict() if k.endswith("gate.null_weight")}
    if unexpected or set(missing) != null_keys:
        raise ValueError(
            f"convert: weights do not map onto the AdaMoE model (missing {sorted(missing)}, "
            f"unexpected {sorted(unexpected)})"
        )
    for module in converted.modules():
        if isinstance(module, AdaMoERouter):
            tie_null_router(module)
    converted.train(model.training)
    return converted
