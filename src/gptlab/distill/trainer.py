"""Knowledge distillation as a job on the one training loop: :class:`Distillation` is :class:`Pretraining` with a
teacher, a student config or initial weights of its own, and another loss per micro-batch. Checkpoints, resume
(bit-exact: the teacher is deterministic and the loader a pure function of the step), metrics, evaluation (the
student's validation cross-entropy, comparable with any ``gptlab train`` run), progress and torchrun are the
pre-training job's.

Per micro-batch, with the student's logits s and the teacher's t on the same tokens::

    loss = kd_weight * T^2 * D(t, s; T) + (1 - kd_weight) * CE(s, next tokens) + hidden_weight * (1 - cos)

with D one of :mod:`gptlab.distill.losses` (forward KL by default, as Hinton et al. 2015 and DistilGPT2). The teacher
runs in eval mode under ``no_grad``, in fp32 or bf16; with ``teacher_top_k`` only its k largest logits per token are
kept, and with ``teacher_cache`` they are written to disk once per batch and read back by every later student that
draws the same batches. With ``on_policy = f`` a fraction f of the steps (chosen by a seeded draw per step) trains on
the student's own continuations of the first half of each window, scored by the teacher (GKD, Agarwal et al. 2024);
those steps have no next-token loss (there is no ground truth to predict).

The hidden-state loss (DistilBERT, Sanh et al. 2019) needs equal widths. Student block i of L_s (1-based) is
matched with teacher block round(i * L_t / L_s): the last with the last, and for a student of half the depth every
second teacher block, DistilBERT's choice.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from ..config import GPTConfig
from ..data.images import is_image_dataset
from ..data.loader import read_meta
from ..errors import GptlabError
from ..files import atomic_write_bytes, atomic_write_text
from ..generate.engine import Engine, Sampling
from ..loader import Loaded, load_model
from ..model import GPT
from ..recipe import derive_seed
from ..tokenizer import same_tokenizer
from ..train import distributed
from ..train.loop import FitStats
from ..train.trainer import Pretraining, model_config_for, run
from . import losses
from .config import DistillConfig


def distill(cfg: DistillConfig, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) a distillation; returns the summary ``gptlab distill --json`` prints."""
    return run(Distillation, cfg, resume, progress)


def matched_layers(n_student: int, n_teacher: int) -> list[int]:
    """The teacher block (0-based) matched with each student block: round(i * L_t / L_s) for i = 1..L_s, less 1."""
    return [max(0, round((i + 1) * n_teacher / n_student) - 1) for i in range(n_student)]


@contextlib.contextmanager
def block_outputs(model: GPT, indices: list[int]) -> Iterator[list[torch.Tensor]]:
    """The outputs of blocks ``indices`` of ``model`` during the forward passes inside, in that order."""
    captured: dict[int, torch.Tensor] = {}
    hooks = [
        model.h[i].register_forward_hook(lambda _m, _in, out, i=i: captured.__setitem__(i, out))
        for i in sorted(set(indices))
    ]
    outputs: list[torch.Tensor] = []
    try:
        yield outputs
    finally:
        for h in hooks:
            h.remove()
    outputs.extend(captured[i] for i in indices)


