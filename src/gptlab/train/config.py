"""Training configuration: one flat dataclass, loaded from a TOML recipe and overridden from the command line.

A recipe is a TOML file whose top-level keys are these fields; a ``[model_overrides]`` table holds model-config
overrides (``n_layer``, ``dropout``, ...) on top of the ``model`` preset. Every field is also a ``gptlab train
--flag`` (model overrides: ``--set key=value``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..config import GPTConfig
from ..recipe import COUNT, NON_NEGATIVE, POSITIVE, PROBABILITY_BELOW_1, SEED, UNIT, Range, RecipeConfig, opt
from .adapters import LoraConfig
from .optim import OptimConfig

MODEL_FIELDS = {f.name for f in dataclasses.fields(GPTConfig)}
SS_SCHEDULES = ("none", "constant", "linear", "inverse_sigmoid", "exponential")


@dataclass
class TrainConfig(RecipeConfig):
    help_hint = "`gptlab train --help`"
    what = "training config"
    renamed = {"ckpt_interval": "checkpoint_interval"}
    data: str = opt("data/shakespeare-char", "a folder made by `gptlab prepare`")
    out_dir: str = opt("runs/baby", "run folder: checkpoints/, metrics.jsonl, loss.png")
    model: str = opt("baby", "model preset (`gptlab presets`)")
    init: str = opt(
        "", "start from this model's weights (continued pre-training; its config replaces --model and --set)"
    )
    lora: LoraConfig = opt(LoraConfig(), "LoRA / QLoRA on top of --init (recipe table [lora]; flags --lora-rank, ...)")
    model_overrides: dict[str, Any] = opt(
        {}, "model config fields replacing the preset's (recipe table [model_overrides], flag --set)"
    )
    block_size: int = opt(0, "context length; 0 keeps the preset's", NON_NEGATIVE)
    batch_size: int = opt(12, "sequences per process per micro-step", COUNT)
    grad_accum: int = opt(1, "micro-steps per optimizer step", COUNT)
    max_iters: int = opt(2000, "optimizer steps", COUNT)
    optim: OptimConfig = opt(
        OptimConfig(), "AdamW and the learning-rate schedule (recipe table [optim]; flags --lr, ...)"
    )
    dropout: float = opt(0.0, "dropout probability in the model", PROBABILITY_BELOW_1)
    eval_interval: int = opt(250, "steps between validation evaluations", COUNT)
    eval_iters: int = opt(20, "val batches per periodic evaluation (the same batches every time)", COUNT)
    final_eval_tokens: int = opt(
        1_000_000,
        "val tokens covered by the final evaluation (non-overlapping windows); 0 = the whole val split",
        NON_NEGATIVE,
    )
    log_interval: int = opt(10, "steps between loss logs (each step's loss is recorded)", COUNT)
    checkpoint_interval: int = opt(500, "steps between checkpoints; 0 saves only at the end", NON_NEGATIVE)
    keep_last: int = opt(2, "checkpoints kept besides the best one", COUNT)
    seed: int = opt(1337, "seed for initialisation, batches, dropout and scheduled sampling", SEED)
    device: str = opt("auto", "auto | cpu | cuda | cuda:N | mps")
    dtype: str = opt(
        "auto",
        "auto (bf16 on capable GPUs; on a CPU bf16 autocast where a measured probe at the run's shapes finds it "
        "1.15x faster, else fp32) | float32 | bfloat16 | float16",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    compile: bool = opt(False, "wrap the model in torch.compile")
    threads: int = opt(0, "torch intra-op threads per process; 0 keeps torch's default", Range(0, 1024))
    parallel: str = opt(
        "ddp",
        "under torchrun: ddp | fsdp | fsdp+tp (tensor parallelism over groups of --tp ranks, FSDP across them)",
        choices=("ddp", "fsdp", "fsdp+tp"),
    )
    tp: int = opt(1, "fsdp+tp: ranks per tensor-parallel group (divides the heads, KV heads and MLP width)", COUNT)
    activation_checkpointing: bool = opt(
        False, "recompute each block's activations in backward instead of keeping them: less memory, ~1/3 more compute"
    )
    fsdp_param_dtype: str = opt(
        "float32",
        "fsdp: the dtype parameters are gathered and computed in (FSDP2's mixed precision: the sharded master copy "
        "and the gradient reductions stay float32)",
        choices=("float32", "bfloat16"),
    )
    async_checkpoint: bool = opt(
        False,
        "fsdp: write sharded checkpoints in the background (DCP's async_save) while training goes on; each is "
        "committed once written, at the next checkpoint or the end of the run",
    )
    track_memory: bool = opt(
        False,
        "measure tensor memory by kind over the second step (PyTorch's memory trackers); the summary's "
        "tensor_memory_mib, per rank, is what `gptlab plan train` predicts",
    )
    collective_timeout: float = opt(
        600.0,
        "under torchrun: seconds a collective waits for every rank; then the run stops with a line naming the rank",
        Range(1, 86_400),
    )
    ss_schedule: str = opt("none", "scheduled sampling: " + " | ".join(SS_SCHEDULES), choices=SS_SCHEDULES)
    ss_max_prob: float = opt(
        0.25, "scheduled sampling: highest probability of feeding the model's own prediction", UNIT
    )
    ss_k: float = opt(500.0, "scheduled sampling: inverse_sigmoid k (steps) or exponential decay base (< 1)", POSITIVE)

    def checks(self) -> list[tuple[bool, str]]:
        unknown = sorted(set(self.model_overrides) - MODEL_FIELDS)
        return [
            (self.ss_schedule != "exponential" or self.ss_k < 1, "ss_k must be < 1 for the exponential schedule"),
            (not unknown, f"unknown model config field(s) {unknown}; known: {sorted(MODEL_FIELDS)}"),
            ((self.tp > 1) == (self.parallel == "fsdp+tp"), "--parallel fsdp+tp goes with --tp > 1, and --tp with it"),
            (
                not self.async_checkpoint or self.parallel != "ddp",
                "--async-checkpoint writes sharded checkpoints: use it with --parallel fsdp or fsdp+tp",
            ),
        ]
