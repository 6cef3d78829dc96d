"""``gptlab distill``'s config: every ``gptlab train`` field (the student's preset, ``--set``, data, schedule,
checkpoints, torchrun...) plus the teacher and the loss. A recipe is a ``gptlab train`` recipe with these keys
added."""

from __future__ import annotations

from dataclasses import dataclass

from ..recipe import NON_NEGATIVE, UNIT, Range, opt
from ..train.config import TrainConfig
from .losses import KINDS


@dataclass
class DistillConfig(TrainConfig):
    help_hint = "`gptlab distill --help`"
    what = "distillation config"
    out_dir: str = opt("runs/distill", "run folder: checkpoints/, metrics.jsonl, loss.png")
    teacher: str = opt("", "the teacher: any model source (gptlab run or checkpoint, Hugging Face folder or name)")
    kd_loss: str = opt(
        "forward_kl",
        "forward_kl (Hinton) | reverse_kl (MiniLLM) | jsd (GKD's generalized JSD, --jsd-beta)",
        choices=KINDS,
    )
    kd_weight: float = opt(0.5, "weight of the distillation loss; the next-token loss gets 1 - kd_weight", UNIT)
    temperature: float = opt(
        2.0, "softmax temperature of both distributions (the loss is scaled by T^2)", Range(0.05, 100)
    )
    jsd_beta: float = opt(0.5, "jsd: 0 = forward KL, 1 = reverse KL, between: the generalized JSD", UNIT)
    hidden_weight: float = opt(
        0.0, "weight of the hidden-state cosine loss (needs equal widths; layers mapped uniformly)", NON_NEGATIVE
    )
    teacher_dtype: str = opt(
        "float32", "the teacher's weights and forward pass: float32 | bfloat16", choices=("float32", "bfloat16")
    )
    teacher_top_k: int = opt(
        0, "keep only the teacher's top-k logits per token (0 = all; needs forward_kl)", NON_NEGATIVE
    )
    teacher_cache: str = opt(
        "", "a folder caching the teacher's top-k logits per batch, reused by later students (needs teacher_top_k)"
    )
    on_policy: float = opt(
        0.0, "fraction of steps trained on the student's own samples, scored by the teacher (GKD)", UNIT
    )
    on_policy_temperature: float = opt(1.0, "sampling temperature of the on-policy continuations", Range(0, 100))

    def checks(self) -> list[tuple[bool, str]]:
        return [
            *super().checks(),
            (bool(self.teacher), "teacher is required: --teacher MODEL"),
            (
                not self.teacher_top_k or self.kd_loss == "forward_kl",
                "teacher_top_k needs kd_loss = forward_kl (reverse KL and JSD need the teacher's whole distribution)",
            ),
            (not self.teacher_cache or self.teacher_top_k > 0, "teacher_cache needs teacher_top_k > 0 (e.g. 64)"),
            (not (self.teacher_cache and self.on_policy), "teacher_cache cannot score on-policy samples; drop one"),
            (
                not (self.teacher_cache and self.hidden_weight),
                "hidden_weight needs the teacher's forward pass, which teacher_cache skips; drop one",
            ),
        ]
