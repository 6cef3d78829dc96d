"""One flat configuration for every fine-tuning and alignment stage, loaded from a TOML recipe and overridden
from the command line (``gptlab align <stage> --recipe r.toml --lr 1e-5``). The optimizer and schedule fields
mean what they mean in ``gptlab train`` (the same functions read them). Each field carries its help text and its
valid range (:func:`gptlab.recipe.opt`)."""

from __future__ import annotations

from dataclasses import dataclass

from ..recipe import COUNT, NON_NEGATIVE, POSITIVE, PROBABILITY_BELOW_1, SEED, UNIT, Range, RecipeConfig, opt
from ..train.adapters import LoraConfig
from ..train.optim import FINETUNE_OPTIM, OptimConfig
from .losses import LOSS_TYPES

STAGES = ("finetune", "sft", "reward", "dpo", "ppo", "grpo")
TASK_NAMES = ("classification", "entailment", "similarity", "multiple_choice")


@dataclass
class AlignConfig(RecipeConfig):
    help_hint = "`gptlab align <stage> --help`"
    what = "alignment config"
    renamed = {"init": "model", "ckpt_interval": "checkpoint_interval"}
    stage: str = opt("sft", "the stage", choices=STAGES)
    data: str = opt("", "JSON-lines training data (format per stage: docs/alignment.md)")
    model: str = opt(
        "",
        "model to start from: a gptlab run/checkpoint or a Hugging Face folder (on the command "
        "line, the first argument)",
    )
    out_dir: str = opt("runs/align", "run folder: checkpoints/, metrics.jsonl, loss.png")
    val_data: str = opt("", "held-out JSON-lines file; default: the last val_frac of data")
    val_frac: float = opt(0.1, "fraction of data held out when val_data is not given", PROBABILITY_BELOW_1)
    # optimisation (as in gptlab train)
    batch_size: int = opt(
        8,
        "examples (finetune, sft), prompts (reward, dpo, grpo: each sampled group_size times) or rollouts (ppo) per "
        "step",
        COUNT,
    )
    max_iters: int = opt(200, "optimizer steps", COUNT)
    optim: OptimConfig = opt(
        FINETUNE_OPTIM,
        "AdamW and the learning-rate schedule, with fine-tuning's defaults (recipe table [optim]; flags --lr, ...)",
    )
    lora: LoraConfig = opt(LoraConfig(), "LoRA / QLoRA (recipe table [lora]; flags --lora-rank, --quantize, ...)")
    eval_interval: int = opt(50, "steps between held-out evaluations", COUNT)
    log_interval: int = opt(10, "steps between metric rows", COUNT)
    checkpoint_interval: int = opt(100, "steps between checkpoints; 0 saves only at the end", NON_NEGATIVE)
    keep_last: int = opt(2, "checkpoints kept", COUNT)
    seed: int = opt(1337, "seed for initialisation, batches and sampling", SEED)
    device: str = opt("auto", "auto | cpu | cuda | cuda:N | mps")
    threads: int = opt(0, "torch intra-op threads; 0 keeps torch's default", Range(0, 1024))
    # finetune (GPT-1)
    task: str = opt("classification", "finetune: " + " | ".join(TASK_NAMES), choices=TASK_NAMES)
    lm_weight: float = opt(0.5, "finetune: weight of the auxiliary LM loss (GPT-1: 0.5; 0 disables)", NON_NEGATIVE)
    # sft
    pack: bool = opt(False, "sft: pack several examples per row (attention never crosses examples)")
    # reward
    center_rewards: float = opt(
        0.0, "reward: weight of the mean-reward-squared penalty that centres rewards at 0", NON_NEGATIVE
    )
    # dpo, ppo
    reference: str = opt("", "dpo/ppo: frozen reference model (default: the model tuned)")
    beta: float = opt(0.1, "dpo: beta of the sigmoid loss", POSITIVE)
    # ppo
    reward_model: str = opt("", "ppo: a `gptlab align reward` run")
    kl_coef: float = opt(0.1, "ppo: KL penalty coefficient (initial value when kl_target is set)", NON_NEGATIVE)
    kl_target: float = opt(
        0.0, "ppo: target KL per response for the adaptive controller; 0 keeps kl_coef fixed", NON_NEGATIVE
    )
    kl_horizon: int = opt(10_000, "ppo: adaptive KL controller horizon (responses)", COUNT)
    gamma: float = opt(1.0, "ppo: discount", Range(0, 1, lo_open=True))
    lam: float = opt(0.95, "ppo: GAE lambda", UNIT)
    clip: float = opt(0.2, "ppo/grpo: policy ratio clip (grpo: the lower one, epsilon_low)", POSITIVE)
    value_clip: float = opt(0.2, "ppo: value clip", POSITIVE)
    vf_coef: float = opt(0.5, "ppo: value loss weight", NON_NEGATIVE)
    ppo_epochs: int = opt(4, "ppo: passes over each batch of rollouts", COUNT)
    minibatches: int = opt(2, "ppo/grpo: minibatches per pass (an optimizer step each)", COUNT)
    max_new_tokens: int = opt(32, "ppo/grpo: response length limit", COUNT)
    temperature: float = opt(1.0, "ppo/grpo: rollout sampling temperature", Range(0, 100, lo_open=True))
    ptx_coef: float = opt(0.0, "ppo: weight of the pre-training LM loss (PPO-ptx); 0 disables", NON_NEGATIVE)
    ptx_data: str = opt("", "ppo: a `gptlab prepare` folder for the PPO-ptx loss")

    # grpo
    group_size: int = opt(8, "grpo: completions sampled per prompt (G)", Range(2, 4096))
    loss_type: str = opt("dapo", "grpo: " + " | ".join(LOSS_TYPES) + " (docs/alignment.md)", choices=LOSS_TYPES)
    rewards: str = opt(
        "number",
        "grpo: reward functions, comma-separated NAME or NAME=WEIGHT: number, match, regex, format, or "
        "module:function / file.py:function (TRL's signature)",
    )
    reward_format: str = opt(
        "", "grpo: regex the whole completion must match for the `format` reward (empty: it must only end by itself)"
    )
    kl_beta: float = opt(0.0, "grpo: weight of the k3 KL to the reference; 0 = none (TRL's default)", NON_NEGATIVE)
    clip_high: float = opt(
        0.0, "grpo: upper ratio clip epsilon_high (DAPO's clip-higher: 0.28); 0 = the same as clip", NON_NEGATIVE
    )
    grpo_epochs: int = opt(1, "grpo: optimisation passes over each batch of rollouts (mu)", COUNT)
    stall_steps: int = opt(
        10,
        "grpo: stop after this many steps in a row with no learning signal (every group's rewards equal) or "
        "unchanged weights; warn after as many with no completion ending",
        COUNT,
    )

    def checks(self) -> list[tuple[bool, str]]:
        return [
            (bool(self.data), "data (a JSON-lines file) is required"),
            (
                bool(self.model),
                "the model to start from (a gptlab run or checkpoint, or a Hugging Face folder) is "
                "required: gptlab align STAGE MODEL",
            ),
            (self.stage != "ppo" or bool(self.reward_model), "ppo needs reward_model (a `gptlab align reward` run)"),
            (self.ptx_coef == 0 or bool(self.ptx_data), "ptx_coef > 0 needs ptx_data (a `gptlab prepare` folder)"),
        ]
