"""torchrun integration: process group, device, DDP / FSDP wrapping, cross-rank averages.

Run ``torchrun --nproc_per_node=N -m gptlab train ...`` (or ``--nnodes``/``--rdzv-endpoint`` for several machines).
The backend is NCCL on CUDA and gloo on CPU. Outside torchrun everything here is a no-op.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..device import pick_device
from ..model import GPT


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def allow_tf32(device: torch.device) -> None:
    """Training on CUDA: fp32 matmuls (those autocast leaves in fp32, and every one of an fp32 run) may use TF32
    tensor cores, 10-bit mantissa products accumulated in fp32 (PyTorch docs, "TensorFloat-32 (TF32) on Ampere (and
    later) devices"); nanoGPT and llm.c train this way. A process-wide setting, so it is made only by
    training on CUDA; inference and the parity tests keep full fp32."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.fp32_precision = "tf32"


def setup(device_pref: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(device=pick_device(device_pref))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_pref, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None
        )
    return Dist(rank=rank, local_rank=local_rank, world_size=world, device=device)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def session(device_pref: str) -> Iterator[Dist]:
    """The process group (under torchrun) for the duration of a run, torn down however the run ends."""
    d = setup(device_pref)
    try:
        yield d
        if d.enabled:  # every rank past its last collective before any rank destroys the group
            dist.barrier()
    finally:
        teardown()


def wrap(model: GPT, d: Dist, parallel: str) -> torch.nn.Module:
    """DDP (every rank holds the whole model) or FSDP2 (parameters, gradients and optimizer state sharded per
    block). FSDP shards in place, so it must run before the optimizer is built."""
    if not d.enabled:
        return model
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard  # here, not at the top: only FSDP runs need it

        for block in model.h:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)


def from_main(value: Any, d: Dist) -> Any:
    """Rank 0's ``value`` on every rank (a decision every rank must share, such as a measured dtype)."""
    if not d.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_across_ranks(values: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= d.world_size
    return values
