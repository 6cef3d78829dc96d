"""The one training loop behind ``gptlab train`` and every ``gptlab align`` stage, and the checkpoint state they
share.

A job (:class:`Job`: pre-training in :mod:`gptlab.train.trainer`, a stage in :mod:`gptlab.align.trainer`) says how
to take one optimizer step, what to log, how to evaluate and how to save. :func:`fit` owns what is common:

- the learning rate of every step (:func:`gptlab.train.optim.lr_at`);
- the cadence: metric rows every ``log_interval`` steps, evaluation every ``eval_interval`` steps, checkpoints every
  ``checkpoint_interval`` steps, and all three at the last step. Every checkpoint step is also an evaluation step, so
  each checkpoint records a validation figure, and every evaluation step is a log step;
- the progress bar (closed before any error line);
- the clock: throughput leaves out the first step (allocation, compilation) and the time spent evaluating and
  saving.

:func:`save_state` and :func:`restore_state` write and read what exact resume needs: weights, AdamW state, every
rank's RNG state and the step.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import torch
import torch.distributed as tdist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from tqdm import tqdm

from .. import checkpoint
from ..errors import GptlabError
from . import distributed
from .optim import OptimConfig, lr_at


class LoopSettings(Protocol):
    """The config fields :func:`fit` reads (``TrainConfig`` and ``AlignConfig`` both have them)."""

    optim: OptimConfig
    max_iters: int
    log_interval: int
    eval_interval: int
    checkpoint_interval: int


class Job(Protocol):
    """One kind of training, as :func:`fit` drives it."""

    @property
    def optimizer(self) -> torch.optim.Optimizer: ...

    def train_step(self, step: int) -> None:
        """Forward, backward and optimizer update(s) for step ``step`` (0-based)."""

    def log(self, done: int, lr: float, seconds: float, steps: int) -> dict[str, str]:
        """Write the metric rows of the steps since the last log (``steps`` of them, ``seconds`` of work);
        return the progress bar's postfix."""
        ...

    def evaluate(self, done: int) -> str:
        """Evaluate, write the metric row, return the line to print."""
        ...

    def save(self, done: int) -> None:
        """Write checkpoint ``done``."""


@dataclass
class FitStats:
    seconds: float  # the whole loop
    work_seconds: float  # steps after the first, without evaluation and checkpoint time
    work_steps: int


def fit(job: Job, cfg: LoopSettings, start: int, desc: str, progress: bool, is_main: bool) -> FitStats:
    """Run steps ``start`` .. ``cfg.max_iters - 1`` of ``job``."""
    bar = tqdm(
        total=cfg.max_iters,
        initial=start,
        desc=desc,
        disable=not (progress and is_main),
        dynamic_ncols=True,
        file=sys.stderr,
        mininterval=0.5 if sys.stderr.isatty() else 30.0,
    )
    t0 = time.perf_counter()
    t_first: float | None = None  # end of the first step: the work clock starts there
    side = 0.0  # evaluation and checkpoint seconds since t_first
    log_work, log_step = 0.0, start  # work clock and step at the last log
    try:
        for step in range(start, cfg.max_iters):
            lr = lr_at(step, cfg.optim, cfg.max_iters)
            for g in job.optimizer.param_groups:
                g["lr"] = lr
            job.train_step(step)
            done = step + 1
            bar.update(1)
            now = time.perf_counter()
            if t_first is None:  # the first step (compilation, warm-up) is not on the work clock: no rate from it
                t_first, log_work, log_step = now, 0.0, done
            is_ckpt = done == cfg.max_iters or bool(cfg.checkpoint_interval and done % cfg.checkpoint_interval == 0)
            is_eval = is_ckpt or done % cfg.eval_interval == 0
            if is_eval or done % cfg.log_interval == 0:
                work = now - t_first - side
                bar.set_postfix(job.log(done, lr, max(work - log_work, 0.0), done - log_step))
                log_work, log_step = work, done
            t_side = time.perf_counter()
            if is_eval:
                line = job.evaluate(done)
                if is_main:
                    bar.write(line, file=sys.stderr)
            if is_ckpt:
                job.save(done)
            side += time.perf_counter() - t_side
    finally:
        bar.close()  # before any error line, so that it never shares a line with the bar
    end = time.perf_counter()
    work = end - t_first - side if t_first is not None else 0.0
    return FitStats(round(end - t0, 1), work, max(cfg.max_iters - start - 1, 0))


def state_dicts(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], Any]:
    """Full (gathered across FSDP shards), CPU-resident model and name-keyed optimizer state dicts."""
    model_sd, optim_sd = get_state_dict(
        module, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    return cast(dict[str, torch.Tensor], model_sd), optim_sd


def save_state(
    run_dir: Path,
    step: int,
    d: distributed.Dist,
    model_state: dict[str, torch.Tensor],
    optim_state: Any,
    meta: dict[str, Any],
    keep_last: int,
    extra: dict[str, torch.Tensor] | None = None,
) -> None:
    """Checkpoint ``step`` with every rank's RNG state (rank 0 writes; all ranks wait for it)."""
    rng = distributed.gather_rng(d)
    if d.is_main:
        checkpoint.save_checkpoint(run_dir, step, model_state, optim_state, {**meta, "rng": rng}, keep_last, extra)
    if d.enabled:
        tdist.barrier()


def restore_state(
    checkpoint_dir: Path,
    state: dict[str, Any],
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    weights: dict[str, torch.Tensor],
    d: distributed.Dist,
    max_iters: int,
) -> int:
    """Load a checkpoint's weights (``weights``, already named as ``module`` names them), optimizer state and this
    rank's RNG state; returns the step to continue from. A checkpoint already past ``max_iters`` is refused."""
    if int(state["step"]) > max_iters:
        raise GptlabError(
            f"--resume: the run is already at step {state['step']} ({checkpoint_dir}), past --max-iters {max_iters}; "
            f"give a --max-iters above {state['step']} to train further (nothing was changed)"
        )
    if state.get("sharded"):  # an FSDP run's checkpoint: every rank reads its shards, in this run's layout
        from .sharded import restore_sharded

        rng = restore_sharded(checkpoint_dir, state, module, optimizer, d)
    else:
        optim_sd, rng = checkpoint.load_training_state(checkpoint_dir, state)
        set_state_dict(
            module,
            optimizer,
            model_state_dict=cast(Any, weights),
            optim_state_dict=optim_sd,
            options=StateDictOptions(full_state_dict=True),
        )
    restore_rng(rng, d)
    if d.is_main:
        print(f"resuming from {checkpoint_dir} (step {state['step']})", file=sys.stderr, flush=True)
    return int(state["step"])


def restore_rng(rng: dict[str, torch.Tensor], d: distributed.Dist) -> None:
    """This rank's saved RNG state. A run resumed on another number of processes (the weights and the optimizer
    reshard exactly; the data of a step is the same global batch) gives rank r the saved rank r's stream, or rank
    0's where there was none: only dropout and sampled steps can differ from a run of the new size."""
    saved = sum(k.startswith("torch_rank") for k in rng)
    key = d.rank if d.rank < saved else 0
    torch.set_rng_state(rng[f"torch_rank{key}"])
    if d.device.type == "cuda" and f"cuda_rank{key}" in rng:
        torch.cuda.set_rng_state(rng[f"cuda_rank{key}"])
    if saved != d.world_size and d.is_main:
        print(
            f"gptlab: note: the checkpoint was written by {saved} process(es), this run has {d.world_size}: the "
            f"weights and optimizer state are resharded; ranks without a saved random stream take rank 0's",
            file=sys.stderr,
            flush=True,
        )
