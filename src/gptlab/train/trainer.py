"""Pre-training: next-token cross-entropy with teacher forcing (optionally scheduled sampling), as a job on the
shared loop (:mod:`gptlab.train.loop`).

:class:`Pretraining` is set up once (model, optimizer, resume), then :func:`~gptlab.train.loop.fit` drives its
steps, logs, evaluations and checkpoints, then it runs the final evaluation and writes the summary. One job serves
one CPU process, a torchrun DDP/FSDP job, CUDA, bf16 autocast and torch.compile. Per step: ``grad_accum``
micro-batches (gradients synchronised only on the last), clipping, one fused AdamW step. The hot loop does no host
syncs except at log, eval and checkpoint steps. Resuming restores weights, AdamW state, every rank's RNG state and
the step; the loader is a pure function of the step, so a resumed run repeats the uninterrupted run's losses bit for
bit on CPU.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint, hugepages, lora
from ..config import GPTConfig, preset
from ..data.images import ImageExamples, is_image_dataset
from ..data.loader import TokenWindows, read_meta, to_device
from ..errors import GptlabError
from ..files import check_run_folder, run_folder
from ..interop.peft import save_peft
from ..loader import load_model
from ..metrics import METRICS, Metrics, plot_losses
from ..model import GPT
from ..quant.quantize import records
from ..recipe import derive_seed
from . import distributed, memory_report, tensor_parallel
from .adapters import for_training
from .config import TrainConfig
from .dtype_probe import MARGIN, cpu_bf16_verdict
from .loop import FitStats, fit, restore_state, save_state, state_dicts
from .optim import clip_and_step, make_optimizer
from .scheduled_sampling import mix_in_predictions, ss_probability
from .sharded import ShardedSaver


def model_config_for(cfg: TrainConfig, data: dict[str, Any]) -> GPTConfig:
    """The model config of a run on the dataset whose ``meta.json`` is ``data``: the preset, then the dataset's
    fields (its vocabulary; for an image dataset its image size and channels, and a context that holds the image
    prefix and the longest text), then the shortcut fields ``block_size`` (if set) and ``dropout``, then
    ``model_overrides``. One rule: a field named in ``model_overrides`` (``--set``) wins over its shortcut."""
    base = preset(cfg.model)
    vocab_size = data["vocab_size"]
    shortcuts = {"dropout": cfg.dropout, **({"block_size": cfg.block_size} if cfg.block_size else {})}
    from_data: dict[str, Any] = {"vocab_size": vocab_size}
    images = is_image_dataset(data)
    if images:
        from_data |= {"image_size": data["image_size"], "image_channels": data["image_channels"]}
        patch = cfg.model_overrides.get("patch_size", base.patch_size)
        if isinstance(patch, int) and patch > 0:
            # the prefix and a whole text, final end-of-text included: generating an answer to its end fits
            from_data["block_size"] = (data["image_size"] // patch) ** 2 + data["text_tokens"]
    mcfg = base.replace(**{**from_data, **shortcuts, **cfg.model_overrides})
    if mcfg.vocab_size < vocab_size:
        raise GptlabError(
            f"vocab_size = {mcfg.vocab_size} is smaller than the dataset's tokenizer vocabulary "
            f"({vocab_size}); drop the override (the dataset's size is used) or raise it"
        )
    if images and (mcfg.image_size, mcfg.image_channels) != (data["image_size"], data["image_channels"]):
        raise GptlabError(
            f"the dataset's images are {data['image_size']}x{data['image_size']} with {data['image_channels']} "
            f"channel(s), the model's {mcfg.image_size}x{mcfg.image_size} with {mcfg.image_channels}; drop the "
            f"image_size / image_channels override"
        )
    if not images and mcfg.image_size:
        raise GptlabError(
            f"image_size = {mcfg.image_size} asks for an image model, but {cfg.data} is a text dataset; prepare an "
            f"image dataset (`gptlab prepare shapes`) or drop the override"
        )
    return mcfg


def open_split(cfg: TrainConfig, data: dict[str, Any], mcfg: GPTConfig, split: str) -> TokenWindows | ImageExamples:
    """The loader of one split: token windows, or (image, text) examples for an image dataset."""
    if is_image_dataset(data):
        return ImageExamples(cfg.data, split, mcfg.block_size, cfg.seed, mcfg.image_tokens)
    return TokenWindows(cfg.data, split, mcfg.block_size, cfg.seed)


def initial_model(source: str, device: str = "cpu") -> GPT:
    """``--init``'s model, float, with any adapters it carries merged (a LoRA run continues from its result)."""
    model = load_model(source, "cpu").model
    if getattr(model, "quantization", None):
        raise GptlabError(f"--init {source} is quantized; start from the float model (QLoRA: add --quantize)")
    return lora.merge(model).to(device)


