"""``gptlab align STAGE MODEL``: finetune (GPT-1 heads), sft, reward, dpo, ppo, grpo on one shared loop."""

from __future__ import annotations

import argparse

from ..options import add_config_flags, add_json, add_model, config_flag_values, emit, reports
from .config import STAGES, AlignConfig

STAGE_HELP = {
    "finetune": "GPT-1 task fine-tuning: special tokens, a linear head, + lambda x LM loss",
    "sft": "supervised fine-tuning, loss on responses only, optional packing",
    "reward": "reward model: scalar head, Bradley-Terry loss over ranked pairs",
    "dpo": "direct preference optimisation against a frozen reference",
    "ppo": "PPO with a KL penalty to the reference (InstructGPT), adaptive KL, PPO-ptx",
    "grpo": "RL with verifiable rewards: GRPO, Dr. GRPO, DAPO, RLOO over groups of sampled completions",
}


def cmd_align(args: argparse.Namespace) -> None:
    from .trainer import train_stage  # here, not at the top: the stages load torch.distributed and the loop

    values = config_flag_values(args, AlignConfig, ("stage",))
    cfg = AlignConfig.from_sources(args.recipe, **values, stage=args.stage)
    s = train_stage(cfg, resume=args.resume, progress=not args.json)
    if not reports():
        return
    metrics = "  ".join(f"{k} {v:.4g}" for k, v in s["eval"].items())
    emit(
        args,
        s,
        f"{s['stage']}: {s['steps']} steps in {s['train_seconds']}s; held-out: {metrics or 'none'}\n"
        f"checkpoints: {s['out_dir']}/checkpoints  metrics: {s['metrics']}",
    )


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "align",
        help="fine-tune and align: finetune (GPT-1 heads), sft, reward, dpo, ppo, grpo (LoRA, QLoRA)",
        description="Tune a model on JSON-lines data with one shared loop (checkpoints, exact resume, "
        "metrics). Formats and recipes: docs/alignment.md.",
    )
    stages = p.add_subparsers(dest="stage", required=True)
    for stage in STAGES:
        q = stages.add_parser(stage, help=STAGE_HELP[stage])
        add_model(
            q,
            f"align {stage}",
            required=False,
            old=("--init",),
            help="the model to tune: a gptlab run or checkpoint, or a Hugging Face folder (or the recipe's `model`)",
        )
        q.add_argument("--recipe", help="TOML file of these options (flags override it)")
        q.add_argument("--resume", action="store_true", help="continue the run in --out-dir from its last checkpoint")
        add_config_flags(q, AlignConfig, ("stage", "model"))
        add_json(q)
        q.set_defaults(func=cmd_align)
