"""Every fine-tuning and alignment stage as a job on the one training loop (:mod:`gptlab.train.loop`), the loop
``gptlab train`` runs too.

A stage (:mod:`gptlab.align.stages`) owns a ``module`` (an ``nn.ModuleDict`` whose ``gpt`` entry is the model
being tuned, plus any heads or a value model) and a ``step(step, update)`` that draws its data for that step,
computes a loss and calls ``update(loss)`` once (PPO: once per minibatch and epoch). The loop supplies what
``gptlab train`` supplies, from the same code: AdamW with the same parameter groups and learning-rate schedule,
gradient clipping (per model: PPO's policy and value model are clipped apart, so the value loss's scale
never throttles the policy), ``metrics.jsonl``, the log/eval/checkpoint cadence, atomic checkpoints
(``model.safetensors`` holds the GPT, so ``gptlab sample`` and ``gptlab eval`` read a tuned run directly; heads go
to ``heads.safetensors``) and exact resume:
weights, optimizer, RNG, the step and the stage's own state (e.g. the adaptive KL coefficient), with data that
is a pure function of the step.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint, lora
from ..errors import GptlabError
from ..files import check_run_folder, run_folder
from ..interop.peft import save_peft
from ..metrics import METRICS, Metrics, plot_losses
from ..quant.quantize import records
from ..train import distributed
from ..train.loop import FitStats, fit, restore_state, save_state, state_dicts
from ..train.optim import make_optimizer
from .config import AlignConfig
from .grpo import GRPO
from .stages import STAGES, Row, Stage

ALL_STAGES: dict[str, type[Stage]] = {**STAGES, "grpo": GRPO}


def untie(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``sd`` with each storage once (a tied head is stored under its embedding's name only)."""
    seen: set[int] = set()
    out = {}
    for k, v in sd.items():
        if v.untyped_storage().data_ptr() not in seen:
            seen.add(v.untyped_storage().data_ptr())
            out[k] = v
    return out


