"""OpenAI's original GPT-2 release layout (``hparams.json``, ``model.ckpt.*``, ``encoder.json``, ``vocab.bpe``).

The weights are a TensorFlow checkpoint, read with TensorFlow's own checkpoint reader when it is installed
(``pip install tensorflow-cpu``); without it, a clear error. Variable names follow openai/gpt-2's ``model.py``:
``model/wte``, ``model/wpe``, ``model/h<i>/{ln_1,attn/c_attn,attn/c_proj,ln_2,mlp/c_fc,mlp/c_proj}/{g,b,w}``,
``model/ln_f/{g,b}``; the projections are 1x1 convolutions, [1, in, out], the same matrices as HF's Conv1D.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import GPTConfig
from ..errors import GptlabError
from ..tokenizer import GPT2Tokenizer, gpt2_ranks, vocab_to_ranks
from .hf import from_hf_state_dict

_LEAF = {"g": "weight", "b": "bias", "w": "weight"}


def is_openai_dir(path: Path) -> bool:
    return (path / "hparams.json").is_file()


def config_from_hparams(h: Mapping[str, Any]) -> GPTConfig:
    missing = [
        k for k in ("n_layer", "n_head", "n_embd", "n_ctx", "n_vocab") if not isinstance(h, Mapping) or k not in h
    ]
    if missing:
        raise GptlabError(f"hparams.json lacks {missing}; it is not an OpenAI GPT-2 release folder")
    return GPTConfig(
        n_layer=h["n_layer"], n_head=h["n_head"], n_embd=h["n_embd"], block_size=h["n_ctx"], vocab_size=h["n_vocab"]
    )


def from_openai_variables(variables: Mapping[str, np.ndarray], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """gptlab state dict from OpenAI's TF variables (name -> array)."""
    hf = {}
    for name, arr in variables.items():
        parts = name.split("/")
        if parts[0] != "model":
            continue  # optimizer slots, global step
        parts = parts[1:]
        if parts[0] in ("wte", "wpe"):
            hf[f"transformer.{parts[0]}.weight"] = torch.from_numpy(np.asarray(arr))
            continue
        if parts[0].startswith("h") and parts[0][1:].isdigit():
            parts[0] = "h." + parts[0][1:]
        t = torch.from_numpy(np.asarray(arr))
        if parts[-1] == "w":
            t = t.reshape(t.shape[-2], t.shape[-1])  # [1, in, out] -> [in, out]
        hf["transformer." + ".".join(parts[:-1] + [_LEAF[parts[-1]]])] = t
    return from_hf_state_dict(hf, cfg)


def _read_tf_checkpoint(path: Path) -> dict[str, np.ndarray]:
    try:
        import tensorflow as tf  # here, not at the top: optional, and only OpenAI TF checkpoints need it
    except ImportError:
        raise GptlabError(
            f"{path} is an OpenAI TensorFlow checkpoint; reading it needs TensorFlow's checkpoint "
            f"reader: pip install tensorflow-cpu (or convert it once elsewhere with `gptlab convert`)"
        ) from None
    prefix = tf.train.latest_checkpoint(str(path)) or str(path / "model.ckpt")
    try:
        reader = tf.train.load_checkpoint(prefix)
        return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}
    except Exception as e:
        raise GptlabError(
            f"{prefix} cannot be read as a TensorFlow checkpoint ({str(e).splitlines()[0][:160]})"
        ) from None


def load_openai(path: Path) -> tuple[dict[str, torch.Tensor], GPTConfig, dict[str, Any]]:
    """(state dict, config, tokenizer spec) of an OpenAI GPT-2 release folder."""
    try:
        hparams = json.loads((path / "hparams.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GptlabError(f"{path / 'hparams.json'} is not valid JSON ({e})") from None
    cfg = config_from_hparams(hparams)
    encoder = path / "encoder.json"
    if encoder.is_file() and vocab_to_ranks(json.loads(encoder.read_text(encoding="utf-8"))) != gpt2_ranks():
        raise GptlabError(f"{encoder} is not GPT-2's vocabulary; gptlab imports OpenAI checkpoints with GPT-2's BPE")
    return from_openai_variables(_read_tf_checkpoint(path), cfg), cfg, GPT2Tokenizer().spec()
