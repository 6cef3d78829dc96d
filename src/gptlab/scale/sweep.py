"""``gptlab scale``: a sweep of ordinary training runs over model sizes and budgets, then fits, plots and a report.

**Shapes.** One dial drives the shape (nanochat's habit): depth ``L`` gives ``n_layer = L``,
``n_embd = width_per_layer · L`` and heads of ``head_dim`` channels. Or ``shapes`` lists [n_layer, n_embd] pairs.

**Budgets.** Either token budgets (every depth trains on each of ``tokens``; one budget gives the classic L(N)
sweep, several give L(D) too and the Chinchilla L(N, D) fit), or FLOP budgets (IsoFLOP mode: for each C in
``flops`` every depth trains on D = C / (6·N) tokens, N the total parameter count, rounded to whole steps). A size
whose share of a budget is under ``MIN_STEPS`` optimizer steps is left out of that budget.

**Rules that scale with size.** Everything comes from the base recipe except: the learning rate,
lr · (base_width / width)^0.5 (wider models take smaller steps, the usual μP-flavoured rule of thumb; min_lr
scales with it); warmup, ``warmup_frac`` of the run's steps when given; checkpoints four times per run.

**Runs.** Each point is an ordinary gptlab run in ``OUT/<name>`` (checkpoints, ``metrics.jsonl``, ``loss.png``)
whose configuration is written first to ``run.json``; ``summary.json`` marks it finished. A re-run skips finished
runs and resumes an unfinished one from its last checkpoint, so a sweep killed at any moment loses at most the
steps since a run's last checkpoint. ``jobs`` > 1 runs that many points at once in child processes (threads split
between them); ``launcher="torchrun"`` starts each run under ``torchrun --nproc-per-node`` (DDP on CPU or GPUs).

**Outputs** in ``OUT``: ``results.csv`` / ``results.json`` (N total and non-embedding, D, C = 6·N·D, final val
loss), ``fits.json``, ``report.md`` and the plots (``loss_vs_n.png``, ``isoflop.png``, ``predicted_vs_actual.png``).
See :func:`fit_rows` for the fits. ``include`` adds the finished runs of other sweeps on the same data to the
fits (e.g. a second sweep that adds smaller sizes to bracket an IsoFLOP optimum).
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..checkpoint import list_checkpoints
from ..config import preset
from ..data.loader import read_meta
from ..errors import GptlabError
from ..files import atomic_write_bytes, mark_run, run_folder
from ..plan.shape import Shape, params
from ..train.config import TrainConfig
from ..train.trainer import train
from .analysis import fit_rows, predictions
from .config import Sweep
from .report import isoflop_plot, loss_plot, predicted_plot, report

MIN_STEPS = 10


def shape(n_layer: int, width: int, head_dim: int) -> dict[str, int]:
    if width % head_dim:
        raise GptlabError(f"width {width} (n_layer {n_layer}) is not a multiple of head_dim {head_dim}")
    return {"n_layer": n_layer, "n_embd": width, "n_head": width // head_dim}


def plan_runs(sw: Sweep) -> tuple[TrainConfig, list[dict[str, Any]]]:
    """The base config and one point per run: name, shape, parameter counts, steps, tokens, budget."""
    base = TrainConfig.from_sources(sw.recipe, data=sw.data, **sw.train)
    vocab = read_meta(base.data)["vocab_size"]
    block = base.block_size or preset(base.model).block_size
    per_step = base.batch_size * base.grad_accum * block * sw.nproc_per_node
    sizes: list[dict[str, Any]] = []
    dims = [(f"l{n}w{w}", n, w) for n, w in sw.shapes or []] or [
        (f"d{d}", d, sw.width_per_layer * d) for d in sw.depths or []
    ]
    for tag, n_layer, width in dims:
        s: dict[str, Any] = shape(n_layer, width, sw.head_dim)
        p = params(Shape.from_config(preset(base.model, vocab_size=vocab, **{**base.model_overrides, **s})))
        sizes.append({"tag": tag, "depth": n_layer, **s, "params": p["total"], "non_embedding": p["non_embedding"]})
    sizes.sort(key=lambda x: x["params"])
    points = []
    if sw.flops:
        for c in sorted(sw.flops):
            fits = [(s, round(c / (6 * s["params"]) / per_step)) for s in sizes]
            fits = [(s, k) for s, k in fits if k >= MIN_STEPS]
            if len(fits) < 3:
                need = 6 * sizes[2]["params"] * MIN_STEPS * per_step
                raise GptlabError(
                    f"the budget {c:.3g} FLOPs gives fewer than 3 sizes {MIN_STEPS}+ steps of "
                    f"{per_step:,} tokens; it is too small for these models (3 sizes need at least "
                    f"{need:.3g} FLOPs); raise it or add smaller depths"
                )
            points += [{"name": f"c{c:.3g}-{s['tag']}", "budget": c, **s, "steps": k} for s, k in fits]
    else:
        for t in sorted(sw.tokens):
            steps = int(t // per_step)
            if steps < MIN_STEPS:
                raise GptlabError(
                    f"{t:,.0f} tokens are {steps} steps of {per_step:,} tokens; give at least "
                    f"{MIN_STEPS * per_step:,} tokens per model"
                )
            for s in sizes:
                name = s["tag"] if len(sw.tokens) == 1 else f"t{t:.3g}-{s['tag']}"
                points.append({"name": name, "budget": t, **s, "steps": steps})
    for pt in points:
        pt["tokens"] = pt["steps"] * per_step
        pt["compute"] = 6 * pt["params"] * pt["tokens"]
    return base, points


def run_config(sw: Sweep, base: TrainConfig, pt: dict[str, Any]) -> TrainConfig:
    lr = base.optim.lr * (sw.base_width / pt["n_embd"]) ** 0.5
    warmup = int(sw.warmup_frac * pt["steps"]) if sw.warmup_frac else min(base.optim.warmup_iters, pt["steps"] // 2)
    optim = {**base.optim.to_dict(), "lr": lr, "min_lr": base.optim.min_lr * lr / base.optim.lr, "warmup_iters": warmup}
    shape = {k: pt[k] for k in ("n_layer", "n_embd", "n_head")}
    threads = base.threads or (max(1, (os.cpu_count() or 1) // (sw.jobs * sw.nproc_per_node)) if sw.jobs > 1 else 0)
    return TrainConfig(
        **{
            **base.to_dict(),
            "out_dir": str(Path(sw.out_dir) / pt["name"]),
            "max_iters": pt["steps"],
            "optim": optim,
            "checkpoint_interval": max(1, pt["steps"] // 4),
            "threads": threads,
            "model_overrides": {**base.model_overrides, **shape},
        }
    )


def read_run_config(run: Path) -> TrainConfig:
    """A run's ``run.json`` as a config; written by earlier versions too (flat optimizer keys, ``ckpt_interval``)."""
    return TrainConfig.from_sources(None, **json.loads((run / "run.json").read_text()))


