"""Tensor parallelism (Megatron-LM's layout, Shoeybi et al. 2019) over one dimension of a 2-D device mesh, with FSDP2
over the other: ``--parallel fsdp+tp --tp T``, torchtitan's recipe on PyTorch's own DTensor.

In each block, the projections that produce heads (q, k, v; the MLP's up and gate) are split by output rows
(``ColwiseParallel``) and the two that consume them (attention's ``c_proj``, the MLP's ``c_proj``) by input
columns (``RowwiseParallel``): each rank of a TP group computes ``n_head / T`` query heads, ``n_kv_head / T``
key/value heads (grouped-query attention keeps its groups whole) and ``1 / T`` of the MLP, and one all-reduce per
sub-layer sums the partial outputs. Embeddings, norms and the head stay whole (replicated across the TP group).

gptlab keeps q, k and v in one matrix (``c_attn``) and SwiGLU's gate and up in one (``c_fc``); a plain row split
of those would hand a rank the wrong rows. So a TP run holds them as separate matrices (``c_attn.q``, ``c_attn.k``,
``c_attn.v``; ``c_fc.gate``, ``c_fc.up``) whose outputs are concatenated locally: the TP form
(:mod:`gptlab.tp_form`). Its sharded checkpoints (DCP, :mod:`.sharded`) are in that form and reshard across TP and
data-parallel degrees; :func:`gptlab.tp_form.fuse_state` turns them back into the usual form when a single process
loads one (``gptlab.load``, ``convert``).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import GptlabError
from ..model import GPT
from ..tp_form import fused_sizes, to_tp_form


def check(model: GPT, tp: int) -> None:
    cfg = model.config
    problems = [
        what
        for bad, what in (
            (cfg.n_head % tp != 0, f"n_head {cfg.n_head}"),
            (cfg.n_kv_heads % tp != 0, f"n_kv_head {cfg.n_kv_heads}"),
            (cfg.ffn_hidden % tp != 0, f"the MLP width {cfg.ffn_hidden}"),
        )
        if bad
    ]
    if problems:
        raise GptlabError(f"--tp {tp} must divide {', '.join(problems)}; choose a --tp that divides them")
    if model.moe_layers() or getattr(model, "lora", None) or model.vision is not None:
        raise GptlabError("tensor parallelism covers dense text models without LoRA; use --parallel fsdp")


def parallelize(model: GPT, tp_mesh: Any) -> GPT:
    """Shard every block over ``tp_mesh`` (Megatron's column / row split; see the module docstring) and make each
    attention module count its local heads."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tp = tp_mesh.size()
    check(model, tp)
    to_tp_form(model)
    fused = fused_sizes(model)
    for block in model.h:
        plan: dict[str, Any] = {"attn.c_proj": RowwiseParallel(), "mlp.c_proj": RowwiseParallel()}
        for name in ("attn.c_attn", "mlp.c_fc"):
            for part in fused.get(name, {"": 0}):
                plan[f"{name}.{part}" if part else name] = ColwiseParallel()
        parallelize_module(block, tp_mesh, plan)
        attn: Any = block.attn
        attn.n_head, attn.n_kv_head = attn.n_head // tp, attn.n_kv_head // tp
        attn.sizes = tuple(s // tp for s in attn.sizes)
    return model


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for parameters spread over different device meshes (FSDP's 1-D mesh for
    embeddings and norms, the 2-D mesh for tensor-parallel matrices), which it cannot stack: the global norm from
    each gradient's full norm, then the same clip coefficient, max_norm / (norm + 1e-6) capped at 1."""
    from torch.distributed.tensor import DTensor

    norms = []
    for p in params:
        if p.grad is None:
            continue
        n = torch.linalg.vector_norm(p.grad)
        norms.append(n.full_tensor() if isinstance(n, DTensor) else n)
    total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for p in params:
        if p.grad is not None:
            p.grad.mul_(coef)
    return total
