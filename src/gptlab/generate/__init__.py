"""Generation: the KV-cached engine (:mod:`.engine`), the sampler (:mod:`.sampling`), speculative decoding beside it
(:mod:`.speculative`) and ``gptlab sample`` (:mod:`.cli`)."""

from .engine import Completion, Engine
from .sampling import Sampling, apply_repetition_penalty, filter_logits, next_tokens

__all__ = ["Completion", "Engine", "Sampling", "apply_repetition_penalty", "filter_logits", "next_tokens"]
