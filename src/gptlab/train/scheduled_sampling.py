"""Scheduled sampling (Bengio et al. 2015), adapted to a parallel transformer (the exposure-bias report that measures
its effect is :mod:`gptlab.eval.exposure`).

Teacher forcing feeds ground truth at every position, so the model never sees its own mistakes (exposure bias).
Scheduled sampling replaces each ground-truth *input* token, with probability p, by the model's own prediction of
it; targets stay ground truth. A transformer predicts every position in one pass, so training uses the two-pass
approximation of Mihaylova & Martins (2019): a no-grad pass gives the greedy predictions for every position, a
random mask mixes them into the inputs, and the gradient pass runs on the mixed inputs.

p follows a schedule over steps (Bengio et al.'s decays, expressed as the probability of *using* the prediction):
``constant`` p_max; ``linear`` p_max * step / max_iters; ``inverse_sigmoid`` p_max * (1 - k / (k + exp(step / k)));
``exponential`` p_max * (1 - k**step) with 0 < k < 1.
"""

from __future__ import annotations

import math

import torch


def ss_probability(schedule: str, step: int, max_iters: int, p_max: float, k: float) -> float:
    if schedule == "none":
        return 0.0
    if schedule == "constant":
        return p_max
    if schedule == "linear":
        return p_max * min(1.0, step / max(1, max_iters))
    if schedule == "inverse_sigmoid":
        return p_max * (1.0 - k / (k + math.exp(min(step / k, 700.0))))
    if schedule == "exponential":
        return p_max * (1.0 - k**step)
    raise ValueError(schedule)


@torch.no_grad()
def mix_in_predictions(model: torch.nn.Module, x: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Inputs ``x`` [B, T] with each token after the first replaced, with probability ``p``, by the model's greedy
    prediction of it from the ground-truth prefix."""
    if p <= 0.0:
        return x
    was_training = model.training
    model.eval()
    logits, _ = model(x)
    model.train(was_training)
    pred = logits[:, :-1].argmax(-1)
    use = torch.rand(pred.shape, generator=generator, device="cpu").to(x.device) < p
    out = x.clone()
    out[:, 1:] = torch.where(use, pred, x[:, 1:])
    return out
