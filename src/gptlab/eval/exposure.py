"""Exposure bias, measured: a model's loss on text under teacher forcing against its loss when its own predictions
replace part of the history (Bengio et al. 2015, "Scheduled Sampling for Sequence Prediction with Recurrent Neural
Networks"). Training with scheduled sampling is :mod:`gptlab.train.scheduled_sampling`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model import GPT
from ..recipe import DEFAULT_SEED


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
