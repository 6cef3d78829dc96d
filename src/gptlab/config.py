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
from dataclasses import dataclass
from typing import Any

from .errors import GptlabError
from .recipe import COUNT, NON_NEGATIVE, POSITIVE, PROBABILITY_BELOW_1, Range, RecipeConfig, opt

ACTIVATIONS = ("gelu_new", "gelu")  # tanh approximation (GPT-1/2/3; HF's gelu_new = gelu_pytorch_tanh), exact erf
NORMS = ("pre", "post")  # pre-norm (GPT-2/3: LN inside the residual branch), post-norm (GPT-1)
IMAGE_ENCODERS = ("linear", "cnn")  # Fuyu's linear map of raw patches; a small conv encoder (gptlab.image_prefix)
PROJECTORS = ("linear", "mlp")  # patch features -> n_embd: one linear map (Fuyu, LLaVA-1) or LLaVA-1.5's 2-layer MLP
POSITIONS = ("learned", "rope")  # GPT-1/2/3's learned table; rotary (Su et al. 2021; Llama, Qwen, SmolLM2, nanochat)
NORM_TYPES = ("layernorm", "rmsnorm")  # Ba et al. 2016; Zhang & Sennrich 2019 (Llama, Qwen, nanochat)
MLPS = ("gelu", "swiglu", "relu2")  # GPT-2's; Shazeer 2020 (Llama, Qwen); ReLU squared (So et al. 2021; nanochat)
ROPE_SCALINGS = ("none", "llama3")  # Llama 3.1's frequency-dependent scaling of the rotary frequencies


