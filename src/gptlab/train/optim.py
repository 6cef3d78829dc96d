"""The optimizer config, AdamW with decoupled weight decay on matrices only, and the learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..recipe import NON_NEGATIVE, PROBABILITY_BELOW_1, Range, RecipeConfig, opt


@dataclass
class OptimConfig(RecipeConfig):
    """AdamW and the learning-rate schedule: one config, nested as ``optim`` in ``gptlab train``'s and every
    ``gptlab align`` stage's config (recipe table ``[optim]``; flags ``--lr``, ``--beta2``, ...). Pre-training and
    fine-tuning start from different defaults (:data:`FINETUNE_OPTIM`), of this one type."""

    help_hint = "`gptlab train --help`"
    what = "optimizer config"
    lr: float = opt(1e-3, "peak learning rate", Range(0, 10, lo_open=True))
    min_lr: float = opt(1e-4, "learning rate at the end of the decay (<= lr)", NON_NEGATIVE)
    warmup_iters: int = opt(100, "linear warmup steps", NON_NEGATIVE)
    lr_decay_iters: int = opt(0, "step where the decay ends; 0 means max_iters", NON_NEGATIVE)
    schedule: str = opt(
        "cosine", "cosine | wsd (flat at lr, then linear decay over the last decay_frac)", choices=("cosine", "wsd")
    )
    decay_frac: float = opt(0.2, "wsd: fraction of the post-warmup steps spent decaying", Range(0, 1, lo_open=True))
    weight_decay: float = opt(0.1, "AdamW decoupled weight decay (matrices and embeddings only)", Range(0, 10))
    beta1: float = opt(0.9, "AdamW beta1", PROBABILITY_BELOW_1)
    beta2: float = opt(0.99, "AdamW beta2", PROBABILITY_BELOW_1)
    grad_clip: float = opt(1.0, "clip the global gradient norm (per model in PPO) to this; 0 disables", NON_NEGATIVE)

    def checks(self) -> list[tuple[bool, str]]:
        return [(self.min_lr <= self.lr, f"min_lr = {self.min_lr} must not exceed lr = {self.lr}")]


# fine-tuning and alignment: a smaller step, no weight decay, Adam's beta2 of GPT-3 and InstructGPT
FINETUNE_OPTIM = OptimConfig(lr=1e-4, min_lr=1e-5, warmup_iters=10, weight_decay=0.0, beta2=0.95)


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig, device_type: str) -> torch.optim.AdamW:
    """AdamW; weight decay on >= 2-D tensors (matmul weights, embeddings), none on biases (also the experts' stacked
    [n_experts, features] biases) and LayerNorm gains. Uses the fused single-kernel implementation (CPU and CUDA)
    when torch offers it."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    decay = [p.dim() >= 2 and not n.endswith("bias") for n, p in named]
    groups = [
        {"params": [p for p, d in zip(params, decay) if d], "weight_decay": cfg.weight_decay},
        {"params": [p for p, d in zip(params, decay) if not d], "weight_decay": 0.0},
    ]
    fused = device_type in ("cpu", "cuda") and all(type(p) is torch.nn.Parameter for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused or None)


def lr_at(step: int, cfg: OptimConfig, max_iters: int) -> float:
    """Linear warmup from 0 over ``warmup_iters`` steps, then either cosine decay to ``min_lr`` at
    ``lr_decay_iters`` (default ``max_iters``; GPT-3 appendix B, nanoGPT) or, for ``schedule="wsd"``
    (warmup-stable-decay, Hu et al. 2024 / Hägele et al. 2024), ``lr`` held flat and then decayed linearly to
    ``min_lr`` over the last ``decay_frac`` of the steps. ``min_lr`` after the decay."""
    decay_iters = cfg.lr_decay_iters or max_iters
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / (cfg.warmup_iters + 1)
    if step >= decay_iters:
        return cfg.min_lr
    if cfg.schedule == "wsd":
        decay_start = decay_iters - cfg.decay_frac * (decay_iters - cfg.warmup_iters)
        frac = max(0.0, (step - decay_start) / max(1.0, decay_iters - decay_start))
        return cfg.lr + frac * (cfg.min_lr - cfg.lr)
    progress = (step - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)
