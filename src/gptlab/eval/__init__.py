"""Evaluation (``gptlab eval``): sliding-window perplexity, LAMBADA, multiple choice and the few-shot harness,
on log-likelihoods defined as lm-evaluation-harness defines them (:mod:`gptlab.eval.scoring`)."""

from .scoring import loglikelihoods, perplexity_report, rolling_nll
from .tasks import fewshot, fewshot_prompt, lambada, multiple_choice, perplexity, read_jsonl, wilson_interval

__all__ = ["loglikelihoods", "perplexity_report", "rolling_nll", "fewshot", "fewshot_prompt", "lambada",
           "multiple_choice", "perplexity", "read_jsonl", "wilson_interval"]
