"""The one loop behind every fine-tuning and alignment stage.

A stage (:mod:`gptlab.align.stages`) owns a ``module`` (an ``nn.ModuleDict`` whose ``gpt`` entry is the model
being tuned, plus any heads or a value model) and a ``step(step, update)`` that draws its data for that step,
computes a loss and calls ``update(loss)`` once (PPO: once per minibatch and epoch). The loop supplies what
``gptlab train`` supplies, from the same code: AdamW with the same parameter groups and learning-rate schedule,
gradient clipping (per model: PPO's policy and value model are clipped apart, so the value loss's scale
never throttles the policy), ``metrics.jsonl``, atomic checkpoints (``model.safetensors`` holds the GPT, so ``gptlab
sample`` and ``gptlab eval`` read a tuned run directly; heads go to ``heads.safetensors``) and exact resume:
weights, optimizer, RNG, the step and the stage's own state (e.g. the adaptive KL coefficient), with data that
is a pure function of the step.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from tqdm import tqdm

from .. import checkpoint as ckpt_io
from ..errors import GptlabError
from ..files import run_folder
from ..metrics import METRICS, Metrics, plot_losses
from ..train import distributed
from ..train.optim import lr_at, make_optimizer
from .config import AlignConfig
from .stages import STAGES


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
    with distributed.session(cfg.device) as d, run_folder(Path(cfg.out_dir)) if d.is_main else contextlib.nullcontext():
        return _train_stage(cfg, d, resume, progress)


def _train_stage(cfg: AlignConfig, d: distributed.Dist, resume: bool, progress: bool) -> dict[str, Any]:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    existing = ckpt_io.checkpoints_for(out, resume)
    torch.manual_seed(cfg.seed)
    stage = STAGES[cfg.stage](cfg, d)
    module = stage.module
    optimizer = make_optimizer(module, cfg, d.device.type)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    start = 0
    if resume:
        ck = existing[-1]
        state = ckpt_io.read_state(ck)
        weights = {f"gpt.{k}": v for k, v in ckpt_io.load_weights(ck, state).items()}
        optim_sd, rng = ckpt_io.load_training_state(ck, state)
        set_state_dict(
            module,
            optimizer,
            model_state_dict=retie(module, {**weights, **ckpt_io.load_extra(ck, state)}),
            optim_state_dict=optim_sd,
            options=StateDictOptions(full_state_dict=True),
        )
        torch.set_rng_state(rng["torch_rank0"])
        stage.load_state(state["align"])
        start = state["step"]
        if d.is_main:
            print(f"resuming from {ck} (step {start})", file=sys.stderr, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    metrics = Metrics(out / METRICS, start if resume else None, d.is_main)
    groups = [[p for p in g if p.requires_grad] for g in stage.clip_groups()]

    def update(loss: torch.Tensor) -> None:
        if not math.isfinite(loss.item()):
            raise GptlabError(
                f"the {cfg.stage} loss became {loss.item()} at step {step + 1}; lower --lr or raise "
                f"--warmup-iters, then --resume from the last checkpoint"
            )
        loss.backward()
        if d.enabled:
            for p in module.parameters():
                if p.grad is not None:
                    p.grad.copy_(distributed.mean_across_ranks(p.grad, d))
        if cfg.grad_clip:
            for g in groups:
                torch.nn.utils.clip_grad_norm_(g, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def save(done: int) -> None:
        _, optim_sd = get_state_dict(module, optimizer, options=opts)
        sd = {k: v.detach().cpu() for k, v in module.state_dict().items()}
        gpt = {k[4:]: v for k, v in sd.items() if k.startswith("gpt.")}
        extra = untie({k: v for k, v in sd.items() if not k.startswith("gpt.")})
        if d.is_main:
            ckpt_io.save_checkpoint(
                out,
                done,
                gpt,
                optim_sd,
                {
                    "model_config": stage.gpt.config.to_dict(),
                    "train_config": cfg.to_dict(),
                    "tokenizer": stage.tok.spec(),
                    "align": stage.state(),
                    "val_loss": None,
                    "best_val": None,
                    "best_step": None,
                    "rng": {"torch_rank0": torch.get_rng_state()},
                },
                cfg.keep_last,
                extra,
            )
        if d.enabled:
            tdist.barrier()

    bar = tqdm(
        total=cfg.max_iters,
        initial=start,
        desc=cfg.stage,
        disable=not (progress and d.is_main),
        dynamic_ncols=True,
        file=sys.stderr,
        mininterval=0.5 if sys.stderr.isatty() else 30.0,
    )
    t0 = time.perf_counter()
    last_eval: dict[str, float] = {}
    module.train()
    try:
        for step in range(start, cfg.max_iters):
            lr = lr_at(step, cfg)
            for g in optimizer.param_groups:
                g["lr"] = lr
            row = stage.step(step, update)
            if d.enabled:  # every rank's share of the global batch, averaged
                row = dict(zip(row, distributed.mean_across_ranks(torch.tensor(list(row.values())), d).tolist()))
            done = step + 1
            bar.update(1)
            is_ckpt = done == cfg.max_iters or (cfg.ckpt_interval and done % cfg.ckpt_interval == 0)
            if done % cfg.log_interval == 0 or is_ckpt:
                metrics.write(step=done, lr=lr, **row)
                bar.set_postfix({k: f"{v:.4g}" for k, v in list(row.items())[:3]})
            if done % cfg.eval_interval == 0 or done == cfg.max_iters:
                module.eval()
                last_eval = stage.evaluate()
                module.train()
                metrics.write(step=done, **{f"val_{k}": v for k, v in last_eval.items()})
                if d.is_main:
                    bar.write(
                        f"step {done}: " + "  ".join(f"{k} {v:.4g}" for k, v in last_eval.items()), file=sys.stderr
                    )
            if is_ckpt:
                save(done)
    finally:
        bar.close()  # before any error line, so that it never shares a line with the bar
    summary = {
        "stage": cfg.stage,
        "out_dir": str(out),
        "steps": cfg.max_iters,
        "resumed_from": start if resume else None,
        "train_seconds": round(time.perf_counter() - t0, 1),
        "eval": last_eval,
        "metrics": str(out / METRICS),
        "world_size": d.world_size,
    }
    if not d.is_main:
        return summary
    summary.update(stage.summary())
    rows = [r for r in metrics.rows() if "loss" in r or "val_loss" in r]
    if rows:
        plot_losses(rows, out / "loss.png", f"{cfg.stage}: {Path(cfg.model).name} on {Path(cfg.data).name}")
        summary["loss_plot"] = str(out / "loss.png")
    return summary
