"""Evaluation (``gptlab eval``): sliding-window perplexity, LAMBADA, multiple choice and the few-shot harness,
on log-likelihoods defined as lm-evaluation-harness defines them (:mod:`gptlab.eval.scoring`)."""

from .scoring import loglikelihoods, perplexity_report, rolling_nll
from .tasks import fewshot, fewshot_prompt, lambada, multiple_choice, perplexity, read_jsonl, wilson_interval

__all__ = [
    "fewshot",
    "fewshot_prompt",
    "lambada",
    "loglikelihoods",
    "multiple_choice",
    "perplexity",
    "perplexity_report",
    "read_jsonl",
    "rolling_nll",
    "wilson_interval",
]
