"""One flat configuration for every fine-tuning and alignment stage, loaded from a TOML recipe and overridden
from the command line (``gptlab align <stage> --recipe r.toml --lr 1e-5``). The optimizer and schedule fields
mean what they mean in ``gptlab train`` (the same functions read them)."""

from __future__ import annotations

from dataclasses import dataclass

from ..train.config import RecipeConfig

STAGES = ("finetune", "sft", "reward", "dpo", "ppo")


@dataclass
class AlignConfig(RecipeConfig):
    help_hint = "`gptlab align <stage> --help`"
    stage: str = "sft"
    data: str = ""
    init: str = ""
    out_dir: str = "runs/align"
    val_data: str = ""
    val_frac: float = 0.1
    # optimisation (as in gptlab train)
    batch_size: int = 8
    max_iters: int = 200
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_iters: int = 10
    lr_decay_iters: int = 0
    schedule: str = "cosine"
    decay_frac: float = 0.2
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_interval: int = 50
    log_interval: int = 10
    ckpt_interval: int = 100
    keep_last: int = 2
    seed: int = 1337
    device: str = "auto"
    threads: int = 0
    # finetune (GPT-1)
    task: str = "classification"
    lm_weight: float = 0.5
    # sft
    pack: bool = False
    # reward
    center_rewards: float = 0.0
    # dpo, ppo
    reference: str = ""
    beta: float = 0.1
    # ppo
    reward_model: str = ""
    kl_coef: float = 0.1
    kl_target: float = 0.0
    kl_horizon: int = 10_000
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.5
    ppo_epochs: int = 4
    minibatches: int = 2
    max_new_tokens: int = 32
    temperature: float = 1.0
    ptx_coef: float = 0.0
    ptx_data: str = ""

    def __post_init__(self) -> None:
        checks = [
            (self.stage in STAGES, f"stage must be one of {STAGES}"),
            (bool(self.data), "data (a JSON-lines file) is required"),
            (bool(self.init), "init (the model to start from: a gptlab run or checkpoint, or a Hugging Face folder) "
                              "is required"),
            (self.stage != "ppo" or bool(self.reward_model), "ppo needs reward_model (a `gptlab align reward` run)"),
            (self.batch_size >= 1 and self.max_iters >= 1, "batch_size and max_iters must be >= 1"),
            (self.lr > 0 and 0 <= self.min_lr <= self.lr, "need lr > 0 and 0 <= min_lr <= lr"),
            (0 <= self.val_frac < 1, "val_frac must be in [0, 1)"),
            (self.schedule in ("cosine", "wsd"), "schedule must be cosine or wsd"),
            (self.eval_interval >= 1 and self.log_interval >= 1, "eval_interval and log_interval must be >= 1"),
            (self.lm_weight >= 0 and self.beta > 0 and self.kl_coef >= 0, "need lm_weight >= 0, beta > 0, "
                                                                           "kl_coef >= 0"),
            (0 < self.gamma <= 1 and 0 <= self.lam <= 1 and self.clip > 0, "need gamma in (0, 1], lam in [0, 1], "
                                                                            "clip > 0"),
            (self.ppo_epochs >= 1 and self.minibatches >= 1 and self.max_new_tokens >= 1,
             "ppo_epochs, minibatches and max_new_tokens must be >= 1"),
            (self.ptx_coef == 0 or bool(self.ptx_data), "ptx_coef > 0 needs ptx_data (a `gptlab prepare` folder)"),
        ]
        self.require("alignment config", checks)


HELP = {
    "data": "JSON-lines training data (format per stage: docs/alignment.md)",
    "init": "model to start from: a gptlab run/checkpoint or a Hugging Face folder",
    "out_dir": "run folder: checkpoints/, metrics.jsonl, loss.png",
    "val_data": "held-out JSON-lines file; default: the last val_frac of data",
    "val_frac": "fraction of data held out when val_data is not given",
    "task": "finetune: classification | entailment | similarity | multiple_choice",
    "lm_weight": "finetune: weight of the auxiliary LM loss (GPT-1: 0.5; 0 disables)",
    "pack": "sft: pack several examples per row (attention never crosses examples)",
    "center_rewards": "reward: weight of the mean-reward-squared penalty that centres rewards at 0",
    "reference": "dpo/ppo: frozen reference model (default: init)",
    "beta": "dpo: beta of the sigmoid loss",
    "reward_model": "ppo: a `gptlab align reward` run",
    "kl_coef": "ppo: KL penalty coefficient (initial value when kl_target is set)",
    "kl_target": "ppo: target KL per response for the adaptive controller; 0 keeps kl_coef fixed",
    "kl_horizon": "ppo: adaptive KL controller horizon (responses)",
    "gamma": "ppo: discount", "lam": "ppo: GAE lambda", "clip": "ppo: policy ratio clip",
    "value_clip": "ppo: value clip", "vf_coef": "ppo: value loss weight",
    "ppo_epochs": "ppo: passes over each batch of rollouts", "minibatches": "ppo: minibatches per pass",
    "max_new_tokens": "ppo: response length limit", "temperature": "ppo: rollout sampling temperature",
    "ptx_coef": "ppo: weight of the pre-training LM loss (PPO-ptx); 0 disables",
    "ptx_data": "ppo: a `gptlab prepare` folder for the PPO-ptx loss",
    "batch_size": "examples (finetune, sft), prompts (reward, dpo) or rollouts (ppo) per step",
}