class TeacherCache:
    """The teacher's top-k logits per batch on disk: one safetensors file per (step, micro-batch, rank), written
    atomically, under a manifest of everything that decides the batches. A student whose batches differ (another
    seed, batch size, context or dataset) is refused instead of being fed another batch's targets."""

    def __init__(self, folder: Path, manifest: dict[str, Any]) -> None:
        self.folder = folder
        path = folder / "manifest.json"
        if path.is_file():
            old = json.loads(path.read_text(encoding="utf-8"))
            diff = ", ".join(f"{k}={old.get(k)!r}" for k in sorted(manifest) if old.get(k) != manifest[k])
            if diff:
                raise GptlabError(
                    f"teacher_cache {folder} was written for other batches ({diff}); use another folder or the same "
                    f"settings"
                )
        elif folder.exists() and any(folder.iterdir()):
            raise GptlabError(f"teacher_cache {folder} exists and is not a teacher cache (no manifest.json)")
        else:
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(manifest, indent=1))
        self.hits = self.misses = 0

    def path(self, step: int, micro: int, rank: int) -> Path:
        return self.folder / f"step{step:07d}_m{micro:03d}_r{rank:03d}.safetensors"

    def get(self, step: int, micro: int, rank: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        path = self.path(step, micro, rank)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            t = load_tensors(path.read_bytes())
        except Exception:  # a torn file from another run's crash cannot exist (atomic), but a bad disk can
            raise GptlabError(f"{path} cannot be read; delete it and it will be recomputed") from None
        self.hits += 1
        return t["values"], t["indices"]

    def put(self, step: int, micro: int, rank: int, values: torch.Tensor, indices: torch.Tensor) -> None:
        data = save_tensors({"values": values.float().cpu().contiguous(), "indices": indices.int().cpu().contiguous()})
        atomic_write_bytes(self.path(step, micro, rank), data)


class Distillation(Pretraining):
    name = "distill"
    cfg: DistillConfig

    @classmethod
    def check(cls, cfg: DistillConfig) -> None:  # type: ignore[override]
        data = read_meta(cfg.data)
        if is_image_dataset(data):
            raise GptlabError(f"{cfg.data} is an image dataset; gptlab distills text models only")
        teacher = load_model(cfg.teacher, "cpu")
        cls.check_pair(cfg, data, teacher, cls.student_config(cfg, data))

    @staticmethod
    def student_config(cfg: DistillConfig, data: dict[str, Any]) -> GPTConfig:
        if cfg.init:
            return load_model(cfg.init, "cpu").config
        return model_config_for(cfg, data)

    @staticmethod
    def check_pair(cfg: DistillConfig, data: dict[str, Any], teacher: Loaded, student: GPTConfig) -> None:
        if not same_tokenizer(teacher.meta["tokenizer"], data["tokenizer"]):
            raise GptlabError(
                f"the teacher {cfg.teacher} and the dataset {cfg.data} use different tokenizers; distillation "
                f"compares distributions token by token, so prepare the data with the teacher's tokenizer"
            )
        if teacher.config.vocab_size != student.vocab_size:
            raise GptlabError(
                f"the teacher has a vocabulary of {teacher.config.vocab_size}, the student {student.vocab_size}; "
                f"they must be equal (drop the student's vocab_size override)"
            )
        if student.block_size > teacher.config.block_size:
            raise GptlabError(
                f"the student's context ({student.block_size}) exceeds the teacher's ({teacher.config.block_size}); "
                f"lower --block-size"
            )
        if cfg.hidden_weight and student.n_embd != teacher.config.n_embd:
            raise GptlabError(
                f"hidden_weight needs equal widths; the student has n_embd = {student.n_embd}, the teacher "
                f"{teacher.config.n_embd}: set hidden_weight = 0 or --set n_embd={teacher.config.n_embd}"
            )

    def __init__(self, cfg: DistillConfig, d: distributed.Dist, resume: bool) -> None:
        loaded = load_model(cfg.teacher, d.device)
        self.teacher = loaded.model.to(getattr(torch, cfg.teacher_dtype)).eval().requires_grad_(False)
        self.teacher_source = loaded.source
        super().__init__(cfg, d, resume)
        self.check_pair(cfg, self.data_meta, loaded, self.mcfg)
        self.layer_map = matched_layers(self.mcfg.n_layer, self.teacher.config.n_layer)
        self.cache = (
            TeacherCache(
                Path(cfg.teacher_cache),
                {
                    "teacher": str(Path(cfg.teacher).resolve()) if Path(cfg.teacher).exists() else cfg.teacher,
                    "data": str(Path(cfg.data).resolve()),
                    "top_k": cfg.teacher_top_k,
                    "teacher_dtype": cfg.teacher_dtype,
                    "seed": cfg.seed,
                    "batch_size": cfg.batch_size,
                    "block_size": self.mcfg.block_size,
                    "grad_accum": cfg.grad_accum,
                    "world_size": d.world_size,
                },
            )
            if cfg.teacher_cache
            else None
        )
        self.parts: list[torch.Tensor] = []  # per micro-batch [kd, ce, hidden] since the last log, on the device

    def on_policy_step(self, step: int) -> bool:
        if not self.cfg.on_policy:
            return False
        return bool(np.random.default_rng([self.cfg.seed, 7, step]).random() < self.cfg.on_policy)

    @torch.no_grad()
    def student_samples(self, x: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's continuations of the first half of each window (sampled at ``on_policy_temperature``,
        seeded by the step and the rank), and the mask of the positions whose next token it sampled."""
        B, T = x.shape
        half = T // 2
        seed = derive_seed(self.cfg.seed, "on-policy", step) % 2**62 + self.d.rank * B  # rows: seed + global row
        sampling = Sampling(temperature=self.cfg.on_policy_temperature, seed=seed)
        out = Engine(self.raw).generate_tokens(x[:, :half].tolist(), T - half, sampling)
        self.raw.train()  # the engine put it in eval mode
        rows = [p + c.tokens for p, c in zip(x[:, :half].tolist(), out)]
        seq = torch.tensor([r + [0] * (T - len(r)) for r in rows], device=x.device)
        mask = torch.zeros(B, T, dtype=torch.bool, device=x.device)
        mask[:, half - 1 :] = True
        return seq, mask

    @torch.no_grad()
    def teacher_targets(self, x: torch.Tensor, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The teacher's logits [B, T, V], or with ``teacher_top_k`` its top-k (values, indices) [B, T, k]."""
        k = self.cfg.teacher_top_k
        if self.cache is not None:
            hit = self.cache.get(step, micro, self.d.rank)
            if hit is not None:
                return hit[0].to(x.device), hit[1].to(x.device)
        with torch.autocast(x.device.type, enabled=False):
            logits = self.teacher(x)[0]
        if not k:
            return logits, None
        values, indices = logits.float().topk(k, dim=-1)
        if self.cache is not None:
            self.cache.put(step, micro, self.d.rank, values, indices)
        return values, indices

    def loss(
        self, x: torch.Tensor, y: torch.Tensor, step: int, micro: int, images: torch.Tensor | None = None
    ) -> torch.Tensor:  # `images` is always None: check() refuses image datasets
        cfg, raw = self.cfg, self.raw
        mask = None
        on_policy = self.on_policy_step(step)
        if on_policy:
            x, mask = self.student_samples(x, step)
        want_hidden = cfg.hidden_weight > 0
        student_layers = list(range(self.mcfg.n_layer)) if want_hidden else []
        with block_outputs(raw, student_layers) as s_hidden:
            logits, _ = self.model(x)  # through the (possibly wrapped) model's forward
        with block_outputs(self.teacher, self.layer_map if want_hidden else []) as t_hidden:
            t_out, t_idx = self.teacher_targets(x, step, micro)
        T = cfg.temperature
        if t_idx is None:
            per_token = losses.per_token(cfg.kd_loss, logits, t_out, T, cfg.jsd_beta)
        else:
            per_token = losses.sparse_forward_kl(logits, t_out, t_idx, T)
        kd = losses.masked_mean(per_token, mask) * T * T
        zero = kd.new_zeros(())
        ce = zero if on_policy else F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-1)
        hidden = (
            torch.stack([losses.hidden_cosine(s, t, mask) for s, t in zip(s_hidden, t_hidden)]).mean()
            if want_hidden
            else zero
        )
        total = (kd if on_policy else cfg.kd_weight * kd + (1 - cfg.kd_weight) * ce) + cfg.hidden_weight * hidden
        moe = raw.moe_layers()
        if moe:  # the routers' auxiliary losses, as in pre-training
            total = total + sum(m.aux_loss for m in moe if m.aux_loss is not None) / len(moe)
        self.parts.append(torch.stack([kd, ce, hidden]).detach())
        return total

    def log(self, done: int, lr: float, seconds: float, steps: int) -> dict[str, str]:
        postfix = super().log(done, lr, seconds, steps)
        kd, ce, hidden = distributed.mean_across_ranks(torch.stack(self.parts).float().mean(0), self.d).tolist()
        self.parts.clear()
        row: dict[str, float] = {"kd_loss": kd, "ce_loss": ce}
        if self.cfg.hidden_weight:
            row["hidden_loss"] = hidden
        self.metrics.write(step=done, **row)
        return {**postfix, "kd": f"{kd:.4f}"}

    def finish(self, stats: FitStats) -> dict[str, Any]:
        summary = super().finish(stats)
        cfg = self.cfg
        teacher_val = self.teacher_mean_loss()
        summary.update(
            teacher=self.teacher_source,
            teacher_val_loss=round(teacher_val, 4),
            kd_loss=cfg.kd_loss,
            temperature=cfg.temperature,
            kd_weight=cfg.kd_weight,
        )
        if self.cache is not None:
            summary["teacher_cache"] = {"hits": self.cache.hits, "misses": self.cache.misses}
        return summary

    @torch.no_grad()
    def teacher_mean_loss(self) -> float:
        """The teacher's cross-entropy on the windows of the student's final evaluation (the gap the student closes)."""
        cfg, d = self.cfg, self.d
        total = torch.zeros(2, device=d.device)
        for x, y in self.val_windows.sequential(cfg.batch_size * 4, cfg.final_eval_tokens):
            x, y = x.to(d.device), y.to(d.device)
            _, loss = self.teacher(x, y)
            total += torch.stack([loss.float() * y.numel(), torch.tensor(float(y.numel()), device=d.device)])
        total = distributed.mean_across_ranks(total, d)
        return (total[0] / total[1]).item()