def diverged(loss: float, vocab_size: int) -> bool:
    """True for a loss no healthy run reaches: not finite, or far above predicting uniformly (ln V nats), which is
    where an untrained model starts."""
    return not math.isfinite(loss) or loss > max(2 * math.log(vocab_size), math.log(vocab_size) + 5)


def last_good_checkpoint(out: Path, vocab_size: int) -> Path | None:
    """The newest checkpoint whose recorded validation loss is finite and not diverged."""
    for checkpoint_dir in reversed(checkpoint.list_checkpoints(out)):
        val = checkpoint.read_state(checkpoint_dir).get("val_loss")
        if isinstance(val, (int, float)) and not diverged(val, vocab_size):
            return checkpoint_dir
    return None


def autocast_dtype(pref: str, device: torch.device, probe: Callable[[], dict[str, Any]]) -> tuple[torch.dtype, str]:
    """The autocast dtype for ``--dtype pref`` on ``device``, and why. ``auto``: bf16 on a GPU that supports it;
    on a CPU, what ``probe`` measured (:mod:`gptlab.train.dtype_probe`); fp32 elsewhere."""
    if pref != "auto":
        return getattr(torch, pref), f"--dtype {pref}"
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return (torch.bfloat16, "auto: bf16 on this GPU") if ok else (torch.float32, "auto: this GPU has no bf16")
    if device.type != "cpu":
        return torch.float32, f"auto: fp32 on {device.type}"
    v = probe()
    how = "cached probe" if v["cached"] else "probe"
    return getattr(torch, v["dtype"]), (
        f"auto: bf16 autocast ran {v['speedup']}x fp32's speed at this run's shapes ({how}: {v['bf16_s']} s against "
        f"{v['fp32_s']} s per forward and backward); bf16 needs {MARGIN}x"
    )


