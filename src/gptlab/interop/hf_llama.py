"""Hugging Face's Llama family <-> gptlab: ``LlamaForCausalLM`` (Llama 2/3.x, SmolLM2, TinyLlama, Mistral without
a sliding window), ``Qwen2ForCausalLM`` (biases on q/k/v) and ``Qwen3ForCausalLM`` (per-head RMSNorm of queries and
keys): configs and weights, both ways.

The block is gptlab's with ``positions="rope"``, ``norm_type="rmsnorm"``, ``mlp="swiglu"`` and no biases. HF keeps
q, k and v (and SwiGLU's gate and up) as separate matrices of [out, in]; gptlab stacks them into one ``c_attn``
([q; k; v]) and one ``c_fc`` ([gate; up]), so conversion is concatenation and slicing, exact both ways. Rotary
positions use the same "rotate half" channel pairing in both, so no permutation is needed (GGUF files, which
pair adjacent channels, need one: :mod:`gptlab.interop.gguf`).
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import GPTConfig
from ..errors import GptlabError

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def _rope(hf: dict[str, Any]) -> dict[str, Any]:
    """The rotary settings of a config: ``rope_parameters`` (transformers >= 5) or ``rope_theta`` and
    ``rope_scaling`` (earlier files, the Hub's)."""
    params = dict(hf.get("rope_scaling") or {})
    params.update(hf.get("rope_parameters") or {})
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise GptlabError(
            f"rotary scaling {kind!r} is not supported; gptlab reads the default rotary positions and Llama 3's "
            f"scaling (llama3)"
        )
    out: dict[str, Any] = {"rope_theta": float(params["rope_theta"])}
    if kind == "llama3":
        out.update(
            rope_scaling="llama3",
            rope_factor=float(params["factor"]),
            rope_low_freq_factor=float(params["low_freq_factor"]),
            rope_high_freq_factor=float(params["high_freq_factor"]),
            rope_original_context=int(params["original_max_position_embeddings"]),
        )
    return out


def config_from_hf(hf: dict[str, Any]) -> GPTConfig:
    """gptlab config of a HF ``config.json`` of the Llama family (:data:`MODEL_TYPES`)."""
    kind = hf["model_type"]
    missing = [
        k
        for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
        if k not in hf
    ]
    if missing:
        raise GptlabError(f"the Hugging Face config.json lacks {missing}; it is not a complete {kind} config")
    if hf.get("hidden_act", "silu") != "silu":
        raise GptlabError(f"hidden_act {hf.get('hidden_act')!r} is not supported; this layout is read with SwiGLU")
    window = hf.get("sliding_window")
    if hf.get("use_sliding_window") or (kind == "mistral" and window and window < hf.get("max_position_embeddings", 0)):
        raise GptlabError(
            f"this {kind} model attends through a sliding window of {window} tokens, which gptlab does not "
            f"implement; models without one (use_sliding_window false) load"
        )
    attention_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    if kind == "llama" and attention_bias != mlp_bias:
        raise GptlabError("attention_bias without mlp_bias (or the reverse) is not supported; gptlab's bias is one")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    return GPTConfig(
        n_layer=hf["num_hidden_layers"],
        n_head=heads,
        n_embd=hf["hidden_size"],
        block_size=hf.get("max_position_embeddings", 2048),
        vocab_size=hf["vocab_size"],
        bias=kind in ("llama", "mistral") and attention_bias,
        qkv_bias=kind == "qwen2",
        qk_norm=kind == "qwen3",
        tie_weights=bool(hf.get("tie_word_embeddings", False)),
        layer_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        init_std=float(hf.get("initializer_range", 0.02)),
        positions="rope",
        norm_type="rmsnorm",
        mlp="swiglu",
        mlp_hidden=hf["intermediate_size"],
        n_kv_head=hf.get("num_key_value_heads") or heads,
        head_size=0 if head_dim * heads == hf["hidden_size"] else head_dim,
        **_rope(hf),
    )


def family(cfg: GPTConfig) -> str:
    """The HF model type that holds ``cfg``, or one clear error naming what it cannot hold."""
    cannot = [
        (cfg.norm_type != "rmsnorm" or not cfg.norm_weight, "norms other than RMSNorm with a gain"),
        (cfg.mlp != "swiglu", f"the {cfg.mlp} MLP (the layout is SwiGLU)"),
        (cfg.norm != "pre", "post-norm blocks"),
        (cfg.logit_softcap > 0, "logit soft-capping"),
        (cfg.n_experts > 1, "mixture-of-experts layers"),
        (cfg.image_size > 0, "an image prefix"),
        (cfg.qk_norm and (cfg.qkv_bias or cfg.bias), "QK-norm together with biases"),
        (cfg.qkv_bias and cfg.bias, "biases on every projection together with qkv_bias"),
    ]
    problems = [what for bad, what in cannot if bad]
    if problems:
        raise GptlabError(
            "Hugging Face's Llama/Qwen layouts cannot hold " + ", ".join(problems) + "; keep it as a gptlab checkpoint"
        )
    return "qwen3" if cfg.qk_norm else "qwen2" if cfg.qkv_bias else "llama"


def config_to_hf(cfg: GPTConfig, bos_id: int | None, eos_id: int | None) -> dict[str, Any]:
    """A HF ``config.json`` for ``cfg``."""
    kind = family(cfg)
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "llama3":
        rope = {
            "rope_type": "llama3",
            "rope_theta": cfg.rope_theta,
            "factor": cfg.rope_factor,
            "low_freq_factor": cfg.rope_low_freq_factor,
            "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_context,
        }
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURES[kind]],
        "model_type": kind,
        "hidden_size": cfg.n_embd,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.ffn_hidden,
        "max_position_embeddings": cfg.block_size,
        "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.layer_norm_eps,
        "initializer_range": cfg.init_std,
        "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_weights,
        "rope_theta": cfg.rope_theta,  # the keys of transformers < 5 ...
        "rope_scaling": rope if cfg.rope_scaling != "none" else None,
        "rope_parameters": rope,  # ... and of transformers >= 5
        "attention_dropout": 0.0,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
    }
    if kind == "llama":
        out.update(attention_bias=cfg.bias, mlp_bias=cfg.bias)
    if kind in ("qwen2", "qwen3"):
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layer)
    if kind == "qwen3":
        out["attention_bias"] = False
    return out


