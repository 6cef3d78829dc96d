"""AdamW with decoupled weight decay on matrices only, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math
from typing import Protocol

import torch


class OptimizerSettings(Protocol):
    """The optimizer and schedule fields that ``gptlab train`` and every ``gptlab align`` stage share (both configs
    declare them with the same names and meanings; see :mod:`gptlab.train.config`)."""

    lr: float
    min_lr: float
    warmup_iters: int
    lr_decay_iters: int
    max_iters: int
    schedule: str
    decay_frac: float
    weight_decay: float
    beta1: float
    beta2: float


def make_optimizer(model: torch.nn.Module, cfg: OptimizerSettings, device_type: str) -> torch.optim.AdamW:
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


def lr_at(step: int, cfg: OptimizerSettings) -> float:
    """Linear warmup from 0 over ``warmup_iters`` steps, then either cosine decay to ``min_lr`` at
    ``lr_decay_iters`` (default ``max_iters``; GPT-3 appendix B, nanoGPT) or, for ``schedule="wsd"``
    (warmup-stable-decay, Hu et al. 2024 / Hägele et al. 2024), ``lr`` held flat and then decayed linearly to
    ``min_lr`` over the last ``decay_frac`` of the steps. ``min_lr`` after the decay."""
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
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
