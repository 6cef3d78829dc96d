"""The pre-training loop: next-token cross-entropy with teacher forcing (optionally scheduled sampling).

One loop serves one CPU process, a torchrun DDP/FSDP job, CUDA, bf16 autocast and torch.compile. Per step:
``grad_accum`` micro-batches (gradients synchronised only on the last), clipping, one fused AdamW step. The hot loop
does no host syncs except at log, eval and checkpoint steps. Resuming restores weights, AdamW state, every rank's
RNG state and the step; the loader is a pure function of the step, so a resumed run repeats the uninterrupted run's
losses bit for bit on CPU.
"""

from __future__ import annotations

import contextlib
import ctypes
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
from ..config import GPTConfig, preset
from ..data.loader import TokenWindows, read_meta
from ..errors import GptlabError
from ..files import run_folder
from ..metrics import METRICS, Metrics, plot_losses
from ..model import GPT
from . import distributed
from .config import TrainConfig
from .optim import lr_at, make_optimizer
from .scheduled_sampling import mix_in_predictions, ss_probability


def model_config_for(cfg: TrainConfig, vocab_size: int) -> GPTConfig:
    """The model config of a run: the preset, then the shortcut fields ``block_size`` (if set) and ``dropout``, then
    ``model_overrides``. One rule: a field named in ``model_overrides`` (``--set``) wins over its shortcut."""
    base = preset(cfg.model)
    shortcuts = {"dropout": cfg.dropout, **({"block_size": cfg.block_size} if cfg.block_size else {})}
    overrides = {"vocab_size": vocab_size, **shortcuts, **cfg.model_overrides}
    mcfg = base.replace(**overrides)
    if mcfg.vocab_size < vocab_size:
        raise GptlabError(
            f"vocab_size = {mcfg.vocab_size} is smaller than the dataset's tokenizer vocabulary "
            f"({vocab_size}); drop the override (the dataset's size is used) or raise it"
        )
    return mcfg


def diverged(loss: float, vocab_size: int) -> bool:
    """True for a loss no healthy run reaches: not finite, or far above predicting uniformly (ln V nats), which is
    where an untrained model starts."""
    return not math.isfinite(loss) or loss > max(2 * math.log(vocab_size), math.log(vocab_size) + 5)


def last_good_checkpoint(out: Path, vocab_size: int) -> Path | None:
    """The newest checkpoint whose recorded validation loss is finite and not diverged."""
    for ck in reversed(ckpt_io.list_checkpoints(out)):
        val = ckpt_io.read_state(ck).get("val_loss")
        if isinstance(val, (int, float)) and not diverged(val, vocab_size):
            return ck
    return None


def autocast_dtype(pref: str, device: torch.device) -> torch.dtype:
    if pref == "auto":
        bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16_ok else torch.float32
    return getattr(torch, pref)


def moe_stats(model: GPT) -> dict[str, Any]:
    """The last micro-batch's router statistics, per MoE layer: load-balancing loss, z-loss, the fraction of
    assignments each expert received, and the fraction dropped by the capacity limit."""
    stats = [m.stats for m in model.moe_layers()]
    return {f"moe_{k}": [s[k].tolist() for s in stats] for k in stats[0]}


def keep_freed_memory_in_heap() -> None:
    """On glibc, tensors over 32 MB (GPT-2's 200 MB logits, its embedding gradient) are mmapped and handed back to
    the OS when freed, so every CPU training step page-faults them in again. Serving them from the heap and not
    trimming it removes that cost (GPT-2 124M on 2 cores: 8.8 -> 7.4 s per step). CUDA memory is unaffected."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to do
        return
    libc.mallopt(-4, 0)  # M_MMAP_MAX = 0
    libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD = 2 GiB


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) a training run; returns the summary that ``gptlab train --json`` prints. The run folder
    is locked for the duration (a second run on it is refused) and is created only once the data and the model
    config have been checked."""
    with distributed.session(cfg.device) as d:
        model_config_for(cfg, read_meta(cfg.data)["vocab_size"])  # every check before the folder exists
        with run_folder(Path(cfg.out_dir)) if d.is_main else contextlib.nullcontext():
            return _train(cfg, d, resume, progress)


