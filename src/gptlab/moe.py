"""Mixture-of-experts feed-forward layer (a :class:`~gptlab.model.Block`'s ``mlp`` where the config routes)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .config import GPTConfig
from .layers import gelu


class MoE(nn.Module):
    """Routed feed-forward (Shazeer et al. 2017; Lepikhin et al. 2020, GShard; Fedus et al. 2021, Switch): a linear
    router, softmax over ``n_experts``, each token sent to its top-k experts with the chosen probabilities
    renormalized to sum to 1, and the experts' outputs summed with those weights. The experts are GELU MLPs stored
    stacked ([E, in, out]), so all of them run as one batched matmul over their tokens: assignments are sorted by
    expert (stably, first choices of all tokens before second choices), scattered into an [E, slots, d] buffer and
    gathered back with index_add.

    In training with ``capacity_factor > 0`` an expert keeps at most ceil(factor * tokens * k / E) assignments, in
    that priority order; the rest are dropped (their share is 0, so the token passes through the residual).
    Evaluation and generation are always dropless, so a row never depends on the others in its batch. A compiled
    evaluation graph (the engine's compiled decode step) sizes every expert's buffer for all tokens, keeping shapes
    static; elsewhere the buffer is as long as the busiest expert's list.

    ``aux_loss`` (after each forward): the Switch/GShard load-balancing loss E * sum_i f_i * P_i, with f_i the
    fraction of the token-to-expert assignments routed to expert i (before drops) and P_i the mean router
    probability of expert i, weighted by ``aux_loss_weight``, plus ST-MoE's router z-loss mean(logsumexp(logits)^2)
    weighted by ``z_loss_weight``. ``stats`` holds the detached load-balancing loss, z-loss, per-expert assignment
    fractions and dropped fraction, for logging without a host sync."""

    def __init__(self, cfg: GPTConfig, shared: nn.Module | None = None) -> None:
        """``shared``: an always-on expert every token also passes through (DeepSeekMoE), built by the block."""
        super().__init__()
        E, C, Fh = cfg.n_experts, cfg.n_embd, cfg.expert_ff or 4 * cfg.n_embd
        self.k, self.capacity_factor = cfg.experts_per_token, cfg.capacity_factor
        self.weights = (cfg.aux_loss_weight, cfg.z_loss_weight)
        self.shared = shared  # (registered first, as it is built first: gptlab.model.replay_construction_draws)
        self.router = nn.Linear(C, E, bias=False)
        self.fc_weight = nn.Parameter(torch.empty(E, C, Fh))
        self.proj_weight = nn.Parameter(torch.empty(E, Fh, C))
        self.fc_bias = nn.Parameter(torch.zeros(E, Fh)) if cfg.bias else None
        self.proj_bias = nn.Parameter(torch.zeros(E, C)) if cfg.bias else None
        self.approximate = "tanh" if cfg.activation == "gelu_new" else "none"
        self.dropout = nn.Dropout(cfg.dropout)
        self.aux_loss: torch.Tensor | None = None
        self.stats: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        x2 = x.reshape(-1, C)
        N, E = x2.size(0), self.fc_weight.size(0)
        logits = self.router(x2).float()
        probs = logits.softmax(-1)
        weight, expert = probs.topk(self.k, dim=-1)  # [N, k]
        weight = weight / weight.sum(-1, keepdim=True)
        # Assignments, slot-major (every first choice before any second choice), then grouped by expert.
        e, order = torch.sort(expert.t().reshape(-1), stable=True)
        tok = torch.arange(N, device=x.device).repeat(self.k)[order]
        w = weight.t().reshape(-1)[order]
        counts = torch.bincount(e, minlength=E)
        pos = torch.arange(e.numel(), device=x.device) - (counts.cumsum(0) - counts)[e]  # slot within its expert
        keep = torch.ones_like(pos, dtype=torch.bool)
        if self.training and self.capacity_factor > 0:
            # Static shapes, no host sync: a dropped assignment keeps its place in the lists but writes to a spare
            # slot (index `slots`) and carries weight 0, so it adds nothing and gets no gradient.
            slots = math.ceil(self.capacity_factor * N * self.k / E)
            keep = pos < slots
            w, pos = w * keep, torch.where(keep, pos, slots)
        elif not self.training and torch.compiler.is_compiling():  # static shapes (compiled decoding): room for all
            slots = N
        else:  # dropless: as long as the busiest expert's list (on CUDA, one host sync per MoE layer)
            slots = int(counts.max())
        xe = x2.new_zeros(E, slots + 1, C)
        xe[e, pos] = x2[tok]
        h = (
            torch.bmm(xe, self.fc_weight)
            if self.fc_bias is None
            else torch.baddbmm(self.fc_bias[:, None], xe, self.fc_weight)
        )
        h = gelu(h, self.approximate)
        ye = (
            torch.bmm(h, self.proj_weight)
            if self.proj_bias is None
            else torch.baddbmm(self.proj_bias[:, None], h, self.proj_weight)
        )
        out = torch.zeros_like(x2).index_add_(0, tok, (ye[e, pos] * w[:, None]).to(x2.dtype))
        fraction = counts.float() / (N * self.k)
        balance = E * (fraction * probs.mean(0)).sum()
        z = torch.logsumexp(logits, -1).pow(2).mean()
        self.aux_loss = self.weights[0] * balance + self.weights[1] * z
        self.stats = {
            "balance_loss": balance.detach(),
            "z_loss": z.detach(),
            "expert_fraction": fraction.detach(),
            "dropped_fraction": 1.0 - keep.float().mean(),
        }
        out = self.dropout(out.view(B, T, C))
        return out if self.shared is None else out + self.shared(x)
