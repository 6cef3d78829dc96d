"""What ``gptlab serve`` is asked for: one config, whose fields are also the command's flags (:mod:`gptlab.recipe`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..generate.speculative import SPEC_K, SPEC_K_RANGE
from ..quant.config import QUANTIZE_MODES
from ..recipe import Range, RecipeConfig, opt

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
MAX_N = 16  # the default largest n (choices) of a request, when --max-batch allows it


@dataclass
class ServeConfig(RecipeConfig):
    help_hint = "`gptlab serve --help`"
    what = "serve config"

    model: str = opt("", "the model to serve (any source `gptlab.load` reads)")
    host: str = opt("127.0.0.1", "address to listen on (127.0.0.1: this machine only)")
    port: int = opt(8000, "TCP port; 0 picks a free one", Range(0, 65535))
    served_model_name: str | None = opt(
        None, "the model id clients send and /v1/models lists (default: MODEL's name)", kind=str
    )
    device: str = opt("auto", "auto (CUDA, else MPS, else CPU) | cpu | cuda | cuda:N | mps")
    quantize: str | None = opt(
        None, "quantize the weights when loading: int8 per channel or int4 in groups", choices=QUANTIZE_MODES, kind=str
    )
    max_batch: int | None = opt(
        None,
        "KV-cache rows: sequences decoded together (default: sized from the model's KV bytes, a quarter of the "
        "memory available after loading, at most 4 GiB and 64 rows on a CPU; docs/serving.md)",
        Range(1, 1024),
        kind=int,
    )
    max_queue: int = opt(256, "requests that may wait for a row; more get 429", Range(0, 100_000))
    max_n: int | None = opt(
        None, f"largest n (choices) per request, at most --max-batch (default: {MAX_N}, or the rows if fewer)",
        Range(1, 128), kind=int,
    )  # fmt: skip
    max_choices: int = opt(
        64,
        "most choices one request may ask for (prompts x n); more get 400. Rows are shared fairly among requests",
        Range(1, 100_000),
    )
    prefill_chunk: int = opt(
        1024, "prompt tokens prefilled per scheduling step: the most a newcomer stalls the others", Range(1, 1 << 20)
    )
    prefix_cache: bool = opt(
        True, "reuse the keys and values of prompt prefixes earlier requests computed (exact: the same bits)"
    )
    prefix_block: int = opt(
        128,
        "slots per prefill pass and per prefix-cache block: larger prefills faster, reuses less (docs/serving.md)",
        Range(1, 1 << 16),
    )
    prefix_cache_mb: float = opt(
        512.0, "MiB of prefix-cache blocks kept (least recently used evicted)", Range(1, 1 << 20)
    )
    max_request_seconds: float = opt(
        600.0,
        "a request still generating this long after it got its rows ends, its choices with finish_reason length "
        "(0: no limit)",
        Range(0, 86_400),
    )
    max_body_bytes: int = opt(1 << 20, "largest request body; larger get 413", Range(1024, 1 << 30))
    api_key: str | None = opt(None, "require Authorization: Bearer KEY (default: $GPTLAB_API_KEY, else none)", kind=str)
    chat_template: str | None = opt(
        None, "a Jinja chat template file (default: the one gptlab align sft trains with)", kind=str, metavar="FILE"
    )
    clamp_max_tokens: bool = opt(False, "cut max_tokens to the room left in the context instead of answering 400")
    runs: str | None = opt(
        None, "show the training runs under this folder in the page's Runs view (read-only)", kind=str, metavar="DIR"
    )
    compile: bool | None = opt(
        None,
        "torch.compile the decode step used when one stream runs alone (on 2 CPU cores: GPT-2 1.15x, SmolLM2 1.4x "
        "faster), at start-up while /health answers 503 (GPT-2: ~40 s the first time, ~12 s from torch's cache), left "
        "eager if compiling fails (default: on, off with --lora; --no-compile starts in seconds)",
        kind=bool,
    )
    draft: str | None = opt(
        None,
        "speculative decoding: a smaller model with the same tokenizer, ngram (prompt lookup), or the model's own "
        "int8/int4 copy; output as without it (greedy: identical tokens)",
        kind=str,
        metavar="MODEL|ngram|int8|int4",
    )
    spec_k: int = opt(SPEC_K, "tokens the draft proposes per round", Range(*SPEC_K_RANGE))
    lora: list[str] = opt(
        [],
        "serve a LoRA adapter (a PEFT folder or a gptlab LoRA run) beside the base as model NAME; repeatable. Rows "
        "of different adapters decode in one batch",
        metavar="NAME=PATH",
    )
    shutdown_grace: float = opt(
        30.0,
        "seconds running requests may take to finish after SIGTERM (new ones get 503); then they end cleanly",
        Range(0, 3600),
    )
    log_level: str = opt("warning", "the server's log level", choices=LOG_LEVELS)

    def checks(self) -> list[tuple[bool, str]]:
        return [
            (bool(self.model), "model is required: gptlab serve MODEL"),
            (
                self.max_n is None or self.max_batch is None or self.max_n <= self.max_batch,
                f"max_n {self.max_n} is more than max_batch {self.max_batch}; n choices need n rows",
            ),
            (
                all(x.partition("=")[0] and x.partition("=")[2] for x in self.lora),
                "--lora takes NAME=PATH (e.g. --lora math=runs/grpo/adapter)",
            ),
            (
                not (self.lora and (self.compile or self.draft)),
                "--lora cannot be combined with --compile or --draft (they run the base model's own step)",
            ),
            (
                len({x.partition("=")[0] for x in self.lora} | {self.name}) == len(self.lora) + 1,
                "each --lora NAME must be unique and differ from the served model's name",
            ),
            (
                self.prefix_block <= self.prefill_chunk,
                f"prefix_block {self.prefix_block} is more than prefill_chunk {self.prefill_chunk}; a prompt is "
                "prefilled one block per pass",
            ),
        ]

    @property
    def compiles(self) -> bool:
        """Whether the one-stream decode step is compiled: ``--compile`` / ``--no-compile``, else on unless LoRA
        adapters are served."""
        return self.compile if self.compile is not None else not self.lora

    @property
    def name(self) -> str:
        return self.served_model_name or Path(self.model.rstrip("/")).name or self.model
