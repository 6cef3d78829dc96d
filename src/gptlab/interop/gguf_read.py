"""GGUF in: a llama.cpp file of the ``llama`` architecture (SmolLM2, Llama, TinyLlama, Mistral, ... as
``convert_hf_to_gguf.py`` writes them) as a gptlab model, tokenizer and chat template.

- **Weights** are dequantized to float32 with the ``gguf`` package's own decoders (``gguf.quants.dequantize``: F32,
  F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the K-quants), so the model computes with exactly the values llama.cpp
  stores; it holds 4 bytes a parameter (SmolLM2-135M: 538 MB from a 98 MB Q4_1 file). gptlab's own int8 / int4
  layouts are not block-for-block those of GGUF (one scale per row, or per group with an offset), so keeping a file
  quantized would not be exact; ``--quantize`` requantizes the float weights.
- **Layout**: llama.cpp's converter permutes the rows of the query and key matrices so that rotary pairs are
  adjacent channels (GPT-J style); gptlab, like ``transformers``, pairs channel i with i + d/2, so the permutation
  is undone here (``unpermute``). The tensors are then renamed to transformers' Llama names (``hf_names``) and
  stacked by :mod:`.hf_llama`, the one place that knows gptlab's ``c_attn`` / ``c_fc`` layout.
- **Tokenizer**: the file's byte-level BPE (``tokenizer.ggml.model = gpt2``: tokens, merges, token types) becomes a
  ``tokenizers`` BPE with the pre-tokenizer its ``tokenizer.ggml.pre`` names (llama.cpp's ``llama-vocab.cpp``), the
  control tokens as special tokens, BOS/EOS and the add-BOS rule, and ``tokenizer.chat_template``. An architecture,
  tokenizer model or pre-tokenizer this reader does not know is one error naming it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import GPTConfig
from ..errors import GptlabError
from ..model import with_tied

# tokenizer.ggml.pre -> the pre-tokenization of the model's tokenizer.json (llama.cpp's llama-vocab.cpp regexes)
PRE_TOKENIZERS = ("gpt-2", "default", "smollm")
CONTROL = 3  # llama.cpp's token type for control (special) tokens


def is_gguf(path: Path) -> bool:
    return path.suffix == ".gguf" and path.is_file()


def _fields(reader: Any) -> dict[str, Any]:
    out = {}
    for name, field in reader.fields.items():
        try:
            out[name] = field.contents()
        except Exception:  # a field type the gguf package cannot decode: never one this reader needs
            continue
    return out


def unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo ``convert_hf_to_gguf.py``'s ``permute`` of a query or key matrix [heads * head_dim, in]: its rows
    (i, i + d/2) of each head were interleaved into (2i, 2i + 1)."""
    return w.reshape(heads, w.size(0) // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """``convert_hf_to_gguf.py``'s ``permute``: the rows (i, i + d/2) of each head interleaved into (2i, 2i + 1)."""
    return w.reshape(heads, 2, w.size(0) // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def pre_tokenizer_name(pre: dict[str, Any] | None) -> str:
    """The ``tokenizer.ggml.pre`` of a ``tokenizer.json`` pre-tokenizer this module reads back the same way."""
    kinds = [p.get("type") for p in pre.get("pretokenizers", [])] if pre and pre.get("type") == "Sequence" else []
    if pre and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and pre and pre["pretokenizers"][0].get("individual_digits"):
        return "smollm"
    raise GptlabError(
        f"the tokenizer's pre-tokenizer ({(pre or {}).get('type')}) has no llama.cpp name this export knows; GGUF "
        f"export writes byte-level BPE tokenizers split as GPT-2's or SmolLM2's"
    )


def config_from_gguf(meta: dict[str, Any], tensors: set[str]) -> GPTConfig:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise GptlabError(
            f"this GGUF file's architecture is {arch!r}; gptlab reads llama (SmolLM2, Llama, TinyLlama, Mistral) "
            f"GGUF files"
        )
    if "rope_freqs.weight" in tensors or meta.get("llama.rope.scaling.type", "none") not in ("none",):
        raise GptlabError(
            "this GGUF file rescales its rotary frequencies (rope_freqs / rope scaling), which the GGUF reader does "
            "not support yet; load the model's Hugging Face folder instead"
        )
    heads, dim = int(meta["llama.attention.head_count"]), int(meta["llama.embedding_length"])
    head_dim = int(meta.get("llama.rope.dimension_count", dim // heads))
    vocab = int(meta.get("llama.vocab_size") or len(meta["tokenizer.ggml.tokens"]))
    return GPTConfig(
        n_layer=int(meta["llama.block_count"]),
        n_head=heads,
        n_kv_head=int(meta.get("llama.attention.head_count_kv", heads)),
        n_embd=dim,
        head_size=0 if head_dim * heads == dim else head_dim,
        mlp_hidden=int(meta["llama.feed_forward_length"]),
        block_size=int(meta["llama.context_length"]),
        vocab_size=vocab,
        rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
        layer_norm_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_weights="output.weight" not in tensors,
        positions="rope",
        norm_type="rmsnorm",
        mlp="swiglu",
        bias=False,
    )


# llama.cpp's per-block tensor names -> transformers' Llama names (convert_hf_to_gguf.py's tensor map)
_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_names(cfg: GPTConfig) -> dict[str, str]:
    """Every GGUF tensor of a llama-architecture ``cfg`` -> its Hugging Face Llama name, in llama.cpp's order."""
    out = {"token_embd.weight": "model.embed_tokens.weight"}
    for i in range(cfg.n_layer):
        out.update({f"blk.{i}.{g}.weight": f"model.layers.{i}.{h}.weight" for g, h in _BLOCK.items()})
    out["output_norm.weight"] = "model.norm.weight"
    if not cfg.tie_weights:
        out["output.weight"] = "lm_head.weight"
    return out


def rotary_heads(name: str, cfg: GPTConfig) -> int:
    """The heads whose rows llama.cpp's converter permutes in GGUF tensor ``name`` (0: not a query or key)."""
    return cfg.n_head if name.endswith("attn_q.weight") else cfg.n_kv_heads if name.endswith("attn_k.weight") else 0


def state_from_gguf(tensors: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """gptlab's state dict from the dequantized GGUF tensors: renamed to Hugging Face's Llama layout with q and k
    unpermuted, then read as :mod:`.hf_llama` reads that layout."""
    from .hf_llama import from_hf_state_dict

    hf = {}
    for name, hf_name in hf_names(cfg).items():
        if name not in tensors:
            raise GptlabError(f"tensor {name!r} is missing from the GGUF file; it is truncated or not a llama model")
        heads = rotary_heads(name, cfg)
        hf[hf_name] = unpermute(tensors[name], heads) if heads else tensors[name]
    return with_tied(from_hf_state_dict(hf, cfg), cfg)


def tokenizer_from_gguf(meta: dict[str, Any]) -> dict[str, Any]:
    """The gptlab tokenizer spec (a ``tokenizers`` BPE with the model's special tokens and chat template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise GptlabError(
            f"the GGUF tokenizer model {kind!r} is not supported; gptlab reads byte-level BPE (gpt2) tokenizers"
        )
    if pre not in PRE_TOKENIZERS:
        raise GptlabError(f"the GGUF pre-tokenizer {pre!r} is not supported; gptlab reads {', '.join(PRE_TOKENIZERS)}")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # digits one by one, then GPT-2's split (SmolLM2's tokenizer.json)
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([t for t, ty in zip(tokens, types) if ty == CONTROL])

    def name(key: str) -> str | None:
        i = meta.get(key)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    spec: dict[str, Any] = {"kind": "bpe", "tokenizer_json": tok.to_str()}
    eos, bos = name("tokenizer.ggml.eos_token_id"), name("tokenizer.ggml.bos_token_id")
    extra = {
        "eos_token": eos if eos != "<|endoftext|>" else None,
        "bos_token": bos,
        "add_bos": bool(meta.get("tokenizer.ggml.add_bos_token", False)) or None,
        "chat_template": meta.get("tokenizer.chat_template"),
    }
    return {**spec, **{k: v for k, v in extra.items() if v}}


def int4_layout(reader: Any) -> dict[str, Any]:
    """The int4 settings that re-quantize the file ``reader`` reads (a ``gguf.GGUFReader``) on its own grid, for
    ``--quantize int4`` and ``gptlab quantize``: ``group_size`` 32 where the blocks' matrices are stored in
    llama.cpp's quantized types (Q4_0/Q4_1/Q5_x/Q8_0 scale every 32 weights, the K-quants every 16 or 32 inside
    256), and ``head_mode`` int8 where the output matrix (or the tied embedding) is stored at 6 bits a weight or
    more, and at more than some of the blocks' matrices (llama.cpp's 4-bit files keep it at Q6_K or Q8_0). Empty
    for a float file: gptlab's defaults hold there. Re-quantizing a 4-bit file in groups of 64 rounds each weight a
    second time onto a grid that is not the file's: on SmolLM2-135M's Q4_1 file that is +50 % perplexity, against
    +0.07 % on the file's own grid (docs/quantization.md)."""
    import gguf

    def bits(t: Any) -> float:
        block, size = gguf.GGML_QUANT_SIZES[t.tensor_type]
        return 8 * size / block

    floats = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16)
    matrices = [t for t in reader.tensors if len(t.shape) == 2]
    heads = {t.name: t for t in matrices if t.name in ("output.weight", "token_embd.weight")}
    head = heads.get("output.weight", heads.get("token_embd.weight"))
    blocks = [t for t in matrices if t.name not in heads]
    if not blocks or any(t.tensor_type in floats for t in blocks):
        return {}
    layout: dict[str, Any] = {"group_size": 32}
    if head is not None and bits(head) >= 6 and bits(head) > min(bits(t) for t in blocks):
        layout["head_mode"] = "int8"
    return layout


def load_gguf(path: Path) -> tuple[dict[str, torch.Tensor], GPTConfig, dict[str, Any] | None, dict[str, Any]]:
    """(gptlab state dict, config, tokenizer spec, :func:`int4_layout`) of a llama GGUF file, read once (opening it
    parses the metadata, SmolLM2's 49,152-token vocabulary among it: 2.4 s)."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise GptlabError(f"{path} is not a readable GGUF file ({str(e)[:160]})") from None
    meta = _fields(reader)
    cfg = config_from_gguf(meta, {t.name for t in reader.tensors})
    spec = tokenizer_from_gguf(meta)
    tensors = {}
    for t in reader.tensors:
        try:
            values = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise GptlabError(
                f"tensor {t.name!r} of {path} is {t.tensor_type.name}, which the gguf package cannot dequantize"
            ) from None
        tensors[t.name] = torch.from_numpy(np.array(values, dtype=np.float32))  # a copy: the file is mapped read-only
    return state_from_gguf(tensors, cfg), cfg, spec, int4_layout(reader)
