"""SpikeZIP-TF: a quantised ReLU vision transformer (QANN) and its exactly equivalent spiking twin.

Paper: You, Xu, Nie, Deng, Guo, Wang, He, "SpikeZIP-TF: Conversion is All You Need for
Transformer-based SNN", ICML 2024, arXiv 2406.03470.

QANN. Every activation the paper lists is quantised by a learnable-step (LSQ) quantiser with
round-half-up,

    Q(x) = s · clamp(⌊x/s + ½⌋, q_min, q_max),
    symmetric (signed):     q_min = −L/2, q_max = L/2 − 1
    asymmetric (unsigned):  q_min = 0,    q_max = L − 1,

with the rounding passed straight through, the gradient of s scaled by 1/√(q_max · numel) and
s initialised to 2·mean|x|/√q_max. Placement per pre-norm block (as in the official code):
after norm1 and norm2, on Q, K and V, after attn·V and after the output projection (signed);
on the softmax output and before the MLP's ReLU (unsigned: ReLU∘Q is then Q); after fc2
(signed); outside the blocks after the patch embedding and after the final LayerNorm. The QANN
is trained from the full-precision ReLU teacher with the paper's distillation loss
(`distillation_loss`, T = 2):

    loss = CE(z_s, y) + T² · mean_i[ w_i · CE(softmax(z_t/T), softmax(z_s/T)) ],
    w_i = 1 − exp(−CE_s,i / CE_t,i)   (detached hard-label cross-entropies).

SNN (`convert`). Every operator becomes one whose outputs, summed over time steps, equal the QANN
operator applied to the summed inputs; the time axis leads every tensor ([T, batch, ...]):

- quantiser -> ST-BIF neuron, threshold θ = s, membrane V in units of θ starting at V₀ = ½,
  spike count S starting at 0. Per step: V += x_t/θ; spike = +1 if V ≥ 1 and S < q_max,
  −1 if V < 0 and S > q_min, else 0; V −= spike; S += spike; emit spike·θ. Once silent,
  θ·S = Q(Σ_t x_t) whatever the timing of the input (V = ½ + Σx/θ − S stays in [0, 1) unless
  S sits at a bound).
- Linear -> the same weights on every step's input; the bias is released once, at t = 0.
- LayerNorm, softmax and the product of two spiking tensors (Q·Kᵀ, attn·V) -> telescoping
  operators: with running sums X_t = Σ_{τ≤t} x_τ, emit f(X_t) − f(X_{t−1}) (f(X_{−1}) = 0), so
  Σ_t out_t = f(X_T). For a product this is the paper's SESA form
  Ā_t B_tᵀ + A_t B̄_tᵀ − A_t B_tᵀ = Ā_t B̄_tᵀ − Ā_{t−1} B̄_{t−1}ᵀ.
- ReLU -> identity: the unsigned neuron before it keeps its count ≥ 0, and a per-step ReLU
  would drop the corrective −θ spikes it emits on the way.
- cls token and position embedding -> added at t = 0 only; the image is fed at t = 0, then zeros.
- residual additions and the 1/√d scale are linear and stay as they are.

`SpikingViT.run` steps until no neuron fires (a silent step changes no state, so every later one
is silent too: the paper's Judger), and returns the summed output, the steps used and the spikes
per layer. `SpikingViT.forward` runs a whole [T, ...] input layer by layer (vectorised over
time except inside the neurons); chunks of any length carry the same state, so the step-by-step
loop and one multi-step call give the same outputs.

Exact up to rounding: the SNN sums step by step where the QANN sums once, so an activation
within rounding distance of a quantiser's boundary can land on the other side (~1e-7 relative
in float32, where one flip in 360 digit images was measured; ~1e-16 in float64). Compare the
two in float64.

Deviations from the paper and the official code:
- Quantiser steps are initialised with the paper's formula on a fixed calibration batch before
  training (`calibrate`), not inside the first training forward: every data-parallel rank then
  starts from identical steps, and DeepSpeed's master copy of the weights sees them.
- The patch embedding is a Linear on flattened non-overlapping patches, which is the same map as
  timm's stride-p convolution.
- Weights stay full precision (as in the published runs); no weight quantiser.
- The teacher CE in the focal weight is clamped at the smallest normal float, so a teacher that
  is exactly right cannot make 0/0.
- The `bias_steps` variant of the spikingjelly port (bias spread over L steps) is not offered: the
  official ST-BIF mode releases it once.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from safetensors.torch import load_file, save_file
from torch import nn

from kiln.config import Section

# ---------------------------------------------------------------------------------------------
# The quantised ANN


class ViTConfig(Section):
    """A pre-norm ReLU vision transformer (timm's Block layout) for small images."""

    image_size: int = Field(8, ge=1, description="Height and width of the (square) input image.")
    channels: int = Field(1, ge=1, description="Input channels.")
    patch_size: int = Field(2, ge=1, description="Side of the non-overlapping square patches.")
    dim: int = Field(48, ge=2, description="Width of the residual stream.")
    depth: int = Field(2, ge=1, description="Transformer blocks.")
    heads: int = Field(2, ge=1, description="Attention heads (must divide dim).")
    mlp_dim: int = Field(96, ge=1, description="Hidden width of each block's ReLU MLP.")
    num_classes: int = Field(10, ge=2, description="Output classes.")

    @model_validator(mode="after")
    def _shapes_fit(self) -> ViTConfig:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"patch_size={self.patch_size} must divide image_size={self.image_size}"
            )
        if self.dim % self.heads:
            raise ValueError(f"heads={self.heads} must divide dim={self.dim}")
        return self

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def check_levels(levels: int) -> int:
    """L must be even (symmetric range −L/2..L/2−1) and ≥ 4 (q_max = L/2 − 1 ≥ 1)."""
    if levels < 4 or levels % 2:
        raise ValueError(f"expected an even quantisation level count ≥ 4, got levels={levels}")
    return levels


