"""GGUF export: a gptlab model as one llama.cpp / Ollama file, written with the ``gguf`` package: the GPT-2 block as
llama.cpp's ``gpt2`` architecture (below), the modern block with rotary positions as its ``llama`` architecture
(:func:`_llama_tensors`: q/k rows interleaved for llama.cpp's rotary pairing, the byte-level BPE of
``tokenizer.json`` with its pre-tokenizer's llama.cpp name, special tokens and chat template). Reading GGUF files
back is :mod:`.gguf_read`.

The layout follows llama.cpp's ``gpt2`` architecture (``src/llama-model.cpp``, and its ``convert_hf_to_gguf.py`` for
GPT-2): ``token_embd``, ``position_embd``, per block ``attn_norm``, ``attn_qkv`` (q, k, v stacked, as gptlab's
``c_attn``), ``attn_output``, ``ffn_norm``, ``ffn_up``, ``ffn_down``, then ``output_norm`` and, for an untied head,
``output`` (a tied head is left out: llama.cpp then reads ``token_embd``). Matrices keep PyTorch's [out, in] order,
which is what gguf's writer expects. ``f32`` and ``f16`` store matrices as they say; ``q8_0`` and ``q4_0`` store them
in blocks of 32 weights with one fp16 scale each (``gguf.quants``: llama.cpp's own reference quantizers); vectors
(norms, biases) and the position table stay f32.

GPT-2's tokenizer goes in as llama.cpp's ``gpt2`` BPE: the byte-level vocabulary and merges of ``vocab.json`` and
``merges.txt`` (recovered from tiktoken's ranks), end-of-text as BOS and EOS. What llama.cpp has no architecture for
(post-norm GPT-1, exact-erf GELU, no biases, untied padded vocabularies, mixture of experts, other tokenizers) is
refused in one line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import GPTConfig
from ..errors import GptlabError
from ..files import fsync_dir, new_output, sibling

GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")


def _check_llama(cfg: GPTConfig, tokenizer: dict[str, Any]) -> None:
    problems = []
    if cfg.norm_type != "rmsnorm" or not cfg.norm_weight or cfg.mlp != "swiglu" or cfg.norm != "pre":
        problems.append("blocks other than pre-norm RMSNorm with a gain and SwiGLU")
    if cfg.bias or cfg.qkv_bias or cfg.qk_norm or cfg.logit_softcap:
        problems.append("biases, QK-norm or logit soft-capping")
    if cfg.rope_scaling != "none":
        problems.append("rescaled rotary frequencies")
    if cfg.n_experts > 1 or cfg.image_size:
        problems.append("mixture-of-experts layers or an image prefix")
    if tokenizer.get("kind") != "bpe":
        problems.append(f"the {tokenizer.get('kind')} tokenizer (a byte-level BPE maps to llama.cpp's gpt2 model)")
    if problems:
        raise GptlabError(f"GGUF export writes llama.cpp's llama architecture, which cannot hold {', '.join(problems)}")


def _check(cfg: GPTConfig, tokenizer: dict[str, Any]) -> None:
    if cfg.positions == "rope":
        return _check_llama(cfg, tokenizer)
    problems = []
    if cfg.norm != "pre":
        problems.append("post-norm (GPT-1) blocks")
    if cfg.activation != "gelu_new":
        problems.append("exact-erf GELU (llama.cpp's gpt2 uses the tanh approximation)")
    if not cfg.bias:
        problems.append("layers without biases")
    if cfg.norm_type != "layernorm" or cfg.mlp != "gelu":  # (rotary positions went to _check_llama)
        problems.append("modern-block options (rotary positions, RMSNorm, SwiGLU or ReLU²: llama.cpp's llama layout)")
    if cfg.n_kv_heads != cfg.n_head or cfg.qk_norm or cfg.qkv_bias or cfg.logit_softcap or not cfg.norm_weight:
        problems.append("grouped-query attention, QK-norm, q/k/v-only biases, soft-capping or parameter-free norms")
    if cfg.n_experts > 1:
        problems.append("mixture-of-experts layers")
    if cfg.image_size:
        problems.append("image prefix (gptlab's patch embedding has no llama.cpp counterpart)")
    if tokenizer.get("kind") != "gpt2" or cfg.vocab_size != 50257:
        problems.append(f"the {tokenizer.get('kind')} tokenizer (only GPT-2's BPE maps to llama.cpp's gpt2 vocabulary)")
    if problems:
        raise GptlabError(f"GGUF export writes llama.cpp's gpt2 architecture, which cannot hold {', '.join(problems)}")


def _tensors(sd: dict[str, torch.Tensor], cfg: GPTConfig) -> list[tuple[str, torch.Tensor]]:
    V = cfg.vocab_size
    out = [("token_embd.weight", sd["wte.weight"][:V]), ("position_embd.weight", sd["wpe.weight"])]
    names = {
        "ln_1": "attn_norm",
        "attn.c_attn": "attn_qkv",
        "attn.c_proj": "attn_output",
        "ln_2": "ffn_norm",
        "mlp.c_fc": "ffn_up",
        "mlp.c_proj": "ffn_down",
    }
    for i in range(cfg.n_layer):
        for ours, theirs in names.items():
            for kind in ("weight", "bias"):
                out.append((f"blk.{i}.{theirs}.{kind}", sd[f"h.{i}.{ours}.{kind}"]))
    out += [("output_norm.weight", sd["ln_f.weight"]), ("output_norm.bias", sd["ln_f.bias"])]
    if not cfg.tie_weights:
        out.append(("output.weight", sd["lm_head.weight"][:V]))
    return out


def _llama_tensors(sd: dict[str, torch.Tensor], cfg: GPTConfig) -> list[tuple[str, torch.Tensor]]:
    """llama.cpp's llama layout: Hugging Face's Llama tensors (:func:`.hf_llama.to_hf_state_dict`) under their GGUF
    names, the q and k rows of each head interleaved for llama.cpp's adjacent-pair rotary layout (the inverse of
    :func:`.gguf_read.unpermute`)."""
    from .gguf_read import hf_names, permute, rotary_heads
    from .hf_llama import to_hf_state_dict

    hf = to_hf_state_dict(sd, cfg)
    out = []
    for name, hf_name in hf_names(cfg).items():
        heads = rotary_heads(name, cfg)
        out.append((name, permute(hf[hf_name], heads) if heads else hf[hf_name]))
    return out


def _gpt2_header(w: Any, cfg: GPTConfig, tokenizer: dict[str, Any]) -> None:
    """The gpt2 architecture's keys, and GPT-2's BPE (recovered from tiktoken's ranks) with end-of-text as BOS
    and EOS."""
    import gguf

    from ..tokenizer import gpt2_ranks, ranks_to_vocab_merges

    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(4 * cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_head_count(cfg.n_head)
    w.add_layer_norm_eps(cfg.layer_norm_eps)
    vocab, merges = ranks_to_vocab_merges(gpt2_ranks())
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])] + ["<|endoftext|>"]
    eot = len(tokens) - 1  # 50256, after the 50,256 byte-level tokens
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if i == eot else gguf.TokenType.NORMAL for i in range(len(tokens))])
    w.add_token_merges(merges)
    w.add_bos_token_id(eot)
    w.add_eos_token_id(eot)


def _llama_header(w: Any, cfg: GPTConfig, tokenizer: dict[str, Any]) -> None:
    """The llama architecture's keys, and the byte-level BPE tokenizer of ``tokenizer.json`` with its special
    tokens, BOS/EOS, the add-BOS rule and the chat template."""
    import json

    import gguf

    from .gguf_read import pre_tokenizer_name

    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(cfg.ffn_hidden)
    w.add_block_count(cfg.n_layer)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.layer_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    data = json.loads(tokenizer["tokenizer_json"])
    vocab: dict[str, int] = dict(data["model"]["vocab"])
    special = {t["content"]: t["id"] for t in data.get("added_tokens", []) if t.get("special")}
    vocab.update({t["content"]: t["id"] for t in data.get("added_tokens", [])})
    if sorted(vocab.values()) != list(range(cfg.vocab_size)):
        raise GptlabError(f"the tokenizer's {len(vocab)} ids do not cover the model's vocabulary of {cfg.vocab_size}")
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre_tokenizer_name(data.get("pre_tokenizer")))
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    eos = vocab.get(tokenizer.get("eos_token") or "<|endoftext|>")
    bos = vocab.get(tokenizer["bos_token"]) if tokenizer.get("bos_token") else eos
    if eos is not None:
        w.add_eos_token_id(eos)
    if bos is not None:
        w.add_bos_token_id(bos)
    w.add_add_bos_token(bool(tokenizer.get("add_bos")))
    if tokenizer.get("chat_template"):
        w.add_chat_template(tokenizer["chat_template"])


def save_gguf(
    state: dict[str, torch.Tensor], cfg: GPTConfig, tokenizer: dict[str, Any], path: Path, ftype: str = "f32"
) -> Path:
    """Write ``path`` (new; written under a temporary name, then renamed)."""
    import gguf

    _check(cfg, tokenizer)
    if ftype not in GGUF_TYPES:
        raise GptlabError(f"unknown GGUF type {ftype!r}; choose one of {', '.join(GGUF_TYPES)}")
    if not path.parent.is_dir():
        raise GptlabError(f"the folder {path.parent} does not exist")
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    }[ftype]
    with new_output(path, "GGUF file"):
        tmp = sibling(path, "tmp")
        llama = cfg.positions == "rope"
        w = gguf.GGUFWriter(str(tmp), "llama" if llama else "gpt2")
        w.add_name("gptlab llama" if llama else "gptlab GPT-2")
        w.add_file_type(file_type)
        (_llama_header if llama else _gpt2_header)(w, cfg, tokenizer)
        for name, t in (_llama_tensors if llama else _tensors)(state, cfg):
            data = t.detach().float().cpu().numpy()
            if data.ndim == 2 and name != "position_embd.weight" and ftype != "f32":
                if ftype == "f16":
                    w.add_tensor(name, data.astype(np.float16))
                else:
                    kind = gguf.GGMLQuantizationType.Q8_0 if ftype == "q8_0" else gguf.GGMLQuantizationType.Q4_0
                    packed = gguf.quants.quantize(data, kind)
                    w.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=kind)
            else:
                w.add_tensor(name, data.astype(np.float32))
        try:
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
            fsync_dir(path.parent)
        finally:
            tmp.unlink(missing_ok=True)
    return path