def _layer_names(cfg: GPTConfig, i: int) -> dict[str, list[str]]:
    """gptlab tensor -> the HF tensors it stacks (one, or q/k/v, or gate/up), for block ``i``."""
    hf = f"model.layers.{i}."
    names = {
        f"h.{i}.ln_1.weight": [hf + "input_layernorm.weight"],
        f"h.{i}.attn.c_attn.weight": [hf + f"self_attn.{p}_proj.weight" for p in "qkv"],
        f"h.{i}.attn.c_proj.weight": [hf + "self_attn.o_proj.weight"],
        f"h.{i}.ln_2.weight": [hf + "post_attention_layernorm.weight"],
        f"h.{i}.mlp.c_fc.weight": [hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"],
        f"h.{i}.mlp.c_proj.weight": [hf + "mlp.down_proj.weight"],
    }
    if cfg.bias or cfg.qkv_bias:
        names[f"h.{i}.attn.c_attn.bias"] = [hf + f"self_attn.{p}_proj.bias" for p in "qkv"]
    if cfg.bias:
        names[f"h.{i}.attn.c_proj.bias"] = [hf + "self_attn.o_proj.bias"]
        names[f"h.{i}.mlp.c_fc.bias"] = [hf + "mlp.gate_proj.bias", hf + "mlp.up_proj.bias"]
        names[f"h.{i}.mlp.c_proj.bias"] = [hf + "mlp.down_proj.bias"]
    if cfg.qk_norm:
        names[f"h.{i}.attn.q_norm.weight"] = [hf + "self_attn.q_norm.weight"]
        names[f"h.{i}.attn.k_norm.weight"] = [hf + "self_attn.k_norm.weight"]
    return names


def names(cfg: GPTConfig) -> dict[str, list[str]]:
    """Every gptlab tensor of ``cfg`` -> the HF tensors it is made of."""
    out = {"wte.weight": ["model.embed_tokens.weight"]}
    for i in range(cfg.n_layer):
        out.update(_layer_names(cfg, i))
    out["ln_f.weight"] = ["model.norm.weight"]
    if not cfg.tie_weights:
        out["lm_head.weight"] = ["lm_head.weight"]
    return out


def from_hf_state_dict(hf_sd: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """gptlab's state dict (without a tied head; vocabulary rows padded as the config asks) from HF's."""
    out = {}
    for ours, theirs in names(cfg).items():
        missing = [t for t in theirs if t not in hf_sd]
        if missing:
            raise GptlabError(
                f"tensor {missing[0]!r} is missing from the Hugging Face weights; the file is truncated or not a "
                f"{family(cfg)} model of this config"
            )
        t = torch.cat([hf_sd[x] for x in theirs]) if len(theirs) > 1 else hf_sd[theirs[0]]
        if ours in ("wte.weight", "lm_head.weight"):
            t = torch.cat([t, t.new_zeros(cfg.padded_vocab_size - cfg.vocab_size, t.size(1))])
        out[ours] = t.contiguous()
    return out


def to_hf_state_dict(sd: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """HF's state dict from gptlab's (vocabulary padding dropped; a tied head left out, as HF re-ties it)."""
    family(cfg)
    q, kv, hidden = cfg.n_head * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.ffn_hidden
    out = {}
    for ours, theirs in names(cfg).items():
        t = sd[ours]
        if ours in ("wte.weight", "lm_head.weight"):
            t = t[: cfg.vocab_size]
        parts = [t] if len(theirs) == 1 else t.split([q, kv, kv] if ".attn." in ours else [hidden, hidden])
        out.update({name: part.contiguous() for name, part in zip(theirs, parts)})
    return out