class Quantiser(nn.Module):
    """LSQ activation quantiser with round-half-up: Q(x) = s·clamp(⌊x/s + ½⌋, q_min, q_max)."""

    def __init__(self, levels: int, signed: bool):
        super().__init__()
        half = check_levels(levels) // 2
        self.q_min, self.q_max = (-half, half - 1) if signed else (0, levels - 1)
        # One step per tensor (per-tensor LSQ, as the official code), kept as shape [1].
        self.step = nn.Parameter(torch.ones(1))
        self.calibrating = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            with torch.no_grad():
                self.step.fill_(2 * x.abs().mean().item() / math.sqrt(self.q_max))
        # Forward values exactly s and ⌊·+½⌋ (a - a.detach() is exactly 0), so the converted
        # neuron sees the same numbers; gradients: LSQ's 1/√(q_max·numel) on s, and 1 through
        # the rounding (straight-through).
        scaled = self.step * (1 / math.sqrt(self.q_max * x.numel()))
        step = self.step.detach() + (scaled - scaled.detach())
        clamped = torch.clamp(x / step, self.q_min, self.q_max)
        rounded = torch.floor(clamped.detach() + 0.5) + (clamped - clamped.detach())
        return rounded * step

    def extra_repr(self) -> str:
        return f"q_min={self.q_min}, q_max={self.q_max}"


def _quantiser(levels: int | None, signed: bool) -> nn.Module:
    """A quantiser for the QANN, nothing for the full-precision model."""
    return nn.Identity() if levels is None else Quantiser(levels, signed)


