"""The "TP form" of a GPT: its fused projections (q/k/v in ``c_attn``; SwiGLU's gate/up in ``c_fc``) held as separate
matrices whose outputs are concatenated, the same function with other parameter names. Tensor parallelism
(:mod:`gptlab.train.tensor_parallel`) shards that form, whose sharded checkpoints a single process reads back with
:func:`fuse_state`."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn

from .layers import Linear
from .lora import role_rows
from .model import GPT


class Parts(nn.Module):
    """A fused projection held as separate matrices (named by role); the forward concatenates their outputs."""

    def __init__(self, parts: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.parts = list(parts)
        for name, m in parts.items():
            self.add_module(name, m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self._modules[p](x) for p in self.parts], dim=-1)  # type: ignore[misc]


def _split(layer: nn.Linear, sizes: dict[str, int]) -> Parts:
    parts, at = {}, 0
    for name, n in sizes.items():
        lin = Linear(layer.in_features, n, bias=layer.bias is not None, device=layer.weight.device,
                     dtype=layer.weight.dtype)  # fmt: skip
        with torch.no_grad():
            lin.weight.copy_(layer.weight[at : at + n])
            if layer.bias is not None:
                lin.bias.copy_(layer.bias[at : at + n])
        parts[name], at = lin, at + n
    return Parts(parts)


def fused_sizes(model: GPT) -> dict[str, dict[str, int]]:
    """The fused projections of a block and their parts' widths, in row order: ``attn.c_attn`` -> q, k, v (and
    ``mlp.c_fc`` -> gate, up for SwiGLU), from the projections' roles (:func:`gptlab.lora.role_rows`)."""
    by_layer: dict[str, list[tuple[int, str, int]]] = {}
    for role, (layer, a, b) in role_rows(model.config).items():
        by_layer.setdefault(layer, []).append((a, role, b - a))
    return {layer: {role: n for _, role, n in sorted(parts)} for layer, parts in by_layer.items() if len(parts) > 1}


def to_tp_form(model: GPT) -> GPT:
    """Hold each block's fused projections as separate matrices (same values; see the module docstring)."""
    for block in model.h:
        for name, sizes in fused_sizes(model).items():
            parent, _, child = name.rpartition(".")
            owner = block.get_submodule(parent)
            setattr(owner, child, _split(getattr(owner, child), sizes))
    return model


def fuse_state(sd: dict[str, torch.Tensor], model: GPT) -> dict[str, torch.Tensor]:
    """A TP-form state dict (whole tensors) in the usual form: each split projection concatenated back."""
    out = dict(sd)
    for i in range(model.config.n_layer):
        for name, sizes in fused_sizes(model).items():
            for kind in ("weight", "bias"):
                keys = [f"h.{i}.{name}.{part}.{kind}" for part in sizes]
                if keys[0] in out:
                    out[f"h.{i}.{name}.{kind}"] = torch.cat([out.pop(k) for k in keys])
    return out
