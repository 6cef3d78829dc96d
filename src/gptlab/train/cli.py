"""``gptlab train``: pre-train from a TOML recipe and/or flags (flags override the recipe)."""

from __future__ import annotations

import argparse
from typing import Any

from ..options import add_config_flags, add_json, config_flag_values, emit, parse_set, reports
from ..recipe import RecipeConfig
from .config import TrainConfig


def config_from_args(args: argparse.Namespace, cls: type[RecipeConfig]) -> Any:
    """The run config of ``gptlab train`` or a verb built on it (``distill``): defaults <- recipe <- flags."""
    overrides: dict[str, Any] = config_flag_values(args, cls, ("model_overrides",))
    if args.set:
        overrides["model_overrides"] = parse_set(args.set)
    return cls.from_sources(args.recipe, **overrides)


def add_run_flags(p: argparse.ArgumentParser, cls: type[RecipeConfig], what: str) -> None:
    """``--recipe``, ``--set``, ``--resume``, every field of ``cls`` as a flag, and ``--json``."""
    p.add_argument(
        "--recipe", help="TOML recipe (top-level keys = the flags below, [model_overrides] = model config fields)"
    )
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help=f"{what} config override, e.g. n_layer=6")
    p.add_argument("--resume", action="store_true", help="continue the run in --out-dir from its last checkpoint")
    add_config_flags(p, cls, ("model_overrides",))
    add_json(p)


def cmd_train(args: argparse.Namespace) -> None:
    from .trainer import train  # here, not at the top: torch.distributed and the loop load slowly

    s = train(config_from_args(args, TrainConfig), resume=args.resume, progress=not args.json)
    if not reports():
        return
    emit(
        args,
        s,
        f"final val loss {s['final_val_loss']:.4f} (best periodic {s['best_val_loss']:.4f}) after "
        f"{s['steps']} steps, {s['tokens']:,} tokens, {s['tokens_per_second'] or 0:,} tok/s, "
        f"{s['train_seconds']}s\nprecision: {s['dtype']} ({s['dtype_reason']})\n"
        f"checkpoints: {s['out_dir']}/checkpoints  loss curve: {s['loss_plot']}",
    )


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="pre-train a model (torchrun for several processes)",
        description="Train from a TOML recipe and/or flags. Flags override the recipe; --set "
        "overrides model config fields and wins over --block-size and --dropout.",
    )
    add_run_flags(p, TrainConfig, "model")
    p.set_defaults(func=cmd_train)