class MatMul(nn.Module):
    """a @ b as a module, so that `convert` can swap in its spiking form."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ b


class TokenPrefix(nn.Module):
    """Prepends the cls token and adds the position embedding."""

    def __init__(self, num_tokens: int, dim: int):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.position = nn.Parameter(torch.randn(1, num_tokens, dim) * 0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        cls = self.cls.expand(*tokens.shape[:-2], 1, -1)
        return torch.cat([cls, tokens], dim=-2) + self.position


# Every forward below indexes dimensions from the end, so the same code runs the QANN on
# [batch, ...] and, after `convert`, the SNN on [time, batch, ...].


class Attention(nn.Module):
    def __init__(self, config: ViTConfig, levels: int | None):
        super().__init__()
        self.heads = config.heads
        self.scale = (config.dim // config.heads) ** -0.5
        self.qkv = nn.Linear(config.dim, 3 * config.dim)
        self.quant_q = _quantiser(levels, signed=True)
        self.quant_k = _quantiser(levels, signed=True)
        self.quant_v = _quantiser(levels, signed=True)
        self.scores = MatMul()
        self.softmax = nn.Softmax(dim=-1)
        self.quant_attn = _quantiser(levels, signed=False)
        self.attn_v = MatMul()
        self.quant_attn_v = _quantiser(levels, signed=True)
        self.proj = nn.Linear(config.dim, config.dim)
        self.quant_proj = _quantiser(levels, signed=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [..., N, 3D] -> three [..., heads, N, D/heads]
        qkv = self.qkv(x).unflatten(-1, (3, self.heads, -1)).movedim(-3, 0).transpose(-3, -2)
        q, k, v = self.quant_q(qkv[0]), self.quant_k(qkv[1]), self.quant_v(qkv[2])
        attn = self.quant_attn(self.softmax(self.scores(q, k.transpose(-2, -1)) * self.scale))
        out = self.quant_attn_v(self.attn_v(attn, v))
        return self.quant_proj(self.proj(out.transpose(-3, -2).flatten(-2)))


class MLP(nn.Module):
    def __init__(self, config: ViTConfig, levels: int | None):
        super().__init__()
        self.fc1 = nn.Linear(config.dim, config.mlp_dim)
        self.quant_fc1 = _quantiser(levels, signed=False)
        self.activation = nn.ReLU()
        self.fc2 = nn.Linear(config.mlp_dim, config.dim)
        self.quant_fc2 = _quantiser(levels, signed=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_fc2(self.fc2(self.activation(self.quant_fc1(self.fc1(x)))))


class Block(nn.Module):
    def __init__(self, config: ViTConfig, levels: int | None):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.dim)
        self.quant_norm1 = _quantiser(levels, signed=True)
        self.attn = Attention(config, levels)
        self.norm2 = nn.LayerNorm(config.dim)
        self.quant_norm2 = _quantiser(levels, signed=True)
        self.mlp = MLP(config, levels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.quant_norm1(self.norm1(x)))
        return x + self.mlp(self.quant_norm2(self.norm2(x)))


class ViT(nn.Module):
    """The ReLU ViT: full precision with `levels=None` (the teacher), else the QANN at level L."""

    def __init__(self, config: ViTConfig, levels: int | None = None):
        super().__init__()
        self.config, self.levels = config, levels
        patch_inputs = config.channels * config.patch_size**2
        self.patch_embed = nn.Linear(patch_inputs, config.dim)
        self.quant_patch = _quantiser(levels, signed=True)
        self.tokens = TokenPrefix(config.num_patches + 1, config.dim)
        self.blocks = nn.ModuleList(Block(config, levels) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.dim)
        self.quant_norm = _quantiser(levels, signed=True)
        self.head = nn.Linear(config.dim, config.num_classes)

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """[..., C, H, W] -> [..., patches, C·p·p], patches in row-major order."""
        p, side = self.config.patch_size, self.config.image_size // self.config.patch_size
        x = images.unflatten(-1, (side, p)).unflatten(-3, (side, p))  # [..., C, h, p, w, p]
        x = x.movedim(-2, -3).movedim(-5, -3)  # [..., h, w, C, p, p]
        return x.flatten(-3).flatten(-3, -2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.tokens(self.quant_patch(self.patch_embed(self.patchify(images))))
        for block in self.blocks:
            x = block(x)
        return self.head(self.quant_norm(self.norm(x))[..., 0, :])


@torch.no_grad()
def calibrate(qann: ViT, images: torch.Tensor) -> None:
    """Initialise every quantiser step to 2·mean|x|/√q_max on one batch, in forward order."""
    quantisers = [m for m in qann.modules() if isinstance(m, Quantiser)]
    for quantiser in quantisers:
        quantiser.calibrating = True
    try:
        qann(images)
    finally:
        for quantiser in quantisers:
            quantiser.calibrating = False


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 2.0,
) -> torch.Tensor:
    """CE(z_s, y) + T²·mean_i[w_i·CE(softmax(z_t/T), softmax(z_s/T))], w_i = 1 − e^(−CE_s/CE_t)."""
    ce_student = F.cross_entropy(student_logits, labels, reduction="none")
    ce_teacher = F.cross_entropy(teacher_logits.detach(), labels, reduction="none")
    tiny = torch.finfo(ce_teacher.dtype).tiny
    weight = 1 - torch.exp(-ce_student.detach() / ce_teacher.clamp_min(tiny))
    soft_targets = F.softmax(teacher_logits.detach() / temperature, dim=-1)
    soft_ce = -(soft_targets * F.log_softmax(student_logits / temperature, dim=-1)).sum(-1)
    return ce_student.mean() + temperature**2 * (weight * soft_ce).mean()


# ---------------------------------------------------------------------------------------------
# Saving and loading


def save_pretrained(model: ViT, folder: str | Path) -> None:
    """config.json (architecture and quantisation level) + model.safetensors."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"architecture": "kiln.snn.ViT", "levels": model.levels}
    config["vit"] = model.config.model_dump()
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tensors = {name: value.detach().contiguous() for name, value in model.state_dict().items()}
    save_file(tensors, folder / "model.safetensors")


