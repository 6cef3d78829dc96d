"""Hugging Face model folders <-> gptlab: weights, config and tokenizer files. This module holds GPT-2
(``GPT2LMHeadModel``) and GPT-1 (``OpenAIGPTLMHeadModel``); :mod:`.hf_llama` the Llama family (Llama, Mistral,
Qwen2, Qwen3), to which the functions here hand the models with rotary positions.

HF stores the projection matrices as Conv1D with [in, out] weights; gptlab uses nn.Linear's [out, in], so those four
matrices per block are transposed. HF's GPT-1 names its embeddings ``tokens_embed`` / ``positions_embed`` and has no
final LayerNorm. Attention-mask buffers (``attn.bias``, ``attn.masked_bias``) are not weights and are dropped. A tied
head is stored once (HF re-ties ``lm_head.weight`` to the token embedding on load).

An exported folder holds ``model.safetensors``, ``config.json``, ``generation_config.json`` and the tokenizer:
``vocab.json`` + ``merges.txt`` + ``tokenizer.json`` for GPT-2's BPE, ``tokenizer.json`` for a trained BPE or a
character vocabulary, with ``tokenizer_config.json`` and ``special_tokens_map.json`` so ``AutoTokenizer`` works.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..checkpoint import check_weights, read_safetensors
from ..config import GPTConfig
from ..errors import GptlabError
from ..files import atomic_dir, honour_umask
from ..model import with_tied
from ..tokenizer import (
    EOT_TEXT,
    BPETokenizer,
    CharTokenizer,
    GPT2Tokenizer,
    Tokenizer,
    from_spec,
    gpt2_ranks,
    ranks_to_vocab_merges,
    vocab_to_ranks,
)
from . import hf_llama

_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def config_from_hf(hf: dict[str, Any]) -> GPTConfig:
    """gptlab config from a HF ``config.json`` dict (model_type ``gpt2``, ``openai-gpt``, or one of the Llama
    family's, :data:`.hf_llama.MODEL_TYPES`)."""
    if hf.get("model_type") in hf_llama.MODEL_TYPES:
        return hf_llama.config_from_hf(hf)
    if hf.get("model_type") not in ("gpt2", "openai-gpt"):
        raise GptlabError(
            f"model_type {hf.get('model_type')!r} is not supported; gptlab imports GPT-2 (gpt2, distilgpt2, ...), "
            f"GPT-1 (openai-gpt) and the Llama family ({', '.join(hf_llama.MODEL_TYPES)}) models"
        )
    gpt1 = hf.get("model_type") == "openai-gpt"
    # HF's GPT-1 maps afn="gelu" to the tanh approximation, i.e. gptlab's "gelu_new".
    act = "gelu_new" if gpt1 and hf.get("afn", "gelu") == "gelu" else hf.get("activation_function", "gelu_new")
    act = {"gelu_pytorch_tanh": "gelu_new"}.get(act, act)  # the same tanh approximation, computed by PyTorch
    if act not in ("gelu_new", "gelu"):
        raise GptlabError(
            f"unsupported activation {act!r} in the Hugging Face config; gptlab supports gelu_new "
            f"(= gelu_pytorch_tanh) and gelu"
        )
    missing = [k for k in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size") if k not in hf]
    if missing:
        raise GptlabError(f"the Hugging Face config.json lacks {missing}; it is not a complete GPT-2 config")
    return GPTConfig(
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_embd=hf["n_embd"],
        block_size=hf["n_positions"],
        vocab_size=hf["vocab_size"],
        norm="post" if gpt1 else "pre",
        activation=act,
        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        tie_weights=hf.get("tie_word_embeddings", True),
    )


def _names(cfg: GPTConfig) -> list[tuple[str, str]]:
    """(gptlab name, HF name) pairs for every weight of a model with this config."""
    gpt1 = cfg.norm == "post"
    pairs = [
        ("wte.weight", "transformer.tokens_embed.weight" if gpt1 else "transformer.wte.weight"),
        ("wpe.weight", "transformer.positions_embed.weight" if gpt1 else "transformer.wpe.weight"),
    ]
    per_block = [
        "ln_1.weight",
        "attn.c_attn.weight",
        "attn.c_proj.weight",
        "ln_2.weight",
        "mlp.c_fc.weight",
        "mlp.c_proj.weight",
    ]
    if cfg.bias:
        per_block += [
            "ln_1.bias",
            "attn.c_attn.bias",
            "attn.c_proj.bias",
            "ln_2.bias",
            "mlp.c_fc.bias",
            "mlp.c_proj.bias",
        ]
    for i in range(cfg.n_layer):
        pairs += [(f"h.{i}.{n}", f"transformer.h.{i}.{n}") for n in per_block]
    if not gpt1:
        pairs += [("ln_f.weight", "transformer.ln_f.weight")] + (
            [("ln_f.bias", "transformer.ln_f.bias")] if cfg.bias else []
        )
    if not cfg.tie_weights:
        pairs.append(("lm_head.weight", "lm_head.weight"))
    return pairs


def from_hf_state_dict(hf_sd: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """Map a HF state dict to gptlab names and layouts (padding the vocabulary rows if the config asks for it)."""
    if cfg.positions == "rope":
        return with_tied(hf_llama.from_hf_state_dict(hf_sd, cfg), cfg)
    out = {}
    for ours, theirs in _names(cfg):
        if theirs not in hf_sd:
            raise GptlabError(
                f"tensor {theirs!r} is missing from the Hugging Face weights; "
                f"the file is truncated or not a {'GPT-1' if cfg.norm == 'post' else 'GPT-2'} model"
            )
        t = hf_sd[theirs]
        if theirs.endswith(_CONV1D):
            if t.dim() != 2:
                raise GptlabError(f"tensor {theirs!r} has shape {tuple(t.shape)}; a 2-D matrix was expected")
            t = t.t()
        if ours == "wte.weight" or ours == "lm_head.weight":
            t = torch.cat([t, t.new_zeros(cfg.padded_vocab_size - cfg.vocab_size, t.size(1))])
        out[ours] = t.contiguous()
    return with_tied(out, cfg)


def to_hf_state_dict(sd: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """Map a gptlab state dict to HF names and layouts (dropping vocabulary padding rows; a tied head is left out).
    A model without biases gets zero biases, which HF's layout requires and which change nothing."""
    if cfg.positions == "rope":
        return hf_llama.to_hf_state_dict(sd, cfg)
    out = {}
    full = cfg.replace(bias=True)
    for ours, theirs in _names(full):
        t = sd.get(ours)
        if t is None:  # a bias of a bias-free model
            weight = sd[ours[: -len("bias")] + "weight"]
            t = weight.new_zeros(weight.size(0) if ".c_" in ours else weight.size(-1))
        if theirs.endswith(_CONV1D):
            t = t.t()
        if ours in ("wte.weight", "lm_head.weight"):
            t = t[: cfg.vocab_size]
        out[theirs] = t.contiguous()
    return out


def config_to_hf(cfg: GPTConfig, eot_id: int | None, bos_id: int | None = None) -> dict[str, Any]:
    """A HF ``config.json`` for ``cfg`` (dropout 0: these are inference settings)."""
    if cfg.positions == "rope":
        return hf_llama.config_to_hf(cfg, bos_id if bos_id is not None else eot_id, eot_id)
    modern = [
        (cfg.norm_type != "layernorm" or not cfg.norm_weight, "norms other than LayerNorm with a gain"),
        (cfg.mlp != "gelu", f"the {cfg.mlp} MLP"),
        (cfg.n_kv_heads != cfg.n_head or cfg.head_dim * cfg.n_head != cfg.n_embd, "grouped-query attention"),
        (cfg.qk_norm or cfg.qkv_bias, "QK-norm or q/k/v-only biases"),
        (cfg.logit_softcap > 0, "logit soft-capping"),
        (cfg.ffn_hidden != 4 * cfg.n_embd, "a feed-forward width other than 4 x n_embd"),
    ]
    if any(bad for bad, _ in modern):
        raise GptlabError(
            "Hugging Face's GPT-2 layout cannot hold "
            + ", ".join(what for bad, what in modern if bad)
            + "; use rotary positions for the Llama layout, or keep it as a gptlab checkpoint"
        )
    if cfg.n_experts > 1:
        raise GptlabError(
            "this is a mixture-of-experts model, which Hugging Face's GPT-2 layout cannot hold; keep it "
            "as a gptlab checkpoint"
        )
    if cfg.image_size:
        raise GptlabError(
            "this model takes images (an image prefix), which Hugging Face's text-only GPT-2 and GPT-1 layouts "
            "cannot hold (its multimodal models pair other decoders with other vision towers); keep it as a "
            "gptlab checkpoint"
        )
    common = {
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_embd": cfg.n_embd,
        "n_positions": cfg.block_size,
        "vocab_size": cfg.vocab_size,
        "layer_norm_epsilon": cfg.layer_norm_eps,
        "initializer_range": cfg.init_std,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "torch_dtype": "float32",
    }
    if cfg.norm == "post":
        if cfg.activation != "gelu_new" or not cfg.tie_weights:
            raise GptlabError(
                "Hugging Face's GPT-1 (openai-gpt) layout has only the tanh GELU and a tied head; "
                "this model cannot be exported to it"
            )
        return {"architectures": ["OpenAIGPTLMHeadModel"], "model_type": "openai-gpt", "afn": "gelu", **common}
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_ctx": cfg.block_size,
        "activation_function": cfg.activation,
        "tie_word_embeddings": cfg.tie_weights,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        **common,
    }


def _tokenizer_files(tok: Tokenizer, block_size: int) -> dict[str, str]:
    """The HF tokenizer files for a gptlab tokenizer, as {file name: text}."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    files = {}
    if isinstance(tok, GPT2Tokenizer):
        vocab, merges = ranks_to_vocab_merges(gpt2_ranks())
        vocab[EOT_TEXT] = tok.eot_id
        files["vocab.json"] = json.dumps(vocab, ensure_ascii=False)
        files["merges.txt"] = "#version: 0.2\n" + "\n".join(merges) + "\n"
        pairs = [m.split(" ") for m in merges]
        hf = HFTokenizer(models.BPE(vocab, [(a, b) for a, b in pairs]))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        hf.post_processor = processors.ByteLevel(trim_offsets=False)
        hf.add_special_tokens([EOT_TEXT])
        cls = "GPT2Tokenizer"
    elif isinstance(tok, BPETokenizer):
        hf, cls = tok.tok, "PreTrainedTokenizerFast"
    else:  # character-level: one token per character, the end-of-text token after them
        assert isinstance(tok, CharTokenizer)
        hf = HFTokenizer(models.WordLevel({c: i for i, c in enumerate(tok.chars)}, unk_token=None))
        hf.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
        hf.decoder = decoders.Fuse()
        hf.add_special_tokens([EOT_TEXT])
        cls = "PreTrainedTokenizerFast"
    files["tokenizer.json"] = hf.to_str()
    special = {"bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT} if tok.eot_id is not None else {}
    extra: dict[str, Any] = {}
    if isinstance(tok, BPETokenizer) and (tok.eos_token or tok.bos_token or tok.chat_template):  # a model's own
        model_tokens = {"bos_token": tok.bos_token or EOT_TEXT, "eos_token": tok.eos_token or EOT_TEXT}
        special = {k: v for k, v in model_tokens.items() if tok.tok.token_to_id(v) is not None}
        extra = {"add_bos_token": tok.add_bos, **({"chat_template": tok.chat_template} if tok.chat_template else {})}
    files["special_tokens_map.json"] = json.dumps(special)
    files["tokenizer_config.json"] = json.dumps(
        {"tokenizer_class": cls, "model_max_length": block_size, "add_prefix_space": False, **special, **extra}
    )
    return files


def save_hf(
    model_state: dict[str, torch.Tensor], cfg: GPTConfig, tokenizer_spec: dict[str, Any], out: Path, source: str = ""
) -> Path:
    """Write a Hugging Face model folder (atomically; an existing folder is not replaced)."""
    tok = from_spec(tokenizer_spec)
    hf_config = config_to_hf(cfg, tok.eot_id, getattr(tok, "bos_id", None))
    with atomic_dir(Path(out), replace=False) as tmp:
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in to_hf_state_dict(model_state, cfg).items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "source": source or "gptlab"})
        honour_umask(tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        gen = {"bos_token_id": tok.eot_id, "eos_token_id": tok.eot_id} if tok.eot_id is not None else {}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        for name, text in _tokenizer_files(tok, cfg.block_size).items():
            (tmp / name).write_text(text, encoding="utf-8")
    return Path(out)


def is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def hub_snapshot(name: str) -> Path:
    """A local copy of a Hugging Face Hub model (its cache when present), or one clear error when offline."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise GptlabError(
            f"{name!r} is neither a local folder nor a gptlab checkpoint; to fetch it from the Hugging "
            f"Face Hub install the hf extra (pip install 'gptlab[hf]'), or pass a local folder"
        ) from None
    patterns = ["config.json", "*.safetensors", "model.safetensors.index.json", "*.json", "merges.txt", "*.txt"]
    try:
        return Path(snapshot_download(name, allow_patterns=patterns))
    except Exception as e:
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise GptlabError(
            f"{name!r} is not a local folder and could not be fetched from the Hugging Face Hub "
            f"({reason}); if you are offline, pass a "
            f"local folder instead: one with config.json and model.safetensors, e.g. made on a "
            f"connected machine by `huggingface-cli download {name} --local-dir {name.split('/')[-1]}`"
        ) from None


def _read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            if not all(isinstance(f, str) and "/" not in f and f not in ("", ".", "..") for f in files):
                raise ValueError("weight_map names a file outside the folder")
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as e:
            raise GptlabError(f"{index} is damaged ({type(e).__name__}: {e}); re-download the model") from None
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    elif (path / "pytorch_model.bin").is_file():
        try:
            return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as e:
            raise GptlabError(f"{path / 'pytorch_model.bin'} cannot be read ({e})") from None
    else:
        raise GptlabError(f"{path} has a config.json but no model.safetensors or pytorch_model.bin")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        if not (path / f).is_file():
            raise GptlabError(f"{path / f} is missing (listed in model.safetensors.index.json)")
        sd.update(read_safetensors(path / f))
    return sd


def _normalize_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept both ``GPT2LMHeadModel`` names (``transformer.h.0...``) and bare ``GPT2Model`` names (``h.0...``, as
    the Hub's original gpt2 files have), dropping the attention-mask buffers."""
    out = {}
    for k, v in sd.items():
        if k.endswith((".attn.bias", ".attn.masked_bias")):  # not c_attn.bias: that one is a weight
            continue
        out[k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k] = v
    return out


def _hf_tokenizer(path: Path) -> Tokenizer | None:
    """GPT-2's tokenizer when the folder's vocabulary is GPT-2's, else its ``tokenizer.json``, else None."""
    vocab_file = path / "vocab.json"
    if vocab_file.is_file() and (path / "merges.txt").is_file():
        try:
            if vocab_to_ranks(json.loads(vocab_file.read_text(encoding="utf-8"))) == gpt2_ranks():
                return GPT2Tokenizer()
        except (GptlabError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError):
            pass
    if (path / "tokenizer.json").is_file():
        from tokenizers import Tokenizer as HFTokenizer

        try:
            tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:
            raise GptlabError(
                f"{path / 'tokenizer.json'} cannot be read ({str(e)[:120]}); re-download the model's tokenizer files"
            ) from None
        return BPETokenizer(tok, **_special_tokens(path, tok))
    return None


def _special_tokens(path: Path, tok: Any) -> dict[str, Any]:
    """The model's special tokens and chat template, from ``tokenizer_config.json`` (and ``chat_template.jinja``,
    where newer ``transformers`` writes it; ``generation_config.json``'s eos id when the config names none), as
    :class:`~gptlab.tokenizer.BPETokenizer` takes them."""

    def read(name: str) -> dict[str, Any]:
        try:
            value = json.loads((path / name).read_text(encoding="utf-8")) if (path / name).is_file() else {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise GptlabError(f"{path / name} cannot be read ({e}); re-download the model's files") from None
        return value if isinstance(value, dict) else {}

    def token(value: Any) -> str | None:  # a string, or an AddedToken written as {"content": ...}
        return value.get("content") if isinstance(value, dict) else value if isinstance(value, str) else None

    cfg = read("tokenizer_config.json")
    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text(encoding="utf-8")
    eos = token(cfg.get("eos_token"))
    if eos is None:
        ids = read("generation_config.json").get("eos_token_id")
        first = ids[0] if isinstance(ids, list) and ids else ids
        eos = tok.id_to_token(first) if isinstance(first, int) else None
    return {
        "eos_token": eos if eos != EOT_TEXT else None,
        "bos_token": token(cfg.get("bos_token")),
        "add_bos": bool(cfg.get("add_bos_token", False)),
        "chat_template": template if isinstance(template, str) else None,
    }


def load_hf(
    path: Path, dtype: torch.dtype = torch.float32
) -> tuple[dict[str, torch.Tensor], GPTConfig, dict[str, Any] | None]:
    """(gptlab state dict, config, tokenizer spec or None) of a local HF folder (GPT-2, GPT-1, Llama family)."""
    try:
        hf_config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GptlabError(f"{path / 'config.json'} cannot be read ({e})") from None
    if not isinstance(hf_config, dict):
        raise GptlabError(f"{path / 'config.json'} is not a JSON object; it is not a Hugging Face config")
    cfg = config_from_hf(hf_config)
    hf_sd = _read_hf_weights(path)
    if cfg.positions == "learned":
        hf_sd = _normalize_names(hf_sd)
    hf_sd = {k: v.to(dtype) for k, v in hf_sd.items()}
    embedding = hf_llama.names(cfg)["wte.weight"][0] if cfg.positions == "rope" else _names(cfg)[0][1]
    for theirs in [embedding] + ([] if cfg.tie_weights else ["lm_head.weight"]):
        if theirs in hf_sd and hf_sd[theirs].size(0) != cfg.vocab_size:
            raise GptlabError(
                f"{path}: tensor {theirs!r} has {hf_sd[theirs].size(0)} rows, config.json says "
                f"vocab_size {cfg.vocab_size}"
            )
    sd = from_hf_state_dict(hf_sd, cfg)
    check_weights(sd, cfg, str(path))
    tok = _hf_tokenizer(path)
    return sd, cfg, tok.spec() if tok is not None else None
