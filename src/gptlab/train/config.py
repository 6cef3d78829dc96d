"""Training configuration: one flat dataclass, loaded from a TOML recipe and overridden from the command line.

A recipe is a TOML file whose top-level keys are these fields; a ``[model_overrides]`` table holds model-config
overrides (``n_layer``, ``dropout``, ...) on top of the ``model`` preset. Every field is also a ``gptlab train
--flag`` (model overrides: ``--set key=value``).
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import GPTConfig
from ..errors import GptlabError

MODEL_FIELDS = {f.name for f in dataclasses.fields(GPTConfig)}


class RecipeConfig:
    """What the flat, recipe-loaded configs share: validation, dict form, fields, and loading from sources."""

    help_hint = "`gptlab --help`"

    @staticmethod
    def require(what: str, checks: list[tuple[bool, str]]) -> None:
        problems = [msg for ok, msg in checks if not ok]
        if problems:
            raise GptlabError(f"invalid {what}: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def fields(cls) -> list[dataclasses.Field]:
        return list(dataclasses.fields(cls))  # type: ignore[arg-type]

    @classmethod
    def from_sources(cls, recipe: str | Path | None = None, /, **overrides: Any):
        """Defaults <- TOML recipe <- ``overrides`` (CLI flags; ``None`` values are ignored). A value of the wrong
        type (``lr = "x"``) is one clear error; integers are accepted where a float is expected."""
        values = recipe_values(recipe, overrides, {f.name for f in cls.fields()}, cls.help_hint)
        for f in cls.fields():
            want = type(f.default)
            if f.name not in values or want not in (bool, int, float, str):
                continue
            v = values[f.name]
            ok = isinstance(v, want) and (want is bool or not isinstance(v, bool))
            if want is float and isinstance(v, int) and not isinstance(v, bool):
                v, ok = float(v), True
            if not ok:
                raise GptlabError(f"option {f.name} = {v!r} should be of type {want.__name__}; fix the recipe or flag")
            values[f.name] = v
        return cls(**values)


@dataclass
class TrainConfig(RecipeConfig):
    help_hint = "`gptlab train --help`"
    data: str = "data/shakespeare-char"
    out_dir: str = "runs/baby"
    model: str = "baby"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    block_size: int = 0
    batch_size: int = 12
    grad_accum: int = 1
    max_iters: int = 2000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int = 0
    schedule: str = "cosine"
    decay_frac: float = 0.2
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    dropout: float = 0.0
    eval_interval: int = 250
    eval_iters: int = 20
    final_eval_tokens: int = 1_000_000
    log_interval: int = 10
    ckpt_interval: int = 500
    keep_last: int = 2
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    threads: int = 0
    parallel: str = "ddp"
    ss_schedule: str = "none"
    ss_max_prob: float = 0.25
    ss_k: float = 500.0

    def __post_init__(self) -> None:
        checks = [
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.grad_accum >= 1, "grad_accum must be >= 1"),
            (self.max_iters >= 1, "max_iters must be >= 1"),
            (self.lr > 0 and self.min_lr >= 0, "lr must be > 0 and min_lr >= 0"),
            (self.min_lr <= self.lr, "min_lr must not exceed lr"),
            (self.warmup_iters >= 0 and self.block_size >= 0, "warmup_iters and block_size must be >= 0"),
            (self.eval_iters >= 1 and self.eval_interval >= 1 and self.log_interval >= 1,
             "eval_iters, eval_interval and log_interval must be >= 1"),
            (self.dtype in ("auto", "float32", "bfloat16", "float16"), "dtype must be auto|float32|bfloat16|float16"),
            (self.parallel in ("ddp", "fsdp"), "parallel must be ddp or fsdp"),
            (self.schedule in ("cosine", "wsd"), "schedule must be cosine or wsd"),
            (0.0 < self.decay_frac <= 1.0, "decay_frac must be in (0, 1]"),
            (self.ss_schedule in ("none", "constant", "linear", "inverse_sigmoid", "exponential"),
             "ss_schedule must be none|constant|linear|inverse_sigmoid|exponential"),
            (0.0 <= self.ss_max_prob <= 1.0, "ss_max_prob must be in [0, 1]"),
            (self.keep_last >= 1, "keep_last must be >= 1"),
            (not set(self.model_overrides) - MODEL_FIELDS,
             f"unknown model config field(s) {sorted(set(self.model_overrides) - MODEL_FIELDS)}; "
             f"known: {sorted(MODEL_FIELDS)}"),
        ]
        self.require("training config", checks)


def recipe_values(recipe: str | Path | None, overrides: dict[str, Any], known: set[str], help_hint: str
                  ) -> dict[str, Any]:
    """A TOML recipe's keys updated by ``overrides`` (``None`` values ignored); unknown keys are one clear error."""
    values: dict[str, Any] = {}
    if recipe:
        try:
            values = tomllib.loads(Path(recipe).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise GptlabError(f"recipe {recipe} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise GptlabError(f"recipe {recipe} is not valid TOML: {e}") from None
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(values) - known)
    if unknown:
        raise GptlabError(f"unknown option(s) {unknown}; see {help_hint}")
    return values


HELP = {
    "data": "a folder made by `gptlab prepare`",
    "out_dir": "run folder: checkpoints/, metrics.jsonl, loss.png",
    "model": "model preset (`gptlab presets`)",
    "model_overrides": "model config fields replacing the preset's (recipe table [model_overrides], flag --set)",
    "block_size": "context length; 0 keeps the preset's",
    "batch_size": "sequences per process per micro-step",
    "grad_accum": "micro-steps per optimizer step",
    "max_iters": "optimizer steps",
    "lr": "peak learning rate",
    "min_lr": "learning rate at the end of the decay",
    "warmup_iters": "linear warmup steps",
    "lr_decay_iters": "step where the decay ends; 0 means max_iters",
    "schedule": "cosine | wsd (flat at lr, then linear decay over the last decay_frac)",
    "decay_frac": "wsd: fraction of the post-warmup steps spent decaying",
    "weight_decay": "AdamW decoupled weight decay (matrices and embeddings only)",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "grad_clip": "clip the global gradient norm to this; 0 disables",
    "dropout": "dropout probability in the model",
    "eval_interval": "steps between validation evaluations",
    "eval_iters": "val batches per periodic evaluation (the same batches every time)",
    "final_eval_tokens": "val tokens covered by the final evaluation (non-overlapping windows)",
    "log_interval": "steps between loss logs (each step's loss is recorded)",
    "ckpt_interval": "steps between checkpoints; 0 saves only at the end",
    "keep_last": "checkpoints kept besides the best one",
    "seed": "seed for initialisation, batches, dropout and scheduled sampling",
    "device": "auto | cpu | cuda | cuda:N | mps",
    "dtype": "auto (bf16 on capable GPUs, else fp32) | float32 | bfloat16 | float16",
    "compile": "wrap the model in torch.compile",
    "threads": "torch intra-op threads per process; 0 keeps torch's default",
    "parallel": "under torchrun: ddp | fsdp",
    "ss_schedule": "scheduled sampling: none | constant | linear | inverse_sigmoid | exponential",
    "ss_max_prob": "scheduled sampling: highest probability of feeding the model's own prediction",
    "ss_k": "scheduled sampling: inverse_sigmoid k (steps) or exponential decay base (< 1)",
}
