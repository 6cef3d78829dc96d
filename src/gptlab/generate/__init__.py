"""Generation: the KV-cached engine (:mod:`.engine`) and ``gptlab sample`` (:mod:`.cli`)."""

from .engine import Completion, Engine, Sampling, apply_repetition_penalty, filter_logits, next_tokens

__all__ = ["Completion", "Engine", "Sampling", "apply_repetition_penalty", "filter_logits", "next_tokens"]