@dataclass(frozen=True)
class GPTConfig(RecipeConfig):
    """The model's shape and options. Every field carries its help text and valid range (:func:`gptlab.recipe.opt`),
    checked when a config is built, wherever it is built (presets, recipes' ``[model_overrides]``, ``--set``,
    checkpoints, converted models)."""

    help_hint = "docs/model.md"
    what = "model config"

    n_layer: int = opt(12, "transformer blocks", COUNT)
    n_head: int = opt(12, "attention heads per block", COUNT)
    n_embd: int = opt(768, "model width (d_model)", COUNT)
    block_size: int = opt(1024, "context length in tokens", COUNT)
    vocab_size: int = opt(50257, "vocabulary size", COUNT)
    norm: str = opt(
        "pre", "pre (GPT-2/3: LN inside the residual branch) or post (GPT-1: LN after the add)", choices=NORMS
    )
    activation: str = opt("gelu_new", "gelu_new (tanh approximation) or gelu (exact erf)", choices=ACTIVATIONS)
    bias: bool = opt(True, "biases in the linear layers and LayerNorms")
    dropout: float = opt(0.0, "dropout probability", PROBABILITY_BELOW_1)
    tie_weights: bool = opt(True, "the output head shares the token embedding (Press & Wolf 2017)")
    pad_vocab_multiple: int = opt(1, "pad embedding/head rows to a multiple of this (faster matmuls)", COUNT)
    layer_norm_eps: float = opt(1e-5, "LayerNorm epsilon", Range(0, 1, lo_open=True))
    init_std: float = opt(0.02, "std of the N(0, std) weight init", Range(0, 1, lo_open=True))
    # Mixture of experts (n_experts > 1): routed feed-forward layers, see gptlab.moe and docs/moe.md.
    n_experts: int = opt(1, "routed experts per MoE layer; 1 = dense", COUNT)
    experts_per_token: int = opt(1, "experts each token is routed to (top-k)", COUNT)
    expert_ff: int = opt(0, "hidden width of each routed expert; 0 = 4 * n_embd", NON_NEGATIVE)
    moe_every: int = opt(1, "MoE in every moe_every-th block (the others stay dense)", COUNT)
    shared_expert: bool = opt(False, "an always-on dense MLP beside the routed experts")
    capacity_factor: float = opt(
        0.0, "training only: keep <= factor * tokens * k / n_experts per expert; 0 = dropless", NON_NEGATIVE
    )
    aux_loss_weight: float = opt(0.01, "Switch/GShard load-balancing loss weight", NON_NEGATIVE)
    z_loss_weight: float = opt(0.0, "router z-loss weight (ST-MoE)", NON_NEGATIVE)
    # Image input (image_size > 0): a prefix of (image_size / patch_size)^2 image tokens, see gptlab.image_prefix.
    image_size: int = opt(0, "side of the square input image in pixels; 0 = a text-only model", NON_NEGATIVE)
    image_channels: int = opt(3, "3 = RGB, 1 = grey", COUNT)
    patch_size: int = opt(4, "side of one patch: one image token per patch", COUNT)
    image_encoder: str = opt(
        "linear", "linear (raw patches) or cnn (two 3x3 convolutions first)", choices=IMAGE_ENCODERS
    )
    encoder_width: int = opt(0, "channels of the cnn encoder; 0 = image_channels", NON_NEGATIVE)
    projector: str = opt("linear", "linear or mlp (Linear-GELU-Linear, LLaVA-1.5)", choices=PROJECTORS)
    # The modern block (Llama, Qwen, SmolLM2, nanochat): each option on its own, any combination (docs/model.md).
    positions: str = opt("learned", "learned (GPT-1/2/3) or rope (rotary, on queries and keys)", choices=POSITIONS)
    rope_theta: float = opt(10000.0, "rope: the base of the rotary frequencies", Range(1, lo_open=False))
    rope_scaling: str = opt("none", "rope: none, or llama3 (Llama 3.1's long-context rescaling)", choices=ROPE_SCALINGS)
    rope_factor: float = opt(8.0, "rope llama3: the factor low frequencies are divided by", Range(1))
    rope_low_freq_factor: float = opt(1.0, "rope llama3: wavelengths above context / this are scaled", POSITIVE)
    rope_high_freq_factor: float = opt(4.0, "rope llama3: wavelengths below context / this are kept", POSITIVE)
    rope_original_context: int = opt(8192, "rope llama3: the context the frequencies were trained for", COUNT)
    norm_type: str = opt("layernorm", "layernorm or rmsnorm", choices=NORM_TYPES)
    norm_weight: bool = opt(True, "norms with a learned gain (false: parameter-free, as nanochat's RMSNorm)")
    mlp: str = opt(
        "gelu", "gelu (GPT-2, see activation), swiglu (gate, up, down) or relu2 (ReLU squared)", choices=MLPS
    )
    mlp_hidden: int = opt(0, "hidden width of the feed-forward layer; 0 = 4 * n_embd", NON_NEGATIVE)
    n_kv_head: int = opt(
        0, "key/value heads: fewer than n_head is grouped-query attention, 1 multi-query; 0 = n_head", NON_NEGATIVE
    )
    head_size: int = opt(0, "channels per attention head; 0 = n_embd / n_head", NON_NEGATIVE)
    qk_norm: bool = opt(False, "normalise queries and keys per head before attention (Qwen3, nanochat)")
    qkv_bias: bool = opt(False, "biases on the query, key and value projections only (Qwen2)")
    logit_softcap: float = opt(
        0.0, "cap the logits softly at +-c: c * tanh(logits / c) (Gemma 2, nanochat); 0 = off", NON_NEGATIVE
    )

    @property
    def image_tokens(self) -> int:
        """Length of the image prefix: one token per patch (0 for a text-only model)."""
        return (self.image_size // self.patch_size) ** 2 if self.image_size else 0

    def checks(self) -> list[tuple[bool, str]]:
        divisors = [h for h in range(1, self.n_embd + 1) if self.n_embd % h == 0][:12]
        kv = self.n_kv_head or self.n_head
        return [
            (
                self.head_size > 0 or self.n_embd % self.n_head == 0,
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; pick n_head among {divisors} "
                f"(or set head_size)",
            ),
            (
                self.n_head % kv == 0,
                f"n_head={self.n_head} is not a multiple of n_kv_head={kv}; each key/value head serves a whole group "
                f"of query heads",
            ),
            (self.positions == "rope" or self.rope_scaling == "none", "rope_scaling needs positions = rope"),
            (
                self.positions != "rope" or self.head_dim % 2 == 0,
                f"rotary positions rotate pairs of channels: the head size {self.head_dim} must be even",
            ),
            (
                self.n_experts == 1 or self.mlp == "gelu",
                f"the routed experts are GELU MLPs; mlp = {self.mlp} works in dense models only (n_experts = 1)",
            ),
            (
                self.experts_per_token <= self.n_experts,
                f"experts_per_token={self.experts_per_token} exceeds n_experts={self.n_experts}",
            ),
            (
                not self.image_size or self.image_size % self.patch_size == 0,
                f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}",
            ),
            (
                self.image_tokens < self.block_size,
                f"the image prefix ({self.image_tokens} tokens) leaves no room for text in block_size="
                f"{self.block_size}; raise block_size or patch_size",
            ),
        ]

    @property
    def head_dim(self) -> int:
        return self.head_size or self.n_embd // self.n_head

    @property
    def n_kv_heads(self) -> int:
        """Key/value heads, what the KV cache stores per layer: n_head, or fewer with grouped-query attention."""
        return self.n_kv_head or self.n_head

    @property
    def ffn_hidden(self) -> int:
        """The feed-forward layer's hidden width."""
        return self.mlp_hidden or 4 * self.n_embd

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

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        return cls().replace(**d)