def moe_stats(model: GPT) -> dict[str, Any]:
    """The last micro-batch's router statistics, per MoE layer: load-balancing loss, z-loss, the fraction of
    assignments each expert received, and the fraction dropped by the capacity limit."""
    stats = [m.stats for m in model.moe_layers()]
    return {f"moe_{k}": [s[k].tolist() for s in stats] for k in stats[0]}


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) a training run; returns the summary that ``gptlab train --json`` prints. The run folder
    is locked for the duration (a second run on it is refused) and is created only once the data and the model
    config have been checked."""
    return run(Pretraining, cfg, resume, progress)


def run(job_type: type[Pretraining], cfg: TrainConfig, resume: bool, progress: bool) -> dict[str, Any]:
    """Check, lock the folder, set up ``job_type`` (pre-training or a subclass: distillation) and drive it."""
    resume = resume or distributed.restarted(Path(cfg.out_dir))  # torchrun --max-restarts: continue by itself
    with distributed.session(cfg.device, cfg.collective_timeout, cfg.tp) as d:
        job_type.check(cfg)  # every check before the folder exists
        check_run_folder(Path(cfg.out_dir))  # on every rank: under torchrun all of them refuse together
        with run_folder(Path(cfg.out_dir)) if d.is_main else contextlib.nullcontext():
            job = job_type(cfg, d, resume)
            try:
                return job.finish(fit(job, cfg, job.start, job.name, progress, d.is_main))
            finally:
                job.release()


def _rate(tps: float | None) -> str:
    return "–" if tps is None else f"{tps:,.0f}"


class Pretraining:
    """Setup, one step, logging, evaluation and checkpoints of a pre-training run (see the module docstring).
    Subclasses (:class:`gptlab.distill.trainer.Distillation`) change the model config, the initial weights and the
    loss of a micro-batch; everything else is this job's."""

    name = "train"

    @classmethod
    def check(cls, cfg: TrainConfig) -> None:
        """What can be refused before the run folder exists."""
        data = read_meta(cfg.data)
        model_config_for(cfg, data)
        if is_image_dataset(data) and cfg.ss_schedule != "none":
            raise GptlabError("scheduled sampling is for text datasets; drop --ss-schedule for an image dataset")

    def model_config(self) -> GPTConfig:
        if self.init is not None:
            return self.init.config
        return model_config_for(self.cfg, self.data_meta)

    def init_weights(self, model: GPT) -> None:
        """Replace the seeded initial weights with ``--init``'s (before LoRA, wrapping and the optimizer)."""
        if self.init is not None:
            model.load_state_dict(self.init.state_dict())

    def loss(
        self, x: torch.Tensor, y: torch.Tensor, step: int, micro: int, images: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The training loss of micro-batch ``micro`` of step ``step`` (inside autocast); ``images`` for an image
        dataset."""
        return self.model(x, y, images=images)[1]

    def __init__(self, cfg: TrainConfig, d: distributed.Dist, resume: bool) -> None:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        hugepages.keep_freed_memory_in_heap(d.device.type)
        distributed.allow_tf32(d.device)
        self.cfg, self.d, self.resume = cfg, d, resume
        self.out = out = Path(cfg.out_dir)
        existing = checkpoint.checkpoints_for(out, resume)
        resumed = checkpoint.read_state(existing[-1]) if resume else None  # the state of the checkpoint resumed
        self.data_meta = read_meta(cfg.data)
        # --init's model (on a resume only its config counts: the weights come from the checkpoint)
        self.init = initial_model(cfg.init, "meta" if resume else "cpu") if cfg.init else None
        self.mcfg = mcfg = self.model_config()
        self.train_windows = open_split(cfg, self.data_meta, mcfg, "train")
        self.val_windows = open_split(cfg, self.data_meta, mcfg, "val")
        with torch.device("meta"):
            self.n_params = GPT(mcfg).num_params()
        self.dtype, self.dtype_reason = self._dtype(resumed)  # (a CPU probe builds its own copy: before this one)
        self.sharded = d.enabled and cfg.parallel in ("fsdp", "fsdp+tp")
        param_dtype = getattr(torch, cfg.fsdp_param_dtype)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank (FSDP does not broadcast them)
        if self.sharded and (resume or self.init is None) and not mcfg.image_size and not cfg.lora.lora_rank:
            # a new text model (or one a sharded checkpoint fills): each rank allocates only its shards
            self.raw = distributed.build_sharded(mcfg, d, cfg.parallel, param_dtype, fill=not resume)
            self.model: Any = self.raw
        else:  # the whole model first: --init's weights are loaded into it, LoRA attached; DDP replicates it
            self.raw = GPT(mcfg).to(d.device)
            if not resume:
                self.init_weights(self.raw)
            self.raw = for_training(self.raw, cfg.lora)
            self.model = distributed.wrap(self.raw, d, cfg.parallel, param_dtype)  # (FSDP shards `raw` in place)
        self.init = None  # its config and weights are in the model now
        self.saver = ShardedSaver(self.out, d, cfg.async_checkpoint) if self.sharded else None
        self.raw.activation_checkpointing = cfg.activation_checkpointing
        torch.manual_seed(cfg.seed + d.dp_rank)  # distinct dropout masks per data-parallel rank (one per TP group)
        self.optimizer = make_optimizer(self.raw, cfg.optim, d.device.type)
        self.start, self.best_val = 0, math.inf
        self.best_step: int | None = None
        if resumed is not None:
            self._resume(existing[-1], resumed)
        if cfg.compile:
            self.model = torch.compile(self.model)
        self.amp = torch.autocast(d.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)
        self.scaler = torch.amp.GradScaler(d.device.type, enabled=self.dtype == torch.float16)
        self.metrics = Metrics(out / METRICS, self.start if resume else None, d.is_main)
        self.tokens_per_step = cfg.batch_size * mcfg.block_size * cfg.grad_accum * d.dp_size
        self.ddp = isinstance(self.model, torch.nn.parallel.DistributedDataParallel)
        self.pending: list[torch.Tensor] = []  # per-micro-batch losses on the device since the last log
        self.last_loss, self.last_val = math.nan, math.nan
        self.last_tps: float | None = None  # tokens per second since the last log; None before any timed step
        self.tensor_memory: dict[str, float] = {}  # --track-memory's report (gptlab.train.memory_report)
        self.model.train()

    def _dtype(self, resumed: dict[str, Any] | None) -> tuple[torch.dtype, str]:
        """``--dtype``, resolved; a resumed ``auto`` run keeps the dtype its checkpoint recorded (bit-exact)."""
        cfg = self.cfg
        recorded = resumed.get("dtype") if resumed is not None else None
        if cfg.dtype == "auto" and recorded in ("float32", "bfloat16", "float16"):
            return getattr(torch, recorded), f"auto: {recorded}, as the run it resumes chose"
        probe = lambda: distributed.from_main(
            cpu_bf16_verdict(self.mcfg, cfg.batch_size) if self.d.is_main else None, self.d
        )
        return autocast_dtype(cfg.dtype, self.d.device, probe)

    def _resume(self, checkpoint_dir: Path, state: dict[str, Any]) -> None:
        out, mcfg = self.out, self.mcfg
        val = state.get("val_loss")
        if isinstance(val, (int, float)) and diverged(val, mcfg.vocab_size):
            good = last_good_checkpoint(out, mcfg.vocab_size)
            raise GptlabError(
                f"--resume: the latest checkpoint {checkpoint_dir} recorded a diverged val loss ({val:.4g}); move "
                f"it out of {out / 'checkpoints'} to resume from "
                + (f"the last good one, {good}" if good else "an earlier one (none is good: start a new run)")
            )
        if state["model_config"] != mcfg.to_dict():
            diff = {k: (v, mcfg.to_dict()[k]) for k, v in state["model_config"].items() if mcfg.to_dict()[k] != v}
            raise GptlabError(
                f"--resume: the checkpoint's model differs from this run's (checkpoint, now): {diff}; "
                f"resume with the original settings"
            )
        self.start = restore_state(
            checkpoint_dir,
            state,
            self.raw,
            self.optimizer,
            {} if state.get("sharded") else checkpoint.load_weights(checkpoint_dir, state),
            self.d,
            self.cfg.max_iters,
        )
        self.best_val, self.best_step = state.get("best_val") or math.inf, state.get("best_step")

    def train_step(self, step: int) -> None:
        # --track-memory: the second step of this process (its optimizer state exists), or the only one
        if self.cfg.track_memory and step == min(self.start + 1, self.cfg.max_iters - 1):
            with memory_report.tracker(self.model, self.optimizer) as t:
                self._step(step, t)
            self.tensor_memory = memory_report.report(t, self.d.device)
        else:
            self._step(step)

    def _step(self, step: int, tracker: Any = None) -> None:
        cfg, d = self.cfg, self.d
        p_ss = ss_probability(cfg.ss_schedule, step, cfg.max_iters, cfg.ss_max_prob, cfg.ss_k)
        ss_gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "scheduled-sampling", step)) if p_ss > 0 else None
        for micro in range(cfg.grad_accum):
            x, y, *images = to_device(
                self.train_windows.batch(cfg.batch_size, step, micro, d.dp_rank, d.dp_size), d.device
            )
            if ss_gen is not None:
                x = mix_in_predictions(self.raw, x, p_ss, ss_gen)
            if tracker is not None:
                tracker.reset_mod_stats()  # (its module statistics hold one forward pass; the peak is kept)
            sync = micro == cfg.grad_accum - 1
            with contextlib.nullcontext() if sync or not self.ddp else self.model.no_sync(), self.amp:
                loss = self.loss(x, y, step, micro, *images)
            self.scaler.scale(loss / cfg.grad_accum).backward()
            self.pending.append(loss.detach())
        if cfg.optim.grad_clip and d.tp == 1 and not self.scaler.is_enabled():
            clip_and_step(self.optimizer, list(self.raw.parameters()), cfg.optim.grad_clip)
        else:
            if cfg.optim.grad_clip:
                self.scaler.unscale_(self.optimizer)
                clip = tensor_parallel.clip_grad_norm if d.tp > 1 else torch.nn.utils.clip_grad_norm_
                clip(list(self.raw.parameters()), cfg.optim.grad_clip)
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def log(self, done: int, lr: float, seconds: float, steps: int) -> dict[str, str]:
        micro_losses = distributed.mean_across_ranks(torch.stack(self.pending).float(), self.d)
        losses = micro_losses.view(-1, self.cfg.grad_accum).mean(1).tolist()
        self.pending.clear()
        self.check_loss(losses, done)
        self.last_loss = losses[-1]
        if steps > 0 and seconds > 0:  # else keep the last real figure (or None): no rate from an untimed step
            self.last_tps = steps * self.tokens_per_step / seconds
        for i, loss_i in enumerate(losses):
            self.metrics.write(step=done - len(losses) + i + 1, loss=loss_i)
        if self.raw.moe_layers():
            self.metrics.write(step=done, **moe_stats(self.raw))
        return {"loss": f"{self.last_loss:.4f}", "tok_s": _rate(self.last_tps), "lr": f"{lr:.2e}"}

    @torch.no_grad()
    def mean_loss(self, batches) -> float:
        """Mean loss over ``batches`` (every rank's share), in eval mode."""
        d = self.d
        self.model.eval()
        total = torch.zeros(2, device=d.device)
        for batch in batches:
            x, y, *images = to_device(batch, d.device)
            with self.amp:
                _, loss = self.model(x, y, images=images[0] if images else None)
            n = (y >= 0).sum()  # target tokens (an image dataset pads its texts with -1)
            total += torch.stack([loss.float() * n, n.float()])
        self.model.train()
        total = distributed.mean_across_ranks(total, d)
        return (total[0] / total[1]).item()

    def evaluate(self, done: int) -> str:
        cfg, d = self.cfg, self.d
        self.last_val = self.mean_loss(
            self.val_windows.batch(cfg.batch_size, i, 0, d.dp_rank, d.dp_size) for i in range(cfg.eval_iters)
        )
        self.metrics.write(
            step=done, val_loss=self.last_val, tok_per_s=self.last_tps, lr=self.optimizer.param_groups[0]["lr"]
        )
        self.check_loss([self.last_val], done)  # the update may have broken the weights: never save those
        return f"step {done}: train {self.last_loss:.4f}  val {self.last_val:.4f}  {_rate(self.last_tps)} tok/s"

    def save(self, done: int) -> None:
        if self.last_val < self.best_val:
            self.best_val, self.best_step = self.last_val, done
        meta = {
            "model_config": self.mcfg.to_dict(),
            "train_config": self.cfg.to_dict(),
            "tokenizer": self.data_meta["tokenizer"],
            "val_loss": self.last_val,
            "best_val": self.best_val,
            "best_step": self.best_step,
            "tokens_seen": done * self.tokens_per_step,
            "dtype": str(self.dtype).replace("torch.", ""),
            **records(self.raw),
        }
        if self.saver is not None:  # every rank writes its own shards: nothing is gathered (gptlab.train.sharded)
            self.saver.save(done, self.raw, self.optimizer, meta, self.cfg.keep_last)
            return
        model_sd, optim_sd = state_dicts(self.raw, self.optimizer)
        save_state(self.out, done, self.d, model_sd, optim_sd, meta, self.cfg.keep_last)
        if done == self.cfg.max_iters and self.d.is_main and lora.adapters(self.raw):
            save_peft(self.raw, self.out / "adapter", self.cfg.init, replace=True)

    def check_loss(self, losses: list[float], step: int) -> None:
        out = self.out
        bad = [v for v in losses if diverged(v, self.mcfg.vocab_size)]
        if not bad:
            return
        good = last_good_checkpoint(out, self.mcfg.vocab_size)
        listed = checkpoint.list_checkpoints(out)
        latest = listed[-1] if listed else None
        kept = f"the last good checkpoint is {good}" if good else "no good checkpoint was written yet"
        if good and latest != good:
            kept += f" (move the later ones out of {out / 'checkpoints'} first, --resume takes the latest)"
        advice = (
            "Lower --lr, raise --warmup-iters or lower --grad-clip, then --resume"
            if good
            else "Lower --lr or raise --warmup-iters and start again"
        )
        raise GptlabError(f"the loss diverged to {bad[0]:.4g} at step {step}; training stopped and {kept}. {advice}")

    def release(self) -> None:
        """Drop the wrapped model while the process group is still registered. DDP's C++ reducer holds a reference
        to the gloo group; were it the last one, freeing the reducer (with the GIL held) would run the group's
        destructor, which joins gloo's worker threads, while a worker waits for the GIL to free a finished
        all-reduce's tensors: a deadlock at exit (seen under torchrun with torch 2.13, and pytorch/pytorch#56297
        describes the blocking destructor)."""
        self.model = self.raw

    def finish(self, stats: FitStats) -> dict[str, Any]:
        """The final evaluation (non-overlapping windows over the val split), the loss plot and the summary."""
        cfg, d, out = self.cfg, self.d, self.out
        if self.saver is not None:
            self.saver.finish()  # (an async write of the last checkpoint, committed)
        steady = stats.work_steps * self.tokens_per_step / max(stats.work_seconds, 1e-9) if stats.work_steps else None
        final_val = self.mean_loss(self.val_windows.sequential(cfg.batch_size * 4, cfg.final_eval_tokens))
        best = out / "checkpoints" / f"step-{self.best_step:07d}" if self.best_step is not None else None
        summary: dict[str, Any] = {
            "out_dir": str(out),
            "steps": cfg.max_iters,
            "resumed_from": self.start if self.resume else None,
            "tokens": cfg.max_iters * self.tokens_per_step,
            "params": self.n_params,
            "final_val_loss": round(final_val, 4),
            "best_val_loss": round(self.best_val, 4),
            "best_checkpoint": str(best) if best else None,
            "train_seconds": stats.seconds,
            "tokens_per_second": round(steady) if steady else None,
            "world_size": d.world_size,
            "peak_memory_mib": distributed.peak_memory_mib(d),  # per rank (CPU: peak RSS, runtime included)
            **({"tensor_memory_mib": distributed.gathered(self.tensor_memory, d)} if cfg.track_memory else {}),
            "device": str(d.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "dtype_reason": self.dtype_reason,
        }
        if d.is_main:
            self.metrics.write(step=cfg.max_iters, final_val_loss=final_val)
            plot_losses(self.metrics.rows(), out / "loss.png", f"{cfg.model} on {Path(cfg.data).name}")
            summary["loss_plot"] = str(out / "loss.png")
            summary["metrics"] = str(out / METRICS)
        return summary
