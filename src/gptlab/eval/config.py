"""What each ``gptlab eval`` task is asked for: one config per task, whose fields are the task's flags
(:mod:`gptlab.recipe`) and whose defaults the library's task functions share."""

from __future__ import annotations

from dataclasses import dataclass

from ..options import number_list
from ..quant.config import QUANTIZE_MODES
from ..recipe import COUNT, DEFAULT_SEED, NON_NEGATIVE, SEED, UNIT, Range, RecipeConfig, opt

GENERATION_KINDS = ("summarize", "translate", "qa")
BLIND = ("zero", "shuffle")


@dataclass
class EvalConfig(RecipeConfig):
    """The settings every task shares."""

    help_hint = "`gptlab eval TASK --help`"
    what = "eval settings"

    model: str = opt("", "the model to evaluate (any source `gptlab.load` reads)")
    limit: int | None = opt(None, "evaluate only the first N records (tokens, for perplexity)", COUNT, kind=int)
    batch_size: int = opt(8, "sequences per forward pass", Range(1, 4096))
    device: str = opt("auto", "auto (CUDA, else MPS, else CPU) | cpu | cuda | cuda:N | mps")
    quantize: str | None = opt(
        None, "quantize the weights when loading: int8 per channel or int4 in groups", choices=QUANTIZE_MODES, kind=str
    )
    threads: int = opt(0, "torch intra-op threads; 0 keeps torch's default", Range(0, 1024))

    def checks(self) -> list[tuple[bool, str]]:
        return [(bool(self.model), "a model is required: gptlab eval TASK MODEL")]


@dataclass
class PerplexityConfig(EvalConfig):
    paths: list[str] = opt([], "text files, folders of .txt files, or prepared .bin token shards")
    stride: int | None = opt(
        None, "window step in tokens, at most the context (default half the context)", COUNT, kind=int
    )


@dataclass
class LambadaConfig(EvalConfig):
    path: str | None = opt(None, "lambada_test.jsonl (default: cached download, sha256-checked)", kind=str)
    stopword_filter: bool = opt(False, "the GPT-2 paper's variant: a stop word may not be the predicted last word")


@dataclass
class MultipleChoiceConfig(EvalConfig):
    path: str = opt("", "HellaSwag jsonl or {context, choices, label} jsonl")


@dataclass
class FewshotConfig(EvalConfig):
    path: str | None = opt(None, "{text, label} jsonl to classify (default: gptlab's sentiment set)", kind=str)
    train: str | None = opt(
        None, "{text, label} jsonl to draw examples from (default: --path minus the query)", kind=str
    )
    shots: list[int] = opt(
        [0, 1, 5, 10], "numbers of examples in the prompt, comma-separated, each >= 0",
        parse=number_list(NON_NEGATIVE, integer=True), metavar="K[,K...]",
    )  # fmt: skip
    template: str = opt("Input: {text}\nLabel: {label}", "how one example is written ({text} and {label})")
    seed: int = opt(DEFAULT_SEED, "seed for drawing the examples", SEED)
    calibrate: bool = opt(False, "contextual calibration (Zhao et al. 2021)")
    plot: str | None = opt(None, "write accuracy vs shots to this PNG file", kind=str, metavar="PNG")


@dataclass
class GenerationConfig(EvalConfig):
    kind: str = opt("summarize", "the task", choices=GENERATION_KINDS)
    path: str = opt(
        "", "jsonl: summarize {document, summary}; translate {source, target}; qa {question, answers: [...]}"
    )
    shots: int = opt(0, "solved examples before each prompt", NON_NEGATIVE)
    seed: int = opt(DEFAULT_SEED, "seed for drawing the solved examples", SEED)
    max_new_tokens: int = opt(64, "tokens generated per prompt", COUNT)
    source_lang: str = opt("English", "translate: the source language's name in the prompt")
    target_lang: str = opt("French", "translate: the target language's name in the prompt")


@dataclass
class ExposureConfig(EvalConfig):
    text: str | None = opt(None, "the text", kind=str)
    text_file: str | None = opt(None, "read the text from this UTF-8 file", kind=str, metavar="FILE")
    p: float = opt(0.5, "probability of feeding the model's own prediction", UNIT)
    seed: int = opt(DEFAULT_SEED, "seed for the choices of scheduled sampling", SEED)


@dataclass
class VisionConfig(EvalConfig):
    data: str = opt("", "an image dataset folder (`gptlab prepare shapes|digits`)")
    split: list[str] = opt([], "split(s) to evaluate, repeatable (default val, and holdout when the dataset has one)")
    blind: list[str] = opt([], "blind baselines to run beside, repeatable: zero | shuffle (default both)")
    batch_size: int = opt(128, "images per generation batch", Range(1, 4096))

    def checks(self) -> list[tuple[bool, str]]:
        unknown = sorted(set(self.blind) - set(BLIND))
        return super().checks() + [
            (bool(self.data), "--data is required: an image dataset folder"),
            (not unknown, f"--blind {unknown} is not one of {'|'.join(BLIND)}"),
        ]