def _describe_levels(levels: int | None) -> str:
    return "full precision (levels=None)" if levels is None else f"levels={levels}"


def load_pretrained(folder: str | Path, levels: int | None) -> ViT:
    """Load a saved ViT; `levels` is the quantisation the caller expects (None: full precision).

    The learned quantiser steps are only meaningful at the level they were trained with, so a
    mismatch is an error, not a silent reinterpretation.
    """
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    saved = config.get("levels")
    if saved != levels:
        raise ValueError(
            f"{folder}: the checkpoint is quantised as {_describe_levels(saved)} but "
            f"{_describe_levels(levels)} was asked for; quantiser steps are only valid at the "
            "level they were trained with"
        )
    model = ViT(ViTConfig.model_validate(config["vit"]), levels)
    state = load_file(folder / "model.safetensors")
    missing, unexpected = (
        model.state_dict().keys() - state.keys(),
        state.keys() - model.state_dict(),
    )
    if missing or unexpected:
        raise ValueError(
            f"{folder}: model.safetensors does not match config.json "
            f"(missing: {sorted(missing)}, unexpected: {sorted(unexpected)})"
        )
    model.load_state_dict(state)
    return model


# ---------------------------------------------------------------------------------------------
# The spiking operators


class STBIFNeuron(nn.Module):
    """ST-BIF neuron: signed spikes, spike count bounded to [q_min, q_max], V₀ = ½."""

    def __init__(self, threshold: torch.Tensor, q_min: int, q_max: int):
        super().__init__()
        self.register_buffer("threshold", threshold.detach().clone())
        self.q_min, self.q_max = q_min, q_max
        self.reset()

    def reset(self) -> None:
        self.membrane: torch.Tensor | None = None  # V, in units of the threshold
        self.count: torch.Tensor | None = None  # S, the signed spikes emitted so far
        self.spikes = 0  # spikes emitted since the reset, over the whole batch
        self.active: torch.Tensor | None = None  # [T, batch]: did the sample fire at step t

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        if self.membrane is None:
            self.membrane = torch.full_like(x_seq[0], 0.5)  # V₀ = ½ turns floor into rounding
            self.count = torch.zeros_like(x_seq[0])
        spikes = []
        for x in x_seq:
            self.membrane = self.membrane + x / self.threshold
            up = (self.membrane >= 1) & (self.count < self.q_max)
            down = (self.membrane < 0) & (self.count > self.q_min)
            spike = up.to(x.dtype) - down.to(x.dtype)
            self.membrane = self.membrane - spike
            self.count = self.count + spike
            spikes.append(spike)
        spikes = torch.stack(spikes)
        fired = spikes.ne(0)
        self.spikes = self.spikes + fired.sum()
        self.active = fired.reshape(*fired.shape[:2], -1).any(-1)
        return spikes * self.threshold