def _train(cfg: TrainConfig, d: distributed.Dist, resume: bool, progress: bool) -> dict[str, Any]:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if d.device.type == "cpu":
        keep_freed_memory_in_heap()
    out = Path(cfg.out_dir)
    existing = ckpt_io.checkpoints_for(out, resume)
    meta = read_meta(cfg.data)
    mcfg = model_config_for(cfg, meta["vocab_size"])
    train_windows = TokenWindows(cfg.data, "train", mcfg.block_size, cfg.seed)
    val_windows = TokenWindows(cfg.data, "val", mcfg.block_size, cfg.seed)

    with torch.device("meta"):
        n_params = GPT(mcfg).num_params()
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank (FSDP does not broadcast them)
    raw = GPT(mcfg).to(d.device)
    torch.manual_seed(cfg.seed + d.rank)  # distinct dropout masks per rank
    model = distributed.wrap(raw, d, cfg.parallel)  # FSDP shards `raw` in place
    optimizer = make_optimizer(raw, cfg, d.device.type)
    sd_opts = StateDictOptions(full_state_dict=True, cpu_offload=True)

    start, best_val, best_step = 0, math.inf, None
    if resume:
        ck = existing[-1]
        state = ckpt_io.read_state(ck)
        val = state.get("val_loss")
        if isinstance(val, (int, float)) and diverged(val, mcfg.vocab_size):
            good = last_good_checkpoint(out, mcfg.vocab_size)
            raise GptlabError(
                f"--resume: the latest checkpoint {ck} recorded a diverged val loss ({val:.4g}); move "
                f"it out of {out / 'checkpoints'} to resume from "
                + (f"the last good one, {good}" if good else "an earlier one (none is good: start a new run)")
            )
        if state["model_config"] != mcfg.to_dict():
            diff = {k: (v, mcfg.to_dict()[k]) for k, v in state["model_config"].items() if mcfg.to_dict()[k] != v}
            raise GptlabError(
                f"--resume: the checkpoint's model differs from this run's (checkpoint, now): {diff}; "
                f"resume with the original settings"
            )
        optim_sd, rng = ckpt_io.load_training_state(ck, state)
        set_state_dict(
            raw,
            optimizer,
            model_state_dict=ckpt_io.load_weights(ck, state),
            optim_state_dict=optim_sd,
            options=StateDictOptions(full_state_dict=True),
        )
        saved_ranks = sum(k.startswith("torch_rank") for k in rng)
        if saved_ranks != d.world_size:  # the same answer on every rank, so all of them stop
            raise GptlabError(
                f"--resume: the checkpoint was written by {saved_ranks} process(es), not "
                f"{d.world_size}; resume with the same number of processes"
            )
        torch.set_rng_state(rng[f"torch_rank{d.rank}"])
        if d.device.type == "cuda" and f"cuda_rank{d.rank}" in rng:
            torch.cuda.set_rng_state(rng[f"cuda_rank{d.rank}"])
        start, best_val, best_step = state["step"], state.get("best_val") or math.inf, state.get("best_step")
        if d.is_main:
            print(f"resuming from {ck} (step {start})", file=sys.stderr, flush=True)
    if cfg.compile:
        model = torch.compile(model)

    dtype = autocast_dtype(cfg.dtype, d.device)
    amp = torch.autocast(d.device.type, dtype=dtype, enabled=dtype != torch.float32)
    scaler = torch.amp.GradScaler(d.device.type, enabled=dtype == torch.float16)
    out.mkdir(parents=True, exist_ok=True)
    metrics = Metrics(out / METRICS, start if resume else None, d.is_main)
    tokens_per_step = cfg.batch_size * mcfg.block_size * cfg.grad_accum * d.world_size
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)

    @torch.no_grad()
    def evaluate(batches) -> float:
        model.eval()
        total = torch.zeros(2, device=d.device)
        for x, y in batches:
            with amp:
                _, loss = model(x.to(d.device), y.to(d.device))
            total += torch.stack([loss.float() * y.numel(), torch.tensor(float(y.numel()), device=d.device)])
        model.train()
        total = distributed.mean_across_ranks(total, d)
        return (total[0] / total[1]).item()

    def periodic_eval() -> float:
        return evaluate(val_windows.batch(cfg.batch_size, i, 0, d.rank, d.world_size) for i in range(cfg.eval_iters))

    def save(step: int, val: float) -> Path:
        nonlocal best_val, best_step
        if val < best_val:
            best_val, best_step = val, step
        model_sd, optim_sd = get_state_dict(raw, optimizer, options=sd_opts)
        rng = {f"torch_rank{d.rank}": torch.get_rng_state()}
        if d.device.type == "cuda":
            rng[f"cuda_rank{d.rank}"] = torch.cuda.get_rng_state()
        if d.enabled:
            gathered: list[Any] = [None] * d.world_size
            tdist.all_gather_object(gathered, rng)
            rng = {k: v for r in gathered for k, v in r.items()}
        path = out / "checkpoints" / f"step-{step:07d}"
        if d.is_main:
            path = ckpt_io.save_checkpoint(
                out,
                step,
                model_sd,
                optim_sd,
                {
                    "model_config": mcfg.to_dict(),
                    "train_config": cfg.to_dict(),
                    "tokenizer": meta["tokenizer"],
                    "val_loss": val,
                    "best_val": best_val,
                    "best_step": best_step,
                    "rng": rng,
                    "tokens_seen": step * tokens_per_step,
                },
                cfg.keep_last,
            )
        if d.enabled:
            tdist.barrier()
        return path

    def check_loss(losses: list[float], step: int) -> None:
        bad = [v for v in losses if diverged(v, mcfg.vocab_size)]
        if bad:
            good = last_good_checkpoint(out, mcfg.vocab_size)
            latest = (ckpt_io.list_checkpoints(out) or [None])[-1]
            kept = f"the last good checkpoint is {good}" if good else "no good checkpoint was written yet"
            if good and latest != good:
                kept += f" (move the later ones out of {out / 'checkpoints'} first, --resume takes the latest)"
            raise GptlabError(
                f"the loss diverged to {bad[0]:.4g} at step {step}; training stopped and {kept}. "
                f"Lower --lr, raise --warmup-iters or lower --grad-clip, then --resume"
                if good
                else f"the loss diverged to {bad[0]:.4g} at step {step}; training stopped "
                f"and {kept}. Lower --lr or raise --warmup-iters and start again"
            )

    bar = tqdm(
        total=cfg.max_iters,
        initial=start,
        desc="train",
        disable=not (progress and d.is_main),
        dynamic_ncols=True,
        file=sys.stderr,
        mininterval=0.5 if sys.stderr.isatty() else 30.0,
    )
    pending: list[torch.Tensor] = []
    t_log, step_log, t0 = time.perf_counter(), start, time.perf_counter()
    t_first = None  # throughput excludes the first step (allocations, compilation), evals and checkpoints
    side_seconds = 0.0
    model.train()
    last_val = math.nan
    try:
        for step in range(start, cfg.max_iters):
            lr = lr_at(step, cfg)
            for g in optimizer.param_groups:
                g["lr"] = lr
            p_ss = ss_probability(cfg.ss_schedule, step, cfg.max_iters, cfg.ss_max_prob, cfg.ss_k)
            ss_gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step) if p_ss > 0 else None
            for micro in range(cfg.grad_accum):
                x, y = train_windows.batch(cfg.batch_size, step, micro, d.rank, d.world_size)
                x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
                if ss_gen is not None:
                    x = mix_in_predictions(raw, x, p_ss, ss_gen)
                sync = micro == cfg.grad_accum - 1
                with contextlib.nullcontext() if sync or not ddp else model.no_sync(), amp:
                    _, loss = model(x, y)
                scaler.scale(loss / cfg.grad_accum).backward()
                pending.append(loss.detach())
            if cfg.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            bar.update(1)
            if t_first is None:
                t_first = time.perf_counter()
            is_ckpt = done == cfg.max_iters or (cfg.ckpt_interval and done % cfg.ckpt_interval == 0)
            if done % cfg.log_interval == 0 or is_ckpt or done % cfg.eval_interval == 0:
                micro_losses = distributed.mean_across_ranks(torch.stack(pending).float(), d)
                losses = micro_losses.view(-1, cfg.grad_accum).mean(1).tolist()
                pending.clear()
                check_loss(losses, done)
                now = time.perf_counter()
                tps = (done - step_log) * tokens_per_step / max(now - t_log, 1e-9)
                t_log, step_log = now, done
                for i, loss_i in enumerate(losses):
                    metrics.write(step=done - len(losses) + i + 1, loss=loss_i)
                if raw.moe_layers():
                    metrics.write(step=done, **moe_stats(raw))
                bar.set_postfix(loss=f"{losses[-1]:.4f}", tok_s=f"{tps:,.0f}", lr=f"{lr:.2e}")
                t_side = time.perf_counter()
                if done % cfg.eval_interval == 0 or is_ckpt:
                    last_val = periodic_eval()
                    metrics.write(step=done, val_loss=last_val, tok_per_s=tps, lr=lr)
                    if d.is_main:
                        bar.write(
                            f"step {done}: train {losses[-1]:.4f}  val {last_val:.4f}  {tps:,.0f} tok/s",
                            file=sys.stderr,
                        )
                    check_loss([last_val], done)  # the update may have broken the weights: never save those
                if is_ckpt:
                    save(done, last_val)
                side_seconds += time.perf_counter() - t_side
                t_log += time.perf_counter() - t_side
    finally:
        bar.close()  # before any error line, so that it never shares a line with the bar
    train_seconds = time.perf_counter() - t0
    steady = (
        (cfg.max_iters - start - 1) * tokens_per_step / max(time.perf_counter() - t_first - side_seconds, 1e-9)
        if t_first is not None and cfg.max_iters - start > 1
        else None
    )
    final_val = evaluate(val_windows.sequential(cfg.batch_size * 4, cfg.final_eval_tokens))
    summary = {
        "out_dir": str(out),
        "steps": cfg.max_iters,
        "resumed_from": start if resume else None,
        "tokens": cfg.max_iters * tokens_per_step,
        "params": n_params,
        "final_val_loss": round(final_val, 4),
        "best_val_loss": round(best_val, 4),
        "best_checkpoint": str(out / "checkpoints" / f"step-{best_step:07d}") if best_step is not None else None,
        "train_seconds": round(train_seconds, 1),
        "tokens_per_second": round(steady) if steady else None,
        "world_size": d.world_size,
        "device": str(d.device),
        "dtype": str(dtype).replace("torch.", ""),
    }
    if d.is_main:
        metrics.write(step=cfg.max_iters, final_val_loss=final_val)
        plot_losses(metrics.rows(), out / "loss.png", f"{cfg.model} on {Path(cfg.data).name}")
        summary["loss_plot"] = str(out / "loss.png")
        summary["metrics"] = str(out / METRICS)
    return summary
