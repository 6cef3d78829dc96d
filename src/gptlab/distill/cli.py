"""``gptlab distill``: train a student to match a teacher, on the training loop of ``gptlab train``."""

from __future__ import annotations

import argparse
from typing import Any

from ..options import add_config_flags, add_json, config_flag_values, emit, parse_set
from .config import DistillConfig


def cmd_distill(args: argparse.Namespace) -> None:
    from .trainer import distill  # here, not at the top: torch.distributed and the loop load slowly

    overrides: dict[str, Any] = config_flag_values(args, DistillConfig, ("model_overrides",))
    if args.set:
        overrides["model_overrides"] = parse_set(args.set)
    cfg = DistillConfig.from_sources(args.recipe, **overrides)
    s = distill(cfg, resume=args.resume, progress=not args.json)
    if "loss_plot" not in s:  # under torchrun only rank 0 reports
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
    p.add_argument("--recipe", help="TOML recipe (top-level keys = the flags below)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="student model config override, e.g. n_layer=2")
    p.add_argument("--resume", action="store_true", help="continue the run in --out-dir from its last checkpoint")
    add_config_flags(p, DistillConfig, ("model_overrides",))
    add_json(p)
    p.set_defaults(func=cmd_distill)
