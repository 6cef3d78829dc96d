"""Model configuration: one typed dataclass and the named presets of the GPT family.

Sources for the presets:
- GPT-1: Radford et al. 2018, section 4.1 (12 layers, 768 wide, 12 heads, 512 context, 40,478 BPE tokens,
  post-norm: LayerNorm after each residual add). Its GELU is the tanh approximation: OpenAI's released code
  computes ``0.5x(1 + tanh(sqrt(2/pi)(x + 0.044715x^3)))`` and Hugging Face's ``OpenAIGPTModel`` maps its
  ``afn="gelu"`` to that same ``gelu_new`` function (not to the exact erf GELU, despite the name).
- GPT-2: Radford et al. 2019, Table 2, with the sizes of the released checkpoints (Hugging Face ``gpt2*``).
- GPT-3: Brown et al. 2020, Table 2.1. Two printed rows do not divide: GPT-3 XL lists 24 heads of 128 for a
  2048-wide model (24 x 128 = 3072), so we use 16 heads of 128; GPT-3 13B lists d_model 5140, which 40 heads
  cannot divide, so we use 5120 (= 40 x 128, the head size the table prints).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .errors import GptlabError

ACTIVATIONS = ("gelu_new", "gelu")  # tanh approximation (GPT-1/2/3; HF's gelu_new = gelu_pytorch_tanh), exact erf
NORMS = ("pre", "post")  # pre-norm (GPT-2/3: LN inside the residual branch), post-norm (GPT-1)
IMAGE_ENCODERS = ("linear", "cnn")  # Fuyu's linear map of raw patches; a small conv encoder (gptlab.image_prefix)
PROJECTORS = ("linear", "mlp")  # patch features -> n_embd: one linear map (Fuyu, LLaVA-1) or LLaVA-1.5's 2-layer MLP


@dataclass(frozen=True)
class GPTConfig:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024  # context length
    vocab_size: int = 50257
    norm: str = "pre"
    activation: str = "gelu_new"
    bias: bool = True
    dropout: float = 0.0
    tie_weights: bool = True
    pad_vocab_multiple: int = 1  # e.g. 64: embedding/head rows padded for faster matmuls; never sampled
    layer_norm_eps: float = 1e-5
    init_std: float = 0.02
    # Mixture of experts (n_experts > 1): routed feed-forward layers, see model.MoE and docs/moe.md.
    n_experts: int = 1  # 1 = dense
    experts_per_token: int = 1  # top-k
    expert_ff: int = 0  # hidden width of each routed expert; 0 = 4 * n_embd (2 * n_embd with top-2 = dense cost)
    moe_every: int = 1  # MoE in every moe_every-th block (the others stay dense)
    shared_expert: bool = False  # an always-on dense MLP beside the routed experts
    capacity_factor: float = 0.0  # training only: keep <= factor * tokens * k / n_experts per expert; 0 = dropless
    aux_loss_weight: float = 0.01  # Switch/GShard load-balancing loss weight
    z_loss_weight: float = 0.0  # router z-loss weight (ST-MoE)
    # Image input (image_size > 0): a prefix of (image_size / patch_size)^2 image tokens, see gptlab.image_prefix.
    image_size: int = 0  # side of the square input image in pixels; 0 = a text-only model
    image_channels: int = 3  # 3 = RGB, 1 = grey
    patch_size: int = 4  # side of one patch: one image token per patch
    image_encoder: str = "linear"  # "linear" (raw patches) or "cnn" (two 3x3 convolutions first)
    encoder_width: int = 0  # channels of the cnn encoder; 0 = image_channels (the linear prefix's parameters)
    projector: str = "linear"  # "linear" or "mlp" (Linear-GELU-Linear)

    @property
    def image_tokens(self) -> int:
        """Length of the image prefix: one token per patch (0 for a text-only model)."""
        return (self.image_size // self.patch_size) ** 2 if self.image_size else 0

    def __post_init__(self) -> None:
        problems = []
        for f in dataclasses.fields(self):  # every field has its default's type (ints are fine where floats go)
            value, want = getattr(self, f.name), type(f.default)
            ok = isinstance(value, want) and (want is bool or not isinstance(value, bool))
            if want is float and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, f.name, float(value))
                ok = True
            if not ok:
                problems.append(f"{f.name} must be of type {want.__name__} (got {value!r})")
        if problems:
            raise GptlabError("invalid model config: " + "; ".join(problems))
        for name in (
            "n_layer",
            "n_head",
            "n_embd",
            "block_size",
            "vocab_size",
            "pad_vocab_multiple",
            "n_experts",
            "experts_per_token",
            "moe_every",
            "image_channels",
            "patch_size",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1 (got {getattr(self, name)!r})")
        if not problems and self.n_embd % self.n_head:
            problems.append(
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                f"pick n_head among {[h for h in range(1, self.n_embd + 1) if self.n_embd % h == 0][:12]}"
            )
        if self.norm not in NORMS:
            problems.append(f"norm must be one of {NORMS} (got {self.norm!r})")
        if self.activation not in ACTIVATIONS:
            problems.append(f"activation must be one of {ACTIVATIONS} (got {self.activation!r})")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1) (got {self.dropout!r})")
        if not (0.0 < self.layer_norm_eps <= 1.0 and 0.0 < self.init_std <= 1.0):
            problems.append(
                f"layer_norm_eps and init_std must be in (0, 1] (got {self.layer_norm_eps!r}, {self.init_std!r})"
            )
        if not problems and self.experts_per_token > self.n_experts:
            problems.append(f"experts_per_token={self.experts_per_token} exceeds n_experts={self.n_experts}")
        if (
            not all(
                math.isfinite(v) and v >= 0 for v in (self.capacity_factor, self.aux_loss_weight, self.z_loss_weight)
            )
            or self.expert_ff < 0
        ):
            problems.append("capacity_factor, aux_loss_weight, z_loss_weight and expert_ff must be finite and >= 0")
        if self.image_size < 0 or self.encoder_width < 0:
            problems.append("image_size and encoder_width must be >= 0")
        elif self.image_size and self.image_size % self.patch_size:
            problems.append(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
        elif self.image_tokens >= self.block_size:
            problems.append(
                f"the image prefix ({self.image_tokens} tokens) leaves no room for text in block_size="
                f"{self.block_size}; raise block_size or patch_size"
            )
        if self.image_encoder not in IMAGE_ENCODERS or self.projector not in PROJECTORS:
            problems.append(f"image_encoder must be one of {IMAGE_ENCODERS} and projector one of {PROJECTORS}")
        if problems:
            raise GptlabError("invalid model config: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_kv_heads(self) -> int:
        """Key/value heads, what the KV cache stores per layer (every query head has its own in this block)."""
        return self.n_head

    def is_moe_layer(self, i: int) -> bool:
        """Block ``i`` (0-based) is routed when ``n_experts > 1`` and ``i + 1`` is a multiple of ``moe_every``."""
        return self.n_experts > 1 and (i + 1) % self.moe_every == 0

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_multiple
        return -(-self.vocab_size // m) * m

    def replace(self, **changes: Any) -> GPTConfig:
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise GptlabError(
                f"unknown model config field(s) {sorted(unknown)}; known: {[f.name for f in dataclasses.fields(self)]}"
            )
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        return cls().replace(**d)


def _gpt3(n_layer: int, n_embd: int, n_head: int) -> GPTConfig:
    return GPTConfig(n_layer=n_layer, n_embd=n_embd, n_head=n_head, block_size=2048, vocab_size=50257)


PRESETS: dict[str, GPTConfig] = {
    # GPT-1: post-norm, tanh-approximated GELU (see the module docstring), 512 context, 40,478-token BPE.
    "gpt1": GPTConfig(
        n_layer=12, n_head=12, n_embd=768, block_size=512, vocab_size=40478, norm="post", activation="gelu_new"
    ),
    # GPT-2 family (released checkpoints).
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),
    # GPT-3 family, Table 2.1 (see the module docstring for the two corrected rows).
    "gpt3-small": _gpt3(12, 768, 12),
    "gpt3-medium": _gpt3(24, 1024, 16),
    "gpt3-large": _gpt3(24, 1536, 16),
    "gpt3-xl": _gpt3(24, 2048, 16),
    "gpt3-2.7b": _gpt3(32, 2560, 32),
    "gpt3-6.7b": _gpt3(32, 4096, 32),
    "gpt3-13b": _gpt3(40, 5120, 40),
    "gpt3-175b": _gpt3(96, 12288, 96),
    # Tiny CPU presets. `baby` is nanoGPT's CPU recipe shape (the demo); vocab is set from the tokenizer.
    "baby": GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=256),
    "tiny": GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=256),
    "mini": GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=256),
}


def preset(name: str, **overrides: Any) -> GPTConfig:
    """Return the named preset, optionally with fields replaced (``preset("baby", vocab_size=65)``)."""
    if name not in PRESETS:
        raise GptlabError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
