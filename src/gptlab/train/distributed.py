"""torchrun integration: process group, device, DDP / FSDP wrapping, cross-rank averages.

Run ``torchrun --nproc_per_node=N -m gptlab train ...`` (or ``--nnodes``/``--rdzv-endpoint`` for several machines).
The backend is NCCL on CUDA and gloo on CPU. Outside torchrun everything here is a no-op.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..config import GPTConfig
from ..device import pick_device
from ..errors import GptlabError
from ..model import GPT, replay_construction_draws

DEFAULT_TIMEOUT = 600.0  # seconds a collective waits for every rank (torch's default for gloo is 30 minutes)


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    tp: int = 1  # tensor-parallel degree: ranks r .. r + tp - 1 (r a multiple of tp) share one data-parallel slot

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        """This rank's data-parallel index (the slice of each step's batch it reads)."""
        return self.rank // self.tp

    @property
    def dp_size(self) -> int:
        return self.world_size // self.tp

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


def setup(device_pref: str, timeout: float = DEFAULT_TIMEOUT, tp: int = 1) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % tp:
        raise GptlabError(f"--tp {tp} must divide the number of processes ({world})")
    if world == 1:
        return Dist(device=pick_device(device_pref))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_pref, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        wait = datetime.timedelta(seconds=timeout)
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            store=_attempt_store(rank, world, wait),
            rank=rank,
            world_size=world,
            device_id=device if device.type == "cuda" else None,
            timeout=wait,
        )
    return Dist(rank=rank, local_rank=local_rank, world_size=world, device=device, tp=tp)


def _attempt_store(rank: int, world: int, timeout: datetime.timedelta) -> dist.Store:
    """torchrun's store (``MASTER_ADDR``:``MASTER_PORT``, held by its agent or by rank 0), its keys scoped to this
    restart attempt. Under ``--max-restarts`` the agent's store outlives a failed attempt, and the restarted ranks
    could read the dead ranks' addresses from it (gloo then fails with "Connection refused")."""
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=not agent and rank == 0,
        timeout=timeout,
        multi_tenant=True,
    )
    return dist.PrefixStore(f"gptlab/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def restarted(run_dir: Path) -> bool:
    """Whether this process is torchrun's restart of a failed run (``--max-restarts``) whose folder holds a
    checkpoint to continue from: such a run resumes by itself, as if given ``--resume``."""
    from ..checkpoint import list_checkpoints

    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0 and bool(list_checkpoints(run_dir))


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def session(device_pref: str, timeout: float = DEFAULT_TIMEOUT, tp: int = 1) -> Iterator[Dist]:
    """The process group (under torchrun) for the duration of a run, torn down however the run ends. A collective
    that another rank never joins (it died, hung or lost its network) fails after ``timeout`` seconds with one
    line naming this rank, instead of hanging."""
    d = setup(device_pref, timeout, tp)
    try:
        yield d
        if d.enabled:  # every rank past its last collective before any rank destroys the group
            dist.barrier()
    except (dist.DistError, RuntimeError) as e:
        if not d.enabled or not _is_collective_failure(e):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise GptlabError(
            f"rank {d.rank} of {d.world_size}: a collective failed ({first}); another rank died, hung past the "
            f"collective timeout ({timeout:g} s) or lost its network. Relaunch with --resume (torchrun "
            f"--max-restarts does it by itself)"
        ) from None
    finally:
        teardown()


def _is_collective_failure(e: BaseException) -> bool:
    if isinstance(e, dist.DistError):
        return True
    text = str(e).lower()
    return any(s in text for s in ("gloo", "timed out", "connection closed", "connection reset", "nccl"))


def wrap(model: GPT, d: Dist, parallel: str, param_dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """DDP (every rank holds the whole model) or FSDP2 (parameters, gradients and optimizer state sharded per
    block; with ``param_dtype`` bf16, parameters are gathered and computed in bf16 while the sharded master copy
    and the gradient reductions stay fp32: FSDP2's ``MixedPrecisionPolicy``). FSDP shards in place, so it must run
    before the optimizer is built."""
    if not d.enabled:
        return model
    if parallel in ("fsdp", "fsdp+tp"):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # only FSDP runs need them

        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        mesh = None
        if parallel == "fsdp+tp":  # a (data, tensor) mesh: TP inside each group of tp ranks, FSDP across groups
            from torch.distributed.device_mesh import init_device_mesh

            from .tensor_parallel import parallelize

            mesh = init_device_mesh(d.device.type, (d.dp_size, d.tp), mesh_dim_names=("dp", "tp"))
            parallelize(model, mesh["tp"])
            mesh = mesh["dp"]
        for block in model.h:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)


def build_sharded(
    cfg: GPTConfig, d: Dist, parallel: str, param_dtype: torch.dtype = torch.float32, fill: bool = True
) -> GPT:
    """A new model built sharded (FSDP2's meta-device initialisation; torchtitan builds its models this way): on the
    meta device (no memory), sharded by :func:`wrap`, then each rank allocates only its own shards and, with
    ``fill``, draws them (:func:`gptlab.model.init_`: whole parameters one at a time, so the largest transient is
    one parameter) to the values ``GPT(cfg)`` has from the same seed in one process. The random stream must be
    seeded alike on every rank first. A model larger than one process's memory is built this way; ``fill=False``
    leaves the shards for a sharded checkpoint to fill."""
    with torch.device("meta"):
        model = GPT(cfg)
    replay_construction_draws(model)  # (the meta device draws nothing: draw what building on the CPU draws)
    stream = torch.get_rng_state()
    wrap(model, d, parallel, param_dtype)
    model.to_empty(device=d.device)
    if fill:
        torch.set_rng_state(stream)
        model.reset_parameters()
    return model


def gather_rng(d: Dist) -> dict[str, torch.Tensor]:
    """Every rank's RNG states (CPU, and CUDA where used), keyed ``torch_rank{r}`` / ``cuda_rank{r}``, on every rank:
    what a checkpoint keeps for an exact resume."""
    rng = {f"torch_rank{d.rank}": torch.get_rng_state()}
    if d.device.type == "cuda":
        rng[f"cuda_rank{d.rank}"] = torch.cuda.get_rng_state()
    return {k: v for r in gathered(rng, d) for k, v in r.items()}


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


def peak_memory_mib(d: Dist) -> list[float]:
    """Every rank's peak memory so far, MiB, in rank order: the CUDA caching allocator's peak on a GPU, else the
    process's peak resident set (``VmHWM``, which includes the Python and PyTorch runtime)."""
    if d.device.type == "cuda":
        mine = torch.cuda.max_memory_allocated(d.device) / 2**20
    else:
        mine = resident_mib("VmHWM")
    return gathered(round(mine, 1), d)


def gathered(value: Any, d: Dist) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank."""
    if not d.enabled:
        return [value]
    out: list[Any] = [None] * d.world_size
    dist.all_gather_object(out, value)
    return out


def resident_mib(field: str = "VmRSS") -> float:
    """This process's ``VmRSS`` (now) or ``VmHWM`` (peak), MiB; 0 where /proc is not there."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0
