"""Distillation divergences between a student's and a teacher's next-token distributions, per token.

All take logits ``[..., V]`` (any float dtype; computed in at least fp32) and return one value per token
``[...]``, clamped at 0 (rounding can make a KL of nearly equal distributions slightly negative, most of all from bf16
logits). With ``p`` the teacher's and ``q`` the student's distribution at temperature ``T``:

- :func:`forward_kl` KL(p ‖ q) = Σ p (log p − log q): Hinton et al. 2015's soft-target loss (up to the entropy of p,
  a constant), mean-seeking: the student must cover everything the teacher deems likely.
- :func:`reverse_kl` KL(q ‖ p) = Σ q (log q − log p): MiniLLM (Gu et al. 2024), mode-seeking: the student is
  penalised for mass where the teacher has little.
- :func:`generalized_jsd` with β ∈ [0, 1] (GKD, Agarwal et al. 2024): with the mixture of *probabilities*
  m = β p + (1 − β) q (formed in log space with logsumexp, never as a mixture of log-probabilities),
  JSD_β = β KL(p ‖ m) + (1 − β) KL(q ‖ m). For small β, JSD_β ≈ β KL(p ‖ q); for β near 1, ≈ (1 − β) KL(q ‖ p).
  gptlab divides by β (1 − β), so the loss is continuous on [0, 1] and *equals* forward KL at β = 0 and reverse KL
  at β = 1 (TRL's unscaled form tends to 0 at both ends yet switches to a full KL at β = 0 or 1: a jump).

The trainer (:mod:`gptlab.distill.trainer`) averages one of them over the tokens and multiplies by T², Hinton's
factor that keeps the gradient's size independent of the temperature (the softened gradients scale as 1/T²).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

KINDS = ("forward_kl", "reverse_kl", "jsd")


def log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T) in at least fp32."""
    return F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, dim=-1)


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a ‖ b) per row from log-probabilities; terms where a = 0 contribute 0 (never 0 · ∞ = NaN)."""
    a = log_a.exp()
    terms = torch.where(a > 0, a * (log_a - log_b), torch.zeros((), dtype=a.dtype, device=a.device))
    return terms.sum(-1).clamp_min(0.0)


def forward_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher ‖ student) per token."""
    return _kl(log_probs(teacher, temperature), log_probs(student, temperature))


def reverse_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(student ‖ teacher) per token."""
    return _kl(log_probs(student, temperature), log_probs(teacher, temperature))


def generalized_jsd(
    student: torch.Tensor, teacher: torch.Tensor, beta: float = 0.5, temperature: float = 1.0
) -> torch.Tensor:
    """JSD_β(teacher ‖ student) / (β (1 − β)) per token: forward KL at β = 0, reverse KL at β = 1."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl(student, teacher, temperature)
    if beta == 1.0:
        return reverse_kl(student, teacher, temperature)
    lp, lq = log_probs(teacher, temperature), log_probs(student, temperature)
    log_m = torch.logsumexp(torch.stack([lp + math.log(beta), lq + math.log1p(-beta)]), dim=0)
    jsd = beta * _kl(lp, log_m) + (1.0 - beta) * _kl(lq, log_m)
    return jsd / (beta * (1.0 - beta))


def sparse_forward_kl(
    student: torch.Tensor, top_values: torch.Tensor, top_indices: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Forward KL against a teacher known only by its top-k logits ``[..., k]`` (a cache written once and reused by
    several students): the teacher's distribution is its softmax over those k tokens, the student's log-probabilities
    are its full-vocabulary ones at those tokens."""
    lp = log_probs(top_values, temperature)
    lq = log_probs(student, temperature).gather(-1, top_indices.long())
    return _kl(lp, lq)


def per_token(
    kind: str, student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0, beta: float = 0.5
) -> torch.Tensor:
    if kind == "forward_kl":
        return forward_kl(student, teacher, temperature)
    if kind == "reverse_kl":
        return reverse_kl(student, teacher, temperature)
    if kind == "jsd":
        return generalized_jsd(student, teacher, beta, temperature)
    raise ValueError(f"unknown divergence {kind!r}; choose one of {', '.join(KINDS)}")


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def hidden_cosine(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """DistilBERT's hidden-state loss (Sanh et al. 2019): mean over tokens of 1 − cos(h_student, h_teacher)."""
    cos = F.cosine_similarity(student.float(), teacher.float(), dim=-1)
    return masked_mean(1.0 - cos, mask)
