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
from ..files import _fsync_tree, atomic_write_text, replace_dir, sibling
from . import distributed

DCP_DIR = checkpoint.DCP_DIR
RNG_FILE = "rng.safetensors"


def save_sharded(
    run_dir: Path,
    step: int,
    d: distributed.Dist,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    meta: dict[str, Any],
    keep_last: int,
) -> Path:
    """Checkpoint ``step`` of an FSDP run: every rank writes its shards, rank 0 commits (see the module docstring)."""
    final = Path(run_dir) / "checkpoints" / f"step-{step:07d}"
    tmp = Path(distributed.from_main(str(sibling(final, "tmp")), d))  # rank 0's name, on every rank
    if d.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if d.enabled:
        tdist.barrier()
    model_sd, optim_sd = get_state_dict(module, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp / DCP_DIR)
    rng = distributed.gather_rng(d)
    if d.is_main:
        sha = checkpoint._save_tensors(rng, tmp / RNG_FILE)
        state = dict(
            meta,
            format=checkpoint.FORMAT,
            version=checkpoint.VERSION,
            step=step,
            sharded={"world_size": d.world_size, "format": "torch.distributed.checkpoint", "tp": d.tp},
            sha256={RNG_FILE: sha},
        )
        atomic_write_text(tmp / "state.json", json.dumps(state, indent=1))
        _fsync_tree(tmp)
        replace_dir(tmp, final)  # the commit
        checkpoint.prune(Path(run_dir), keep_last, state.get("best_step"))
    if d.enabled:
        tdist.barrier()
    return final


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
