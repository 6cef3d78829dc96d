"""Tensor memory by kind over one training step (``gptlab train --track-memory``), measured by PyTorch's own
trackers (``torch.distributed._tools``: ``MemTracker``, and ``FSDPMemTracker`` for FSDP2 runs), which follow every
tensor's storage through the dispatcher and say what it is (parameter, gradient, optimizer state, activation,
FSDP's gathered buffers, temporary).

This is the figure :func:`gptlab.plan.memory.training_memory` models (its ``peak``), on any device: a CPU process's
resident set also holds the Python and PyTorch runtime, communication buffers and memory the allocator keeps, which
no planner counts. The report is the snapshot at the step's high-water mark, in MiB, under the planner's names.
"""

from __future__ import annotations

from typing import Any

import torch

# the trackers' kinds (MemTracker's _MemRefType, FSDPMemTracker's _FSDPRefType) under the planner's names
KINDS = {
    "Parameter": "weights",
    "Sharded Param": "weights",
    "Gradient": "gradients",
    "Sharded Grad": "gradients",
    "Optstate": "optimizer",
    "OptState": "optimizer",
    "Activation": "activations",
    "Unsharded Param": "fsdp_buffers",
    "Unsharded Grad": "fsdp_buffers",
    "All Gather": "fsdp_buffers",
    "Reduce Scatter": "fsdp_buffers",
}
TOTAL = "Total"


def tracker(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Any:
    """A tracker for ``module`` (FSDP2-sharded or not) and ``optimizer``, to enter around one step."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.distributed.fsdp import FSDPModule

    if isinstance(module, FSDPModule):
        return FSDPMemTracker(module, optimizer)
    t = MemTracker()
    t.track_external(module, optimizer)
    return t


def report(t: Any, device: torch.device) -> dict[str, float]:
    """The tracked step's high-water mark on ``device``, by kind, MiB: weights, gradients, optimizer, activations,
    fsdp_buffers, other (temporaries, buffers, inputs) and peak (their sum)."""
    snapshot = t.get_tracker_snapshot("peak")
    mine: dict[str, int] = next((v for dev, v in snapshot.items() if torch.device(dev).type == device.type), {})
    out = dict.fromkeys(("weights", "gradients", "optimizer", "activations", "fsdp_buffers", "other"), 0.0)
    for kind, nbytes in mine.items():
        if kind != TOTAL:
            out[KINDS.get(kind, "other")] += nbytes / 2**20
    out["peak"] = mine.get(TOTAL, 0) / 2**20
    return {k: round(v, 1) for k, v in out.items()}