class SpikeLinear(nn.Module):
    """A Linear applied to every step's input; its bias is released once, at t = 0."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.reset()

    def reset(self) -> None:
        self.bias_released = False

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        out = F.linear(x_seq, self.weight)
        if not self.bias_released:
            out[0] += self.bias
            self.bias_released = True
        return out


class Telescoping(nn.Module):
    """out_t = f(X_t) − f(X_{t−1}) on the running sums X_t of each input; Σ_t out_t = f(X_T).

    The spiking LayerNorm and softmax (f = the QANN's module) and the spiking product of two
    spiking tensors (f = MatMul; the paper's SESA).
    """

    def __init__(self, function: nn.Module):
        super().__init__()
        self.function = function
        self.reset()

    def reset(self) -> None:
        self.sums: list[torch.Tensor] | None = None
        self.last_value: torch.Tensor | None = None

    def forward(self, *x_seqs: torch.Tensor) -> torch.Tensor:
        if self.sums is None:
            self.sums = [torch.zeros_like(x[0]) for x in x_seqs]
        # cumsum seeded with the carried sum adds in the same order as one step at a time.
        sums = [torch.cumsum(torch.cat([s[None], x]), 0)[1:] for s, x in zip(self.sums, x_seqs)]
        values = self.function(*sums)
        last = torch.zeros_like(values[:1]) if self.last_value is None else self.last_value[None]
        self.sums, self.last_value = [s[-1] for s in sums], values[-1]
        return values - torch.cat([last, values[:-1]])


class SpikeTokenPrefix(nn.Module):
    """Prepends a zero cls slot on every step; cls token and position embedding only at t = 0."""

    def __init__(self, tokens: TokenPrefix):
        super().__init__()
        self.cls, self.position = tokens.cls, tokens.position
        self.reset()

    def reset(self) -> None:
        self.released = False

    def forward(self, tokens_seq: torch.Tensor) -> torch.Tensor:
        out = torch.cat([torch.zeros_like(tokens_seq[..., :1, :]), tokens_seq], dim=-2)
        if not self.released:
            out[0, ..., :1, :] += self.cls
            out[0] += self.position[0]
            self.released = True
        return out


class SpikingOutput(NamedTuple):
    output: torch.Tensor  # [batch, classes], the outputs summed over the steps run
    steps: int  # steps until every sample was silent (max_steps if it never was)
    steps_per_sample: torch.Tensor  # [batch], 1 + the last step at which the sample spiked
    converged: bool  # silent before max_steps: only then does output equal the QANN's
    spikes_per_layer: dict[str, int]  # spikes emitted per neuron layer, over the whole batch


class SpikingViT(nn.Module):
    """The converted network (`convert`); inputs and outputs carry a leading time axis."""

    def __init__(self, network: ViT):
        super().__init__()
        self.network = network
        self.neurons = {n: m for n, m in network.named_modules() if isinstance(m, STBIFNeuron)}

    def reset(self) -> None:
        for module in self.network.modules():
            if isinstance(module, STBIFNeuron | SpikeLinear | Telescoping | SpikeTokenPrefix):
                module.reset()

    def forward(self, images_seq: torch.Tensor) -> torch.Tensor:
        """[T, batch, C, H, W] -> [T, batch, classes]; state carries over to the next call."""
        return self.network(images_seq)

    @torch.no_grad()
    def run(self, images: torch.Tensor, max_steps: int) -> SpikingOutput:
        """Feed `images` at t = 0 (then zeros) and step until no neuron fires, or max_steps."""
        self.reset()
        output = None
        last_active = torch.full((images.shape[0],), -1, device=images.device)
        converged, steps = False, max_steps
        for t in range(max_steps):
            step_input = images if t == 0 else torch.zeros_like(images)
            out = self.network(step_input[None])[0]
            output = out if output is None else output + out
            active = torch.stack([n.active[0] for n in self.neurons.values()]).any(0)
            last_active = torch.where(active, t, last_active)
            if not active.any():  # nothing fired: no state changed, every later step is silent
                converged, steps = True, t
                break
        spikes = {name: int(n.spikes) for name, n in self.neurons.items()}
        return SpikingOutput(output, steps, last_active + 1, converged, spikes)


def convert(qann: ViT) -> SpikingViT:
    """The SNN whose time-summed output equals the QANN's (operators as the module docstring)."""
    if qann.levels is None:
        raise ValueError("convert() needs a QANN (a ViT with levels set): no quantiser, no spikes")
    network = copy.deepcopy(qann).eval()
    for parent in list(network.modules()):
        for name, child in parent.named_children():
            if isinstance(child, Quantiser):
                spiking = STBIFNeuron(child.step, child.q_min, child.q_max)
            elif isinstance(child, nn.Linear):
                spiking = SpikeLinear(child)
            elif isinstance(child, nn.LayerNorm | nn.Softmax | MatMul):
                spiking = Telescoping(child)
            elif isinstance(child, nn.ReLU):
                spiking = nn.Identity()
            elif isinstance(child, TokenPrefix):
                spiking = SpikeTokenPrefix(child)
            else:
                continue
            setattr(parent, name, spiking)
    return SpikingViT(network)
