"""Moving models between gptlab and other ecosystems: Hugging Face folders and Hub names, OpenAI's GPT-2 release.

:func:`load_any` is what every verb that reads a model uses, so ``sample``, ``exposure``, ``eval`` and ``convert``
all accept a gptlab run or checkpoint folder, a Hugging Face model folder, a Hub name, or an OpenAI release folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..config import GPTConfig
from ..errors import GptlabError
from ..model import GPT


def load_any(source: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, dict[str, Any]]:
    """(model in eval mode on ``device``, metadata with ``model_config``, ``tokenizer`` and ``source``)."""
    from ..train.checkpoint import list_checkpoints, load_model
    from ..train.distributed import pick_device
    from .hf import hub_snapshot, is_hf_dir, load_hf
    from .openai import is_openai_dir, load_openai

    device = pick_device(device)
    path = Path(source)
    if (path / "state.json").is_file() or list_checkpoints(path) or path.name == "best":
        model, meta = load_model(path, device)
        return model, {**meta, "source": str(source)}
    if not path.exists():
        if str(source).startswith((".", "/", "~")) or str(source).count("/") > 1:
            raise GptlabError(f"checkpoint {source} does not exist")
        path = hub_snapshot(str(source))
    if is_hf_dir(path):
        sd, cfg, tok = load_hf(path)
    elif is_openai_dir(path):
        sd, cfg, tok = load_openai(path)
    else:
        raise GptlabError(f"{source} is not a gptlab run or checkpoint, a Hugging Face model folder (config.json) "
                          f"or an OpenAI GPT-2 folder (hparams.json)")
    if tok is None:
        raise GptlabError(f"{path} has no tokenizer files (vocab.json + merges.txt, or tokenizer.json); copy them "
                          f"from the model's source")
    return build(sd, cfg, device), {"model_config": cfg.to_dict(), "tokenizer": tok, "source": str(source)}


def build(sd: dict[str, torch.Tensor], cfg: GPTConfig, device: str | torch.device = "cpu") -> GPT:
    with torch.device("meta"):
        model = GPT(cfg)
    model.load_state_dict(sd, assign=True)
    if cfg.tie_weights:
        model.lm_head.weight = model.wte.weight
    return model.to(device).eval()
