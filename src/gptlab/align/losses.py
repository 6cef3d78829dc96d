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
- :class:`AdaptiveKL`: Ziegler et al. 2019's controller, β ← β·(1 + clip(KL/target − 1, ±0.2)·n/horizon).
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
