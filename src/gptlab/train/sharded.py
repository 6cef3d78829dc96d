"""Sharded checkpoints for FSDP runs, with PyTorch's Distributed Checkpoint (DCP; torchtitan's checkpointing).

An FSDP run never gathers the model or the optimizer state on one rank to save it: every rank writes its own shards
(``torch.distributed.checkpoint.save`` of the sharded state dicts, DTensors), into a temporary folder beside the
checkpoint. Once every rank is done, rank 0 writes every rank's RNG state (``rng.safetensors``) and
``state.json``, fsyncs the folder and renames it into place: the rename is the commit (torchtitan counts a step only
once its checkpoint's metadata is written; here nothing under ``checkpoints/step-*`` without its ``state.json`` is
a checkpoint). A kill at any instant leaves the previous checkpoint as the latest complete one.

``checkpoints/step-NNNNNNN/`` holds ``state.json`` (``"sharded": {"world_size": W}``), ``rng.safetensors`` and
``dcp/`` (DCP's ``.metadata`` and one ``.distcp`` file per rank). Loading reshards: DCP reads any saved layout into
the layout of the loading process group, so a run saved by 4 ranks resumes on 2, on 1 or on 8, and ``gptlab.load``,
``sample`` and ``convert`` read the checkpoint in one process (``convert`` writes the usual single-file checkpoint).
Every rank must see the same filesystem (a shared one across hosts: NFS, Lustre, a mounted bucket).

With ``async_save`` (``--async-checkpoint``), DCP's ``async_save`` copies each rank's shards to CPU memory and a
background thread writes them while training goes on (over a process group of its own, as torchtitan does, so its
collectives never interleave with the training's). The commit is the same rename, made once every rank's write has
finished: at the next checkpoint or at the end of the run. Until then the write is a temporary folder, so a kill
during it leaves the previous checkpoint the latest.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .. import checkpoint
from ..errors import GptlabError
from ..files import atomic_write_text, fsync_tree, replace_dir, sibling
from . import distributed

DCP_DIR = checkpoint.DCP_DIR
RNG_FILE = "rng.safetensors"


class ShardedSaver:
    """Checkpoints of an FSDP run: every rank writes its shards, rank 0 commits (see the module docstring); with
    ``async_save`` the writing overlaps the following steps and :meth:`finish` commits the last one."""

    def __init__(self, run_dir: Path, d: distributed.Dist, async_save: bool = False) -> None:
        self.run_dir, self.d, self.async_save = Path(run_dir), d, async_save
        self.pending: tuple[Any, Path, int, dict[str, Any], dict[str, torch.Tensor], int] | None = None
        # async writes talk over a group of their own (gloo: they run on the CPU copies)
        self.group = tdist.new_group(backend="gloo") if async_save and d.enabled else None

    def save(
        self, step: int, module: torch.nn.Module, optimizer: torch.optim.Optimizer, meta: dict[str, Any], keep: int
    ) -> None:
        """Write checkpoint ``step`` (committed now, or with ``async_save`` once written: at the next call or at
        :meth:`finish`)."""
        self.finish()  # (the previous write, committed before a new one starts)
        tmp = Path(
            distributed.from_main(str(sibling(checkpoint.step_dir(self.run_dir, step), "tmp")), self.d)
        )  # rank 0's name, on every rank
        if self.d.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        if self.d.enabled:
            tdist.barrier()
        model_sd, optim_sd = get_state_dict(module, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        rng = distributed.gather_rng(self.d)
        if self.async_save:
            future = dcp.async_save(state, checkpoint_id=tmp / DCP_DIR, process_group=self.group)
            self.pending = (future, tmp, step, meta, rng, keep)
        else:
            dcp.save(state, checkpoint_id=tmp / DCP_DIR)
            self.pending = (None, tmp, step, meta, rng, keep)
            self.finish()

    def finish(self) -> None:
        """Wait for the write in flight (every rank's), then commit it: rank 0 writes the RNG states and
        ``state.json``, fsyncs the folder and renames it into place."""
        if self.pending is None:
            return
        future, tmp, step, meta, rng, keep = self.pending
        self.pending = None
        if future is not None:
            future.result()
        if self.d.enabled:
            tdist.barrier()
        if self.d.is_main:
            sha = checkpoint._save_tensors(rng, tmp / RNG_FILE)
            state = dict(
                meta,
                format=checkpoint.FORMAT,
                version=checkpoint.VERSION,
                step=step,
                sharded={"world_size": self.d.world_size, "format": "torch.distributed.checkpoint", "tp": self.d.tp},
                sha256={RNG_FILE: sha},
            )
            atomic_write_text(tmp / "state.json", json.dumps(state, indent=1))
            fsync_tree(tmp)
            replace_dir(tmp, checkpoint.step_dir(self.run_dir, step))  # the commit
            checkpoint.prune(self.run_dir, keep, state.get("best_step"))
        if self.d.enabled:
            tdist.barrier()


def restore_sharded(
    checkpoint_dir: Path,
    state: dict[str, Any],
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    d: distributed.Dist,
) -> dict[str, torch.Tensor]:
    """Load a sharded checkpoint into ``module`` and ``optimizer`` as this process group shards them (any world
    size, any data-parallel degree; the TP form, :mod:`.tensor_parallel`, resumes as the TP form, of any TP
    degree); returns the saved RNG states."""
    if (state["sharded"].get("tp", 1) > 1) != (d.tp > 1):
        raise GptlabError(
            f"--resume: the checkpoint was written {'with' if d.tp == 1 else 'without'} tensor parallelism; resume "
            f"it with {'--parallel fsdp+tp --tp T' if d.tp == 1 else '--parallel fsdp'}, or convert it to a single "
            f"file first (gptlab convert RUN --to gptlab)"
        )
    model_sd, optim_sd = get_state_dict(module, optimizer)  # (allocates the optimizer's state to load into)
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=checkpoint_dir / DCP_DIR, no_dist=not d.enabled)
    set_state_dict(module, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)  # (filled in place)
    return checkpoint._load_tensors(checkpoint_dir, RNG_FILE, state)
