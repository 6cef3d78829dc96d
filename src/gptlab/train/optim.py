"""The optimizer config, AdamW with decoupled weight decay on matrices only, Muon for the hidden matrices beside
AdamW for the rest, and the learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

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
    optimizer: str = opt(
        "adamw",
        "adamw, or muon: Muon for the blocks' matrices, AdamW for embeddings, head, norms and biases",
        choices=("adamw", "muon"),
    )
    muon_momentum: float = opt(0.95, "muon: momentum (Nesterov)", PROBABILITY_BELOW_1)

    def checks(self) -> list[tuple[bool, str]]:
        return [(self.min_lr <= self.lr, f"min_lr = {self.min_lr} must not exceed lr = {self.lr}")]


# fine-tuning and alignment: a smaller step, no weight decay, Adam's beta2 of GPT-3 and InstructGPT
FINETUNE_OPTIM = OptimConfig(lr=1e-4, min_lr=1e-5, warmup_iters=10, weight_decay=0.0, beta2=0.95)


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig, device_type: str) -> torch.optim.Optimizer:
    """AdamW; weight decay on >= 2-D tensors (matmul weights, embeddings), none on biases (also the experts' stacked
    [n_experts, features] biases) and norm gains. Uses the fused single-kernel implementation (CPU and CUDA) when
    torch offers it. With ``optimizer="muon"``, the 2-D weights inside the blocks go to Muon instead
    (:class:`MuonWithAdamW`)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    hidden = [cfg.optimizer == "muon" and p.dim() == 2 and is_block_matrix(n) for n, p in named]
    named_adam = [np_ for np_, h in zip(named, hidden) if not h]
    params = [p for _, p in named_adam]
    decay = [p.dim() >= 2 and not n.endswith("bias") for n, p in named_adam]
    groups = [
        {"params": [p for p, d in zip(params, decay) if d], "weight_decay": cfg.weight_decay},
        {"params": [p for p, d in zip(params, decay) if not d], "weight_decay": 0.0},
    ]
    fused = device_type in ("cpu", "cuda") and all(type(p) is torch.nn.Parameter for p in params)
    adamw = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused or None)
    if cfg.optimizer == "adamw":
        return adamw
    matrices = [p for (_, p), h in zip(named, hidden) if h]
    muon = torch.optim.Muon(
        [{"params": matrices, "weight_decay": cfg.weight_decay}],
        lr=cfg.lr,
        momentum=cfg.muon_momentum,
        nesterov=True,
        adjust_lr_fn="match_rms_adamw",
    )
    return MuonWithAdamW(muon, adamw)


def is_block_matrix(name: str) -> bool:
    """A weight matrix inside a transformer block (attention and MLP projections, routers): Muon's. Embeddings and
    the head are not hidden layers, so AdamW keeps them (Jordan et al. 2024; nanochat, modded-nanogpt)."""
    parts = name.split(".")
    return "h" in parts and parts[-1] == "weight" and not any(p.startswith(("ln_", "q_norm", "k_norm")) for p in parts)


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon (Jordan et al. 2024: momentum, then the update orthogonalised by Newton-Schulz iterations;
    ``torch.optim.Muon``) for the blocks' matrices and AdamW for everything else, as one optimizer: one list of
    param groups (the learning-rate schedule sets them all), one state (checkpoints and bit-exact resume through
    torch.distributed.checkpoint's name-keyed state dicts, as for AdamW alone). Muon's step is scaled to match
    AdamW's update RMS (Liu et al. 2025, "Muon is Scalable for LLM Training"), so one ``lr`` and one weight decay
    serve both."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer) -> None:
        self.muon, self.adamw = muon, adamw
        super().__init__([*muon.param_groups, *adamw.param_groups], {})  # the same group dicts, shared
        self._share()

    def _share(self) -> None:
        n = len(self.muon.param_groups)
        self.muon.param_groups, self.adamw.param_groups = self.param_groups[:n], self.param_groups[n:]
        self.muon.state = self.adamw.state = self.state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._share()


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


def clip_and_step(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], max_norm: float) -> None:
    """``torch.nn.utils.clip_grad_norm_(params, max_norm)`` (the global L2 norm of the gradients; each scaled by
    max_norm / (norm + 1e-6) where that is below 1), then ``optimizer.step()``, in fewer passes over the gradients
    for fp32 gradients in a CPU's memory: the norm from BLAS dot products (``torch.dot``, one pass at memory speed;
    ``vector_norm`` took 2.3x as long for GPT-2's 124M gradients on an Intel Xeon, docs/benchmarks.md), and for a
    fused AdamW the coefficient is handed to the optimizer as its ``grad_scale``, the divisor its kernel applies to
    each gradient as it reads it (the hook ``torch.amp.GradScaler`` uses), instead of a pass that rescales every
    gradient. The gradients end scaled as the clipping leaves them. Other gradients (GPU, DTensor shards, other
    dtypes) take ``clip_grad_norm_`` as it is."""
    grads = [p.grad for p in params if p.grad is not None]
    if not all(type(g) is torch.Tensor and g.device.type == "cpu" and g.dtype == torch.float32 for g in grads):
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        optimizer.step()
        return
    flat = [g.reshape(-1) for g in grads]
    norm = torch.stack([torch.dot(g, g) for g in flat]).sum().sqrt() if flat else torch.zeros(())
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    # (each group's own flag: a state dict loaded from a run whose AdamW was not fused brings its groups' False)
    if isinstance(optimizer, torch.optim.AdamW) and all(g.get("fused") for g in optimizer.param_groups):
        setattr(optimizer, "grad_scale", 1.0 / coef)  # noqa: B010 (read by AdamW's fused step, as from GradScaler)
        try:
            optimizer.step()
        finally:
            delattr(optimizer, "grad_scale")
    else:
        torch._foreach_mul_(grads, coef)
        optimizer.step()