def _gpt3(n_layer: int, n_embd: int, n_head: int) -> GPTConfig:
    return GPTConfig(n_layer=n_layer, n_embd=n_embd, n_head=n_head, block_size=2048, vocab_size=50257)


def _llama(**kw: Any) -> GPTConfig:
    """The Llama block: rotary positions, RMSNorm, SwiGLU, no biases (Touvron et al. 2023)."""
    return GPTConfig(positions="rope", norm_type="rmsnorm", mlp="swiglu", bias=False, **kw)


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
    # The Llama family, as the models' Hugging Face config.json files give them (docs/model.md).
    "smollm2-135m": _llama(
        n_layer=30, n_head=9, n_kv_head=3, n_embd=576, mlp_hidden=1536, block_size=8192, vocab_size=49152,
        rope_theta=100000.0, layer_norm_eps=1e-5, init_std=0.041666666666666664,
    ),
    "smollm2-360m": _llama(
        n_layer=32, n_head=15, n_kv_head=5, n_embd=960, mlp_hidden=2560, block_size=8192, vocab_size=49152,
        rope_theta=100000.0, layer_norm_eps=1e-5,
    ),
    "llama-3.2-1b": _llama(
        n_layer=16, n_head=32, n_kv_head=8, n_embd=2048, mlp_hidden=8192, block_size=131072, vocab_size=128256,
        rope_theta=500000.0, rope_scaling="llama3", rope_factor=32.0, rope_low_freq_factor=1.0,
        rope_high_freq_factor=4.0, rope_original_context=8192, layer_norm_eps=1e-5,
    ),
    "qwen2.5-0.5b": _llama(
        n_layer=24, n_head=14, n_kv_head=2, n_embd=896, mlp_hidden=4864, block_size=32768, vocab_size=151936,
        rope_theta=1000000.0, layer_norm_eps=1e-6, qkv_bias=True,
    ),
    # A small modern block for CPU training (nanochat's choices: parameter-free RMSNorm, ReLU², QK-norm, untied
    # head, logits soft-capped at 15), the size of `baby`.
    "baby-modern": GPTConfig(
        n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=256, positions="rope", norm_type="rmsnorm",
        norm_weight=False, mlp="relu2", bias=False, qk_norm=True, tie_weights=False, logit_softcap=15.0,
    ),
}  # fmt: skip


def preset(name: str, **overrides: Any) -> GPTConfig:
    """Return the named preset, optionally with fields replaced (``preset("baby", vocab_size=65)``)."""
    if name not in PRESETS:
        raise GptlabError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
