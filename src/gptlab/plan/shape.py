"""What a transformer's shape implies before anything runs: exact parameter counts and FLOPs per token.

A :class:`Shape` is the planner's view of a model. It covers every gptlab config (:meth:`Shape.from_config`),
routed mixture-of-experts layers included (``n_experts`` experts of which ``experts_per_token`` run per token, a
linear router, optionally in every ``moe_every``-th layer and with a shared expert), and the modern block: grouped-
query attention (``n_kv_head < n_head``), a head size of its own (``d_head``), rotary positions (no position table),
gated MLPs (SwiGLU: three matrices), RMSNorm (no bias), parameter-free norms, q/k/v-only biases and QK-norm.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..config import GPTConfig, preset
from ..errors import GptlabError

VISION_FIELDS = ("image_size", "image_channels", "patch_size", "image_encoder", "encoder_width", "projector")


@dataclass(frozen=True)
class Shape:
    n_layer: int
    d_model: int
    n_head: int
    n_ctx: int
    vocab_size: int
    d_ff: int | None = None  # default 4 * d_model
    n_kv_head: int | None = None  # default n_head (multi-head attention)
    bias: bool = True
    tie_weights: bool = True
    norm: str = "pre"
    n_experts: int = 1
    experts_per_token: int = 1
    expert_ff: int | None = None  # hidden width of a routed expert; default d_ff
    moe_every: int = 1  # every moe_every-th layer is routed (when n_experts > 1)
    shared_expert: bool = False  # an always-on MLP beside the routed experts in MoE layers
    # image prefix (gptlab.image_prefix; image_size 0 = text only): the GPTConfig fields of the same names
    image_size: int = 0
    image_channels: int = 3
    patch_size: int = 4
    image_encoder: str = "linear"
    encoder_width: int = 0
    projector: str = "linear"
    # the modern block (the GPTConfig options of the same meaning)
    d_head: int | None = None  # default d_model / n_head
    positions: str = "learned"  # or "rope": no position table
    gated_mlp: bool = False  # SwiGLU: gate, up and down matrices
    norm_type: str = "layernorm"  # or "rmsnorm": no bias
    norm_weight: bool = True  # False: parameter-free norms
    qkv_bias: bool = False
    qk_norm: bool = False

    def __post_init__(self) -> None:
        problems = [
            f"{k} must be a positive integer (got {getattr(self, k)!r})"
            for k in (
                "n_layer",
                "d_model",
                "n_head",
                "n_ctx",
                "vocab_size",
                "n_experts",
                "experts_per_token",
                "moe_every",
            )
            if not isinstance(getattr(self, k), int) or isinstance(getattr(self, k), bool) or getattr(self, k) < 1
        ]
        problems += [
            f"{k} must be a positive integer or unset (got {getattr(self, k)!r})"
            for k in ("d_ff", "n_kv_head", "expert_ff")
            if getattr(self, k) is not None
            and (not isinstance(getattr(self, k), int) or isinstance(getattr(self, k), bool) or getattr(self, k) < 1)
        ]
        problems += [
            f"{k} must be true or false (got {getattr(self, k)!r})"
            for k in ("bias", "tie_weights", "shared_expert")
            if not isinstance(getattr(self, k), bool)
        ]
        if self.norm not in ("pre", "post"):
            problems.append(f"norm must be pre or post (got {self.norm!r})")
        if not problems and self.d_head is None and self.d_model % self.n_head:
            problems.append(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if not problems and self.n_head % self.kv_heads:
            problems.append(f"n_head={self.n_head} is not a multiple of n_kv_head={self.kv_heads}")
        if not problems and self.experts_per_token > self.n_experts:
            problems.append(f"experts_per_token={self.experts_per_token} exceeds n_experts={self.n_experts}")
        if self.image_size and (self.patch_size < 1 or self.image_size % self.patch_size):
            problems.append(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
        if problems:
            raise GptlabError("invalid model shape: " + "; ".join(problems))

    @property
    def ff(self) -> int:
        return self.d_ff or 4 * self.d_model

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.d_head or self.d_model // self.n_head

    @property
    def d_attn(self) -> int:
        """Width of the queries (and of the attention output): n_head · head_dim."""
        return self.n_head * self.head_dim

    def norm_params(self, width: int) -> int:
        """Parameters of one norm over ``width`` channels: a gain unless parameter-free, a bias for LayerNorm."""
        gain = width if self.norm_weight else 0
        return gain * (2 if self.bias and self.norm_type == "layernorm" else 1)

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 if self.image_size else 0

    @property
    def moe_layers(self) -> int:
        return self.n_layer // self.moe_every if self.n_experts > 1 else 0

    @classmethod
    def from_config(cls, cfg: GPTConfig) -> Shape:
        return cls(
            n_layer=cfg.n_layer,
            d_model=cfg.n_embd,
            n_head=cfg.n_head,
            n_ctx=cfg.block_size,
            vocab_size=cfg.vocab_size,
            bias=cfg.bias,
            tie_weights=cfg.tie_weights,
            norm=cfg.norm,
            n_experts=cfg.n_experts,
            experts_per_token=cfg.experts_per_token,
            expert_ff=cfg.expert_ff or None,
            moe_every=cfg.moe_every,
            shared_expert=cfg.shared_expert,
            d_ff=cfg.mlp_hidden or None,
            n_kv_head=cfg.n_kv_head or None,
            d_head=cfg.head_size or None,
            positions=cfg.positions,
            gated_mlp=cfg.mlp == "swiglu",
            norm_type=cfg.norm_type,
            norm_weight=cfg.norm_weight,
            qkv_bias=cfg.qkv_bias,
            qk_norm=cfg.qk_norm,
            **{k: getattr(cfg, k) for k in VISION_FIELDS},
        )

    def replace(self, **changes: Any) -> Shape:
        return dataclasses.replace(self, **changes)


def resolve(model: str | GPTConfig | Shape, **changes: Any) -> Shape:
    """A Shape from a preset name, a gptlab config or a Shape, with fields replaced (``n_ctx=4096``, ...)."""
    if isinstance(model, str):
        model = preset(model)
    shape = Shape.from_config(model) if isinstance(model, GPTConfig) else model
    unknown = set(changes) - {f.name for f in dataclasses.fields(Shape)}
    if unknown:
        raise GptlabError(
            f"unknown shape field(s) {sorted(unknown)}; known: {[f.name for f in dataclasses.fields(Shape)]}"
        )
    return shape.replace(**changes) if changes else shape


def params(s: Shape) -> dict[str, int]:
    """Exact trainable parameters by component, the way ``GPT.num_params(breakdown=True)`` counts them (a tied head
    counts 0, vocabulary padding is left out), plus ``non_embedding`` (Kaplan et al. 2020's N: total minus token
    and position embeddings) and ``active`` (parameters a token passes through: with MoE, only
    ``experts_per_token`` of the experts' feed-forward weights; equal to ``total`` for dense models)."""
    d, L, hd, kv, da = s.d_model, s.n_layer, s.head_dim, s.kv_heads, s.d_attn
    qkv_out = da + 2 * kv * hd  # queries for every head, keys and values for the kv heads
    b, bq = int(s.bias), int(s.bias or s.qkv_bias)
    attention = L * (d * qkv_out + bq * qkv_out + da * d + b * d + (2 * s.norm_params(hd) if s.qk_norm else 0))
    up = 2 if s.gated_mlp else 1  # SwiGLU's gate and up
    dense = (up + 1) * d * s.ff + b * (up * s.ff + d)
    ef = s.expert_ff or s.ff
    expert = 2 * d * ef + b * (ef + d)
    M = s.moe_layers  # routed layers: n_experts experts, a router, maybe a shared (dense-width) expert
    mlp = (L - M) * dense + M * (s.n_experts * expert + d * s.n_experts + (dense if s.shared_expert else 0))
    norm = s.norm_params(d)
    parts = {
        "token_embedding": s.vocab_size * d,
        "position_embedding": s.n_ctx * d if s.positions == "learned" else 0,
        "attention": attention,
        "mlp": mlp,
        "norms": L * 2 * norm + (norm if s.norm == "pre" else 0),
        "head": 0 if s.tie_weights else s.vocab_size * d,
        **({"vision": vision_params(s)} if s.image_size else {}),
    }
    total = sum(parts.values())
    inactive = M * (s.n_experts - s.experts_per_token) * expert
    return {
        **parts,
        "total": total,
        "non_embedding": total - parts["token_embedding"] - parts["position_embedding"],
        "active": total - inactive,
    }


def forward_flops_per_token(s: Shape, n_ctx: int | None = None) -> dict[str, float]:
    """Forward-pass FLOPs per token by operation, Kaplan et al. 2020 Table 1 (a multiply-add = 2 FLOPs), at
    context ``n_ctx`` (default the model's). MoE counts the experts a token runs through.

    - ``embed`` 4·d_model; ``attention_qkv`` 2·L·d_model·(3·d_attn) (fewer keys/values with GQA);
      ``attention_mask`` 2·L·n_ctx·d_attn (QKᵀ and A·V over the causal half of the context, as Kaplan counts it);
      ``attention_project`` 2·L·d_attn·d_model; ``mlp`` 2·L·2·d_model·d_ff (plus the router);
      ``de_embed`` 2·d_model·n_vocab.
    - ``kaplan_total`` = 2·N + 2·L·n_ctx·d_attn with N the non-embedding parameters: Table 1's "Total
      (Non-Embedding)", which leaves out the de-embedding.
    - ``total``: every matmul, the de-embedding included, and the attention term.
    """
    n_ctx = n_ctx or s.n_ctx
    d, L, hd, kv, da = s.d_model, s.n_layer, s.head_dim, s.kv_heads, s.d_attn
    p = params(s)
    M = s.moe_layers
    dense_runs = (L - M) + (M if s.shared_expert else 0)  # dense-width MLPs a token runs through
    dense = (3 if s.gated_mlp else 2) * d * s.ff
    mlp = 2 * (dense * dense_runs + 2 * d * (s.expert_ff or s.ff) * M * s.experts_per_token) + 2 * M * d * s.n_experts
    out = {
        "embed": 4.0 * d,
        "attention_qkv": 2.0 * L * d * (da + 2 * kv * hd),
        "attention_mask": 2.0 * L * n_ctx * da,
        "attention_project": 2.0 * L * da * d,
        "mlp": float(mlp),
        "de_embed": 2.0 * d * s.vocab_size,
    }
    active_non_embedding = p["active"] - p["token_embedding"] - p["position_embedding"]
    out["kaplan_total"] = 2.0 * active_non_embedding + out["attention_mask"]
    out["total"] = sum(out[k] for k in ("attention_qkv", "attention_mask", "attention_project", "mlp", "de_embed"))
    return out


def _vision_widths(s: Shape) -> tuple[int, int]:
    """(channels of the features that are patched, width of one flattened patch)."""
    w = (s.encoder_width or s.image_channels) if s.image_encoder == "cnn" else s.image_channels
    return w, w * s.patch_size**2


def vision_params(s: Shape) -> int:
    """Exact parameters of the image prefix (:class:`gptlab.image_prefix.ImagePrefix`): the cnn encoder's two
    3x3 convolutions, the projector (linear, or Linear-GELU-Linear) and the row and column positions."""
    if not s.image_size:
        return 0
    c, d = s.image_channels, s.d_model
    w, d_in = _vision_widths(s)
    conv = (9 * c * w + w + 9 * w * w + w) if s.image_encoder == "cnn" else 0
    proj = d_in * d + d + ((d * d + d) if s.projector == "mlp" else 0)
    return conv + proj + 2 * (s.image_size // s.patch_size) * d


def image_flops(s: Shape) -> dict[str, float]:
    """Forward FLOPs per image: ``encoder`` (the cnn's convolutions, 2·S²·9·(c·w + w²)), ``projector``
    (2·P·d_in·d, plus 2·P·d² for the MLP's second layer) and ``decoder`` (the P prefix positions through every
    block at the model's context, as text tokens cost, less the de-embedding: they have no logits)."""
    P, d = s.image_tokens, s.d_model
    w, d_in = _vision_widths(s)
    per_token = forward_flops_per_token(s)
    out = {
        "image_tokens": float(P),
        "encoder": 2.0 * s.image_size**2 * 9 * (s.image_channels * w + w * w) if s.image_encoder == "cnn" else 0.0,
        "projector": 2.0 * P * (d_in * d + (d * d if s.projector == "mlp" else 0)),
        "decoder": P * (per_token["total"] - per_token["de_embed"]),
    }
    out["total"] = out["encoder"] + out["projector"] + out["decoder"]
    return out


def matmul_params(s: Shape) -> int:
    """The N of PaLM's 6N: parameters that take part in a matmul per token (active non-embedding weights plus the
    head, which a tied embedding also serves as). This is nanoGPT's count for a tied model (total minus the
    position embedding)."""
    p = params(s)
    return p["active"] - p["token_embedding"] - p["position_embedding"] + s.vocab_size * s.d_model


def palm_flops_per_token(n: float, n_layer: int, d_attn: int, seq_len: int) -> float:
    """Model FLOPs per trained token, Chowdhery et al. 2022 (PaLM), Appendix B: 6·N + 12·L·H·Q·T with H·Q = d_attn
    (heads × head size) and T the sequence length. The attention term counts the full T×T score matrix (no causal
    halving), as PaLM does; recomputation is not counted (model FLOPs, not hardware FLOPs)."""
    return 6.0 * n + 12.0 * n_layer * d_attn * seq_len


def training_flops_per_token(s: Shape, seq_len: int | None = None) -> float:
    """:func:`palm_flops_per_token` for ``s``, with N the matmul parameters (:func:`matmul_params`)."""
    return palm_flops_per_token(matmul_params(s), s.n_layer, s.n_head * s.head_dim, seq_len or s.n_ctx)


def mfu(s: Shape, tokens_per_second: float, peak_flops: float, seq_len: int | None = None) -> float:
    """Model FLOPs utilization (PaLM's definition): achieved model FLOP/s over the hardware's peak."""
    return tokens_per_second * training_flops_per_token(s, seq_len) / peak_flops


def attention_cost(s: Shape, contexts: list[int], bytes_per_element: float = 2.0) -> list[dict[str, float]]:
    """Attention's cost (Vaswani et al. 2017, Table 1; Dao et al. 2022 for what a fused kernel keeps), per layer
    and per sequence of ``n`` tokens, forward pass, no causal skipping:

    - ``scores_flops`` = 2·n²·d_attn (QKᵀ) and ``av_flops`` = 2·n²·d_attn (A·V);
    - ``rest_flops``: the projections and the MLPs a token runs through (2·n·(4·d² + 2·d·d_ff) when dense);
    - ``score_bytes``: the [n_head, n, n] score matrix a plain kernel materialises (softmax in place), vs a
      fused (flash) kernel, which keeps only one row statistic per query and head (``flash_bytes``, fp32).

    The two attention matmuls overtake the rest of the layer at n = (rest per token) / (4·d_attn), 6·d for a
    dense model with d_ff = 4·d (4,608 tokens for GPT-2 small)."""
    per_token_rest = _layer_matmul_flops(s)
    rows = []
    for n in contexts:
        attn = 4.0 * n * n * s.d_model
        rows.append(
            {
                "context": n,
                "scores_flops": attn / 2,
                "av_flops": attn / 2,
                "rest_flops": per_token_rest * n,
                "attention_share": attn / (attn + per_token_rest * n),
                "score_bytes": s.n_head * n * n * bytes_per_element,
                "flash_bytes": s.n_head * n * 4.0,
            }
        )
    return rows


def attention_crossover(s: Shape) -> float:
    """Context length at which QKᵀ + A·V FLOPs equal the rest of the layer's (see :func:`attention_cost`)."""
    return _layer_matmul_flops(s) / (4.0 * s.d_model)


def _layer_matmul_flops(s: Shape) -> float:
    """Forward FLOPs per token of an average layer's weight matmuls (QKV, output projection, the MLPs it runs)."""
    d = s.d_model
    mlp = forward_flops_per_token(s)["mlp"] / s.n_layer
    return 2.0 * (d * (d + 2 * s.kv_heads * s.head_dim) + d * d) + mlp
