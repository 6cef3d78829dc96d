"""gptlab: build, pre-train, sample and evaluate GPT-style language models."""

from .config import PRESETS, GPTConfig, preset
from .errors import GptlabError
from .model import GPT

__all__ = ["GPT", "GPTConfig", "GptlabError", "PRESETS", "preset"]
__version__ = "0.1.0"
