"""What ``gptlab prepare`` is asked for: one config, whose fields are also the command's flags (:mod:`gptlab.recipe`)
and whose defaults :func:`gptlab.data.prepare.prepare` shares."""

from __future__ import annotations

from dataclasses import dataclass

from ..recipe import Range, RecipeConfig, opt
from ..tokenizer import TOKENIZER_KINDS

IMAGE_SOURCES = ("shapes", "digits")


@dataclass
class PrepareConfig(RecipeConfig):
    help_hint = "`gptlab prepare --help`"
    what = "prepare settings"

    sources: list[str] = opt(
        [],
        "files, folders, .jsonl/.parquet, http(s) URLs, or a named corpus (shakespeare, tinyshakespeare); or one "
        "image dataset: shapes (synthetic) or digits (scikit-learn's 8x8 digits), see docs/vision.md",
    )
    out_dir: str = opt("", "dataset folder to write")
    tokenizer: str = opt("gpt2", "gpt2 (tiktoken's GPT-2 BPE), char, or bpe (trained here)", choices=TOKENIZER_KINDS)
    vocab_size: int | None = opt(None, "vocabulary size of a trained bpe tokenizer", Range(2, 2**32 - 1), kind=int)
    tokenizer_from: str | None = opt(
        None,
        "use this model's tokenizer instead (any model source: a run, a Hugging Face folder, a GGUF file, "
        "smollm2-135m-instruct), e.g. to distill from it or fine-tune it",
        kind=str,
        metavar="MODEL",
    )
    val_fraction: float = opt(0.1, "tail of the token stream held out", Range(0, 1, lo_open=True, hi_open=True))
    field: str = opt("text", "JSONL field / parquet column holding the text")
    images: int = opt(10_000, "shapes: training images; val and holdout get a tenth each", Range(10, 10_000_000))
    image_size: int = opt(32, "shapes: side in pixels, a multiple of 8", Range(16, 512))
    seed: int = opt(0, "shapes and digits: the seed of the drawing and of the held-out split", Range(0, 2**32 - 1))

    def checks(self) -> list[tuple[bool, str]]:
        image = [s for s in self.sources if s in IMAGE_SOURCES]
        return [
            (bool(self.sources), "give at least one source"),
            (bool(self.out_dir), "--out-dir is required: the dataset folder to write"),
            (
                not image or len(self.sources) == 1,
                f"an image dataset ({' or '.join(IMAGE_SOURCES)}) is prepared on its own; name one source",
            ),
        ]
