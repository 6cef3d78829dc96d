"""Scheduled sampling (Bengio et al. 2015), adapted to a parallel transformer, and the exposure-bias report.

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
import torch.nn.functional as F

from ..model import GPT
from ..recipe import DEFAULT_SEED


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


@torch.no_grad()
def exposure_report(
    model: GPT, tokens: list[int], p: float, seed: int = DEFAULT_SEED, max_windows: int = 64
) -> dict[str, float]:
    """Mean per-token loss of ``tokens`` under teacher forcing and under sequential scheduled sampling at rate ``p``
    (each input is, with probability p, the model's own greedy prediction given the *mixed* history so far, as in
    Bengio et al. 2015's scheduled sampling), over up to ``max_windows`` non-overlapping windows of the model's
    context."""
    model.eval()
    span = model.config.block_size + 1
    windows = [tokens[i : i + span] for i in range(0, max(len(tokens) - 1, 1), span)][:max_windows]
    windows = [w for w in windows if len(w) > 1]
    g = torch.Generator().manual_seed(seed)
    tf_sum = ss_sum = 0.0
    n = replaced = 0
    for w in windows:
        x = torch.tensor([w])
        logits, _ = model(x[:, :-1])
        tf_sum += F.cross_entropy(logits[0], x[0, 1:], reduction="sum").item()
        history = [w[0]]
        for i in range(1, len(w)):
            logits, _ = model(torch.tensor([history]))
            ss_sum += F.cross_entropy(logits[0, -1:], x[0, i : i + 1]).item()
            if torch.rand((), generator=g).item() < p:
                history.append(int(logits[0, -1].argmax()))
                replaced += 1
            else:
                history.append(w[i])
        n += len(w) - 1
    return {
        "tokens": n,
        "windows": len(windows),
        "teacher_forcing_loss": tf_sum / n,
        "scheduled_sampling_loss": ss_sum / n,
        "p": p,
        "replaced_fraction": replaced / n,
    }
