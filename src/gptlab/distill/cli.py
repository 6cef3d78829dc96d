"""``gptlab distill``: train a student to match a teacher, on the training loop of ``gptlab train``."""

from __future__ import annotations

import argparse

from ..options import emit, reports
from ..train.cli import add_run_flags, config_from_args
from .config import DistillConfig


def cmd_distill(args: argparse.Namespace) -> None:
    from .trainer import distill  # here, not at the top: torch.distributed and the loop load slowly

    s = distill(config_from_args(args, DistillConfig), resume=args.resume, progress=not args.json)
    if not reports():
        return
    emit(
        args,
        s,
        f"student val loss {s['final_val_loss']:.4f} (teacher {s['teacher_val_loss']:.4f}) after {s['steps']} "
        f"steps, {s['tokens']:,} tokens, {s['tokens_per_second'] or 0:,} tok/s, {s['train_seconds']}s\n"
        f"checkpoints: {s['out_dir']}/checkpoints  loss curve: {s['loss_plot']}",
    )


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "distill",
        help="distill a teacher into a smaller student (same loop, checkpoints and resume as train)",
        description="Train a student (a preset with --model/--set, or --init MODEL) on --data to match --teacher's "
        "next-token distributions (forward KL, reverse KL or generalized JSD, mixed with the next-token loss). "
        "Every `gptlab train` flag applies; a recipe is a train recipe with the distillation keys added.",
    )
    add_run_flags(p, DistillConfig, "student model")
    p.set_defaults(func=cmd_distill)