def retie(module: torch.nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``sd`` completed with the names :func:`untie` dropped, from the tensor each shares storage with."""
    names: dict[int, list[str]] = {}
    for k, v in module.state_dict().items():
        names.setdefault(v.untyped_storage().data_ptr(), []).append(k)
    out = dict(sd)
    for group in names.values():
        have = [k for k in group if k in sd]
        for k in group:
            if k not in out and have:
                out[k] = sd[have[0]]
    return out


def train_stage(cfg: AlignConfig, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) one stage; returns its summary (what ``gptlab align <stage> --json`` prints). Under
    torchrun every rank takes its slice of each step's examples (the global batch is the single-process one with
    ``batch_size`` x ranks) and gradients are averaged across ranks before clipping."""
    check_run_folder(Path(cfg.out_dir))  # before the session: under torchrun every rank refuses alike
    with distributed.session(cfg.device) as d, run_folder(Path(cfg.out_dir)) if d.is_main else contextlib.nullcontext():
        return _train_stage(cfg, d, resume, progress)


def _train_stage(cfg: AlignConfig, d: distributed.Dist, resume: bool, progress: bool) -> dict[str, Any]:
    job = StageJob(cfg, d, resume)
    stats = fit(job, cfg, job.start, cfg.stage, progress, d.is_main)
    return job.finish(stats)


class StageJob:
    """A stage on the shared loop: its steps call :meth:`update` for each loss; rows and evaluations go to
    ``metrics.jsonl``; checkpoints hold the GPT in ``model.safetensors`` and the heads in ``heads.safetensors``."""

    def __init__(self, cfg: AlignConfig, d: distributed.Dist, resume: bool) -> None:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.cfg, self.d, self.resume = cfg, d, resume
        self.out = Path(cfg.out_dir)
        existing = checkpoint.checkpoints_for(self.out, resume)
        torch.manual_seed(cfg.seed)
        self.stage = ALL_STAGES[cfg.stage](cfg, d)
        self.module = self.stage.module
        self.optimizer = make_optimizer(self.module, cfg.optim, d.device.type)
        self.start = 0
        if resume:
            checkpoint_dir = existing[-1]
            state = checkpoint.read_state(checkpoint_dir)
            weights = {f"gpt.{k}": v for k, v in checkpoint.load_weights(checkpoint_dir, state).items()}
            weights = retie(self.module, {**weights, **checkpoint.load_extra(checkpoint_dir, state)})
            self.start = restore_state(checkpoint_dir, state, self.module, self.optimizer, weights, d, cfg.max_iters)
            self.stage.load_state(state["align"])
        self.metrics = Metrics(self.out / METRICS, self.start if resume else None, d.is_main)
        self.groups = [[p for p in g if p.requires_grad] for g in self.stage.clip_groups()]
        self.stage_row: Row = {}
        self.row: dict[str, float] = {}
        self.last_eval: dict[str, float] = {}
        self.module.train()

    def update(self, loss: torch.Tensor) -> None:
        """Backward, average gradients across ranks, clip each model's group, step."""
        cfg, d = self.cfg, self.d
        loss.backward()
        if d.enabled:
            for p in self.module.parameters():
                if p.grad is not None:
                    p.grad.copy_(distributed.mean_across_ranks(p.grad, d))
        if cfg.optim.grad_clip:
            for g in self.groups:
                torch.nn.utils.clip_grad_norm_(g, cfg.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def train_step(self, step: int) -> None:
        self.stage_row = self.stage.step(step, self.update)  # may hold device tensors: read at the next log step

    def log(self, done: int, lr: float, seconds: float, steps: int) -> dict[str, str]:
        """The last step's row, read from the device in one copy (averaged across ranks under torchrun). A loss
        that is not finite stops the run here, before any checkpoint of the broken weights (a checkpoint step is
        always a log step)."""
        raw = self.stage_row
        values = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=self.d.device) for v in raw.values()])
        self.row = dict(zip(raw, distributed.mean_across_ranks(values, self.d).tolist()))
        if not math.isfinite(self.row.get("loss", 0.0)):
            raise GptlabError(
                f"the {self.cfg.stage} loss became {self.row['loss']} at step {done}; lower --lr or raise "
                f"--warmup-iters, then --resume from the last checkpoint"
            )
        self.metrics.write(step=done, lr=lr, **self.row)
        return {k: f"{v:.4g}" for k, v in list(self.row.items())[:3]}

    def evaluate(self, done: int) -> str:
        self.module.eval()
        self.last_eval = self.stage.evaluate()
        self.module.train()
        self.metrics.write(step=done, **{f"val_{k}": v for k, v in self.last_eval.items()})
        return f"step {done}: " + "  ".join(f"{k} {v:.4g}" for k, v in self.last_eval.items())

    def save(self, done: int) -> None:
        _, optim_sd = state_dicts(self.module, self.optimizer)
        sd = {k: v.detach().cpu() for k, v in self.module.state_dict().items()}
        gpt = {k[4:]: v for k, v in sd.items() if k.startswith("gpt.")}
        extra = untie({k: v for k, v in sd.items() if not k.startswith("gpt.")})
        meta = {
            "model_config": self.stage.gpt.config.to_dict(),
            "train_config": self.cfg.to_dict(),
            "tokenizer": self.stage.tok.spec(),
            "align": self.stage.state(),
            "val_loss": None,
            "best_val": None,
            "best_step": None,
            **records(self.stage.gpt),
        }
        save_state(self.out, done, self.d, gpt, optim_sd, meta, self.cfg.keep_last, extra)
        if done == self.cfg.max_iters and self.d.is_main and lora.adapters(self.stage.gpt):
            save_peft(self.stage.gpt, self.out / "adapter", self.cfg.model, replace=True)

    def finish(self, stats: FitStats) -> dict[str, Any]:
        cfg, d, out, stage, metrics = self.cfg, self.d, self.out, self.stage, self.metrics
        summary = {
            "stage": cfg.stage,
            "out_dir": str(out),
            "steps": cfg.max_iters,
            "resumed_from": self.start if self.resume else None,
            "train_seconds": stats.seconds,
            "eval": self.last_eval,
            "metrics": str(out / METRICS),
            "world_size": d.world_size,
            **lora.trainable_summary(self.module),
        }
        if lora.adapters(stage.gpt):
            summary["adapter"] = str(out / "adapter")
        if not d.is_main:
            return summary
        summary.update(stage.summary())
        rows = [r for r in metrics.rows() if "loss" in r or "val_loss" in r]
        if rows:
            plot_losses(rows, out / "loss.png", f"{cfg.stage}: {Path(cfg.model).name} on {Path(cfg.data).name}")
            summary["loss_plot"] = str(out / "loss.png")
        return summary
