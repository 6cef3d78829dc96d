"""gptlab: build, pre-train, sample, serve-ready generate, evaluate, plan, scale and align GPT-style language models.

The main entry points are here; each loads its module on first use, so ``import gptlab`` stays fast::

    import gptlab
    lm = gptlab.load("gpt2")                          # LM: generate, loglikelihood, perplexity, save
    gptlab.prepare(["corpus.txt"], "data/mine", tokenizer="char")
    gptlab.train(gptlab.TrainConfig(data="data/mine", out_dir="runs/mine", model="baby"))
"""

from __future__ import annotations

import importlib
from typing import Any

from .config import PRESETS, GPTConfig, preset
from .errors import GptlabError
from .model import GPT

_LAZY = {
    "load": "api",
    "LM": "api",
    "load_model": "loader",
    "Loaded": "loader",
    "Engine": "generate",
    "Sampling": "generate",
    "prepare": "data.prepare",
    "TrainConfig": "train.config",
    "OptimConfig": "train.optim",
    "AlignConfig": "align.config",
    "train_stage": "align.trainer",
}

__all__ = ["GPT", "GPTConfig", "GptlabError", "PRESETS", "preset", "train", *_LAZY]
__version__ = "0.2.0"


def __getattr__(name: str) -> Any:  # PEP 562: import the heavy entry points only when first used
    if name == "train":  # the training package, callable as gptlab.train(cfg) (see gptlab/train/__init__.py)
        return importlib.import_module("gptlab.train")
    if name in _LAZY:
        value = getattr(importlib.import_module(f"gptlab.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gptlab' has no attribute {name!r}")
