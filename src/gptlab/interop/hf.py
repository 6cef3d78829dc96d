"""Hugging Face ``GPT2LMHeadModel`` / ``OpenAIGPTLMHeadModel`` <-> gptlab weight mapping.

HF stores the projection matrices as Conv1D with [in, out] weights; gptlab uses nn.Linear's [out, in], so those four
matrices per block are transposed. HF's GPT-1 names its embeddings ``tokens_embed`` / ``positions_embed`` and has no
final LayerNorm. Attention-mask buffers (``attn.bias``, ``attn.masked_bias``) are not weights and are dropped.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import GPTConfig
from ..errors import GptlabError

_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def config_from_hf(hf: dict[str, Any]) -> GPTConfig:
    """gptlab config from a HF ``config.json`` dict (model_type ``gpt2`` or ``openai-gpt``)."""
    gpt1 = hf.get("model_type") == "openai-gpt"
    # HF's GPT-1 maps afn="gelu" to the tanh approximation, i.e. gptlab's "gelu_new".
    act = "gelu_new" if gpt1 and hf.get("afn", "gelu") == "gelu" else hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu"):
        raise GptlabError(f"unsupported activation {act!r} in the Hugging Face config; gptlab supports gelu_new, gelu")
    return GPTConfig(n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                     block_size=hf["n_positions"], vocab_size=hf["vocab_size"],
                     norm="post" if gpt1 else "pre", activation=act,
                     layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                     tie_weights=hf.get("tie_word_embeddings", True))


def _names(cfg: GPTConfig) -> list[tuple[str, str]]:
    """(gptlab name, HF name) pairs for every weight of a model with this config."""
    gpt1 = cfg.norm == "post"
    pairs = [("wte.weight", "transformer.tokens_embed.weight" if gpt1 else "transformer.wte.weight"),
             ("wpe.weight", "transformer.positions_embed.weight" if gpt1 else "transformer.wpe.weight")]
    per_block = ["ln_1.weight", "attn.c_attn.weight", "attn.c_proj.weight", "ln_2.weight",
                 "mlp.c_fc.weight", "mlp.c_proj.weight"]
    if cfg.bias:
        per_block += ["ln_1.bias", "attn.c_attn.bias", "attn.c_proj.bias", "ln_2.bias",
                      "mlp.c_fc.bias", "mlp.c_proj.bias"]
    for i in range(cfg.n_layer):
        pairs += [(f"h.{i}.{n}", f"transformer.h.{i}.{n}") for n in per_block]
    if not gpt1:
        pairs += [("ln_f.weight", "transformer.ln_f.weight")] + ([("ln_f.bias", "transformer.ln_f.bias")]
                                                               if cfg.bias else [])
    if not cfg.tie_weights:
        pairs.append(("lm_head.weight", "lm_head.weight"))
    return pairs


def from_hf_state_dict(hf_sd: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """Map a HF state dict to gptlab names and layouts (padding the vocabulary rows if the config asks for it)."""
    out = {}
    for ours, theirs in _names(cfg):
        if theirs not in hf_sd:
            raise GptlabError(f"tensor {theirs!r} is missing from the Hugging Face weights; "
                              f"the file is truncated or not a {'GPT-1' if cfg.norm == 'post' else 'GPT-2'} model")
        t = hf_sd[theirs]
        if theirs.endswith(_CONV1D):
            t = t.t()
        if ours == "wte.weight" or ours == "lm_head.weight":
            t = torch.cat([t, t.new_zeros(cfg.padded_vocab_size - cfg.vocab_size, t.size(1))])
        out[ours] = t.contiguous()
    if cfg.tie_weights:
        out["lm_head.weight"] = out["wte.weight"]
    return out


def to_hf_state_dict(sd: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """Map a gptlab state dict to HF names and layouts (dropping vocabulary padding rows)."""
    out = {}
    for ours, theirs in _names(cfg):
        t = sd[ours]
        if theirs.endswith(_CONV1D):
            t = t.t()
        if ours in ("wte.weight", "lm_head.weight"):
            t = t[: cfg.vocab_size]
        out[theirs] = t.contiguous()
    if cfg.tie_weights:
        out["lm_head.weight"] = out[_names(cfg)[0][1]]
    return out