def run_one(run_dir: str | Path, progress: bool = False) -> dict[str, Any]:
    """Train (or resume) the run whose ``run.json`` is in ``run_dir``; write ``summary.json`` when done."""
    run = Path(run_dir)
    cfg = read_run_config(run)
    summary = train(cfg, resume=bool(list_checkpoints(run)), progress=progress)
    if int(os.environ.get("RANK", "0")) == 0:
        atomic_write_bytes(run / "summary.json", json.dumps(summary).encode())
    return summary


def _launch(sw: Sweep, run_dir: Path, progress: bool) -> None:
    if sw.jobs == 1 and sw.launcher == "process":
        run_one(run_dir, progress)
        return
    cmd = [sys.executable, "-m", "gptlab.scale.sweep", str(run_dir)]
    if sw.launcher == "torchrun":
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={sw.nproc_per_node}",
            "-m",
            "gptlab.scale.sweep",
            str(run_dir),
        ]
    with open(run_dir / "log.txt", "ab") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc:
        raise GptlabError(
            f"run {run_dir.name} failed (exit {rc}); see {run_dir / 'log.txt'}, fix, and re-run the "
            f"sweep (finished runs are kept)"
        )


def run_sweep(sw: Sweep, progress: bool = False) -> dict[str, Any]:
    """Train every unfinished point, then fit and report. The sweep folder is locked throughout (each run
    folder is locked by its own run as well)."""
    base, points = plan_runs(sw)
    with run_folder(Path(sw.out_dir), "sweep folder"):
        return _run_sweep(sw, base, points, progress)


def _run_sweep(sw: Sweep, base: TrainConfig, points: list[dict[str, Any]], progress: bool) -> dict[str, Any]:
    root = Path(sw.out_dir)
    todo = []
    for pt in points:
        run = root / pt["name"]
        cfg = run_config(sw, base, pt).to_dict()
        if (run / "run.json").exists() and read_run_config(run).to_dict() != cfg:
            raise GptlabError(
                f"{run} was started with other settings (see its run.json); use another --out-dir or delete that run"
            )
        if not (run / "summary.json").exists():
            run.mkdir(parents=True, exist_ok=True)
            mark_run(run)
            atomic_write_bytes(run / "run.json", json.dumps(cfg, indent=1).encode())
            todo.append(run)
    with ThreadPoolExecutor(sw.jobs) as pool:
        list(pool.map(lambda r: _launch(sw, r, progress and sw.jobs == 1), todo))
    rows = []
    for pt in points:
        s = json.loads((root / pt["name"] / "summary.json").read_text())
        rows.append(
            {
                **{k: v for k, v in pt.items() if k not in ("steps", "tag")},
                "final_val_loss": s["final_val_loss"],
                "tokens_per_second": s["tokens_per_second"],
            }
        )
    for other in map(Path, sw.include):  # finished runs of other sweeps on the same data, e.g. other sizes
        if not (other / "results.json").is_file():
            raise GptlabError(f"--include {other}: no results.json there; run that sweep to the end first")
        rows += [{**r, "name": f"{other.name}/{r['name']}"} for r in json.loads((other / "results.json").read_text())]
    fits = fit_rows(rows, isoflop=bool(sw.flops))
    write_outputs(root, rows, fits, sw)
    return {"runs": rows, "fits": fits, "out": str(root)}


def write_outputs(root: Path, rows: list[dict[str, Any]], fits: dict[str, Any], sw: Sweep) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(root / "results.csv", buf.getvalue().encode())
    atomic_write_bytes(root / "results.json", json.dumps(rows, indent=1).encode())
    atomic_write_bytes(root / "fits.json", json.dumps(fits, indent=1).encode())

    if "power_law" in fits:
        loss_plot(root / "loss_vs_n.png", rows, fits)
    if "isoflop" in fits:
        isoflop_plot(root / "isoflop.png", rows, fits)
    if predictions(rows, fits):
        predicted_plot(root / "predicted_vs_actual.png", rows, fits)
    atomic_write_bytes(root / "report.md", report(rows, fits, asdict(sw)).encode())


if __name__ == "__main__":  # a child process of a parallel or torchrun sweep: python -m gptlab.scale.sweep RUN_DIR
    try:
        run_one(sys.argv[1])
    except GptlabError as e:
        print(f"gptlab: error: {e}", file=sys.stderr)
        sys.exit(2)
