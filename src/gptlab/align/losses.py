"""The objectives of fine-tuning and alignment, as plain functions of tensors (each tested against an independent
computation):

- :func:`bradley_terry_loss`: reward-model loss −log σ(r_chosen − r_rejected) (InstructGPT eq. 1);
- :func:`dpo_loss`: direct preference optimisation, −log σ(β·[(log π − log π_ref)(y_w) − (log π − log π_ref)(y_l)])
  (Rafailov et al. 2023, eq. 7), with the implicit rewards;
- :func:`gae`: generalised advantage estimation (Schulman et al. 2016), per token, over a response mask;
- :func:`ppo_losses`: the clipped surrogate policy loss and the clipped value loss (Schulman et al. 2017), with
  the clip fraction and an approximate KL of the update;
- :func:`kl_penalty`: per-token KL(π ‖ π_ref) estimates, k1 = log π − log π_ref (unbiased, what InstructGPT's
  reward uses) and k3 = (r − 1) − log r with r = π_ref/π (unbiased and never negative; Schulman 2020);
- :class:`AdaptiveKL`: Ziegler et al. 2019's controller, β ← β·(1 + clip(KL/target − 1, ±0.2)·n/horizon);
- :func:`group_advantages` and :func:`grpo_loss`: RL with verifiable rewards over groups of completions of one
  prompt: GRPO (Shao et al. 2024, DeepSeekMath eq. 3), Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like
  Training"), DAPO (Yu et al. 2025: token-level normalisation, clip-higher) and RLOO (Ahmadian et al. 2024, the
  leave-one-out baseline of Kool et al. 2019).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def ranking_pairs(k: int) -> list[tuple[int, int]]:
    """All (better, worse) index pairs of a ranking of ``k`` responses listed best first: k·(k−1)/2 of them."""
    return list(itertools.combinations(range(k), 2))


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean loss, implicit reward of the chosen, of the rejected), from summed response log-probabilities."""
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    return -F.logsigmoid(chosen - rejected).mean(), chosen.detach(), rejected.detach()


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) [B, T] for per-token ``rewards`` and ``values`` at positions where ``mask`` is 1 (the
    response tokens, contiguous per row); the value after a row's last response token is 0 (the episode ends)."""
    adv = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = torch.where(m > 0, delta + gamma * lam * running, running)
        next_value = torch.where(m > 0, values[:, t], next_value)
        adv[:, t] = running * m
    return adv, (adv + values) * mask


def ppo_losses(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
    value_clip: float,
) -> dict[str, torch.Tensor]:
    """Per-token clipped objectives, averaged over ``mask``: policy loss −min(ρ·A, clip(ρ, 1±ε)·A) with
    ρ = exp(logp − old_logp), and value loss ½·max((V − R)², (clip(V, V_old ± ε_v) − R)²)."""
    ratio = torch.exp(logp - old_logp)
    policy = masked_mean(-torch.min(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages), mask)
    v_clipped = old_values + (values - old_values).clamp(-value_clip, value_clip)
    value = 0.5 * masked_mean(torch.max((values - returns) ** 2, (v_clipped - returns) ** 2), mask)
    with torch.no_grad():
        clipfrac = masked_mean(((ratio - 1).abs() > clip).float(), mask)
        approx_kl = masked_mean(0.5 * (logp - old_logp) ** 2, mask)
    return {"policy_loss": policy, "value_loss": value, "clipfrac": clipfrac, "approx_kl": approx_kl}


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from log-probabilities of tokens sampled from π."""
    if kind == "k1":
        return logp - ref_logp
    log_ratio = ref_logp - logp
    return torch.expm1(log_ratio) - log_ratio


class AdaptiveKL:
    """β that tracks a target KL (Ziegler et al. 2019, section 2.2); a fixed β when ``target`` is None."""

    def __init__(self, coef: float, target: float | None = None, horizon: int = 10_000) -> None:
        self.coef, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float, n: int) -> None:
        if self.target is not None:
            error = min(max(kl / self.target - 1, -0.2), 0.2)
            self.coef *= 1 + error * n / self.horizon


LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "rloo")


def group_advantages(rewards: torch.Tensor, group: int, loss_type: str, eps: float = 1e-4) -> torch.Tensor:
    """Per completion, its advantage within its group (``rewards`` [N], groups of ``group`` consecutive rows):

    - grpo, dapo: (r − mean) / (std + eps), std the sample standard deviation of the group (GRPO's "outcome
      supervision"; TRL's ``scale_rewards="group"``, eps 1e-4);
    - dr_grpo: r − mean (Dr. GRPO drops the std, which favours groups that are nearly all right or all wrong);
    - rloo: r − mean of the other G − 1 rewards = G / (G − 1) · (r − mean).
    """
    r = rewards.view(-1, group).float()
    centred = r - r.mean(1, keepdim=True)
    if loss_type in ("grpo", "dapo"):
        adv = centred / (r.std(1, keepdim=True) + eps)
    elif loss_type == "dr_grpo":
        adv = centred
    elif loss_type == "rloo":
        adv = centred * group / (group - 1)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    return adv.flatten()


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str,
    clip_low: float,
    clip_high: float,
    max_tokens: int,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
) -> dict[str, torch.Tensor]:
    """The clipped policy objective per completion token, ``−min(ρ A, clip(ρ, 1 − ε_low, 1 + ε_high) A) + β·k3``
    with ρ = π / π_old (``logp``, ``old_logp``, ``mask`` [N, T]; ``adv`` [N]), aggregated as each paper does:

    - grpo: mean over each completion's tokens, then over completions (GRPO eq. 3: 1/G Σ_i 1/|o_i| Σ_t);
    - dapo: sum over every token of the batch / their number (DAPO eq. 8, token-level);
    - dr_grpo: sum over every token / (N · ``max_tokens``): a constant, so no length bias (Dr. GRPO);
    - rloo: sum over each completion's tokens (REINFORCE on the sequence), mean over completions.

    Returns the loss and TRL's diagnostics: the fraction of tokens clipped below (ρ < 1 − ε, A < 0), above
    (ρ > 1 + ε_high, A > 0), either, and the KL when ``beta > 0``."""
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    per_token = -torch.min(ratio * a, ratio.clamp(1 - clip_low, 1 + clip_high) * a)
    kl = None
    if ref_logp is not None and beta > 0:
        kl = kl_penalty(logp, ref_logp, "k3")
        per_token = per_token + beta * kl
    per_token = per_token * mask
    n_tok = mask.sum().clamp(min=1)
    if loss_type == "grpo":
        loss = (per_token.sum(1) / mask.sum(1).clamp(min=1)).mean()
    elif loss_type == "dapo":
        loss = per_token.sum() / n_tok
    elif loss_type == "dr_grpo":
        loss = per_token.sum() / (mask.size(0) * max_tokens)
    elif loss_type == "rloo":
        loss = per_token.sum(1).mean()
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    with torch.no_grad():
        low = ((ratio < 1 - clip_low) & (a < 0)).float()
        high = ((ratio > 1 + clip_high) & (a > 0)).float()
        out = {
            "loss": loss,
            "clip_ratio_low": masked_mean(low, mask),
            "clip_ratio_high": masked_mean(high, mask),
            "clip_ratio": masked_mean(low + high, mask),
        }
        if kl is not None:
            out["kl"] = masked_mean(kl, mask)
    return out
