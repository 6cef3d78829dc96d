"""``gptlab scale``: a sweep of ordinary training runs over model sizes, then power-law fits and a held-out check.

One dial drives the shape (nanochat's habit): depth ``L`` gives ``n_layer = L``, ``n_embd = width_per_layer · L``
and heads of ``head_dim`` channels. Every run trains for the same number of tokens with the base recipe's settings,
except the learning rate, which scales as lr · (base_width / width)^0.5 (wider models take smaller steps, the usual
μP-flavoured rule of thumb). Each run is a normal gptlab run in ``OUT/d<L>`` with a ``summary.json`` when it
finished, so a sweep that is interrupted resumes by skipping the finished runs (and ``--resume``-ing an unfinished
one from its last checkpoint).

Outputs in ``OUT``: ``results.csv`` / ``results.json`` (N total and non-embedding, D, C = 6·N·D, final val loss per
run), ``fits.json`` (L(N) = a·N^-α with and without an irreducible term, bootstrap intervals, and the held-out
prediction: the fit on all but the largest model, its predicted loss for the largest, and the error), and
``loss_vs_n.png``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Sequence

from ..assets import atomic_write_bytes
from ..config import preset
from ..data.loader import read_meta
from ..errors import GptlabError
from ..plan.shape import Shape, params
from ..train.config import TrainConfig
from ..train.trainer import train
from .fit import fit_power_law


def shape_for_depth(depth: int, width_per_layer: int, head_dim: int) -> dict[str, int]:
    width = width_per_layer * depth
    if width % head_dim:
        raise GptlabError(f"width {width} (depth {depth} x {width_per_layer}) is not a multiple of head_dim "
                          f"{head_dim}")
    return {"n_layer": depth, "n_embd": width, "n_head": width // head_dim}


def run_sweep(recipe: str | None, data: str, out: str, depths: Sequence[int], tokens: int,
              width_per_layer: int = 64, head_dim: int = 32, base_width: int = 128,
              progress: bool = False, **train_overrides: Any) -> dict[str, Any]:
    if len(depths) < 3 or len(set(depths)) != len(depths) or min(depths) < 1:
        raise GptlabError(f"a sweep needs at least 3 distinct positive depths, got {list(depths)}")
    base = TrainConfig.from_sources(recipe, data=data, **train_overrides)
    vocab = read_meta(base.data)["vocab_size"]
    block = base.block_size or preset(base.model).block_size
    tokens_per_step = base.batch_size * base.grad_accum * block
    iters = tokens // tokens_per_step
    if iters < 10:
        raise GptlabError(f"{tokens:,} tokens are {iters} steps of {tokens_per_step:,} tokens; give at least "
                          f"{10 * tokens_per_step:,} tokens per model")
    root = Path(out)
    rows = []
    for depth in sorted(depths):
        shape = shape_for_depth(depth, width_per_layer, head_dim)
        run = root / f"d{depth}"
        done = run / "summary.json"
        if not done.exists():
            lr = base.lr * (base_width / shape["n_embd"]) ** 0.5
            cfg = TrainConfig(**{**base.__dict__, "out_dir": str(run), "max_iters": iters, "lr": lr,
                                 "min_lr": base.min_lr * lr / base.lr, "ckpt_interval": max(1, iters // 4),
                                 "model_overrides": {**base.model_overrides, **shape}})
            resume = (run / "checkpoints").is_dir() and any((run / "checkpoints").iterdir())
            summary = train(cfg, resume=resume, progress=progress)
            atomic_write_bytes(done, json.dumps(summary).encode())
        summary = json.loads(done.read_text())
        p = params(Shape.from_config(preset(base.model, vocab_size=vocab, **{**base.model_overrides, **shape})))
        rows.append({"depth": depth, **shape, "params": p["total"], "non_embedding": p["non_embedding"],
                     "tokens": summary["tokens"], "compute": 6 * p["total"] * summary["tokens"],
                     "final_val_loss": summary["final_val_loss"], "tokens_per_second": summary["tokens_per_second"]})
    fits = fit_rows(rows)
    _write(root, rows, fits)
    return {"runs": rows, "fits": fits, "out": str(root)}


def fit_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """L(N_non-embedding) fits over the runs, and the held-out prediction for the largest model."""
    n = [r["non_embedding"] for r in rows]
    loss = [r["final_val_loss"] for r in rows]
    out: dict[str, Any] = {"power_law": fit_power_law(n, loss).to_dict()}
    if len(rows) >= 4:
        out["power_law_with_E"] = fit_power_law(n, loss, irreducible=True, bootstrap=50).to_dict()
    held = fit_power_law(n[:-1], loss[:-1], bootstrap=0).params
    predicted = held["a"] * n[-1] ** -held["alpha"]
    out["held_out"] = {"fit_on": len(rows) - 1, "params": held, "largest_non_embedding": n[-1],
                       "predicted_loss": predicted, "actual_loss": loss[-1],
                       "relative_error": (predicted - loss[-1]) / loss[-1]}
    return out


def _write(root: Path, rows: list[dict[str, Any]], fits: dict[str, Any]) -> None:
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(root / "results.csv", buf.getvalue().encode())
    atomic_write_bytes(root / "results.json", json.dumps(rows, indent=1).encode())
    atomic_write_bytes(root / "fits.json", json.dumps(fits, indent=1).encode())
    _plot(root / "loss_vs_n.png", rows, fits)


def _plot(path: Path, rows: list[dict[str, Any]], fits: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ..assets import atomic_file

    n = np.array([r["non_embedding"] for r in rows], dtype=float)
    loss = [r["final_val_loss"] for r in rows]
    grid = np.logspace(np.log10(n.min() / 1.5), np.log10(n.max() * 1.5), 100)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.loglog(n, loss, "o", label="runs")
    p = fits["power_law"]["params"]
    ax.loglog(grid, p["a"] * grid ** -p["alpha"], "-", label=f"L = {p['a']:.3g}·N^-{p['alpha']:.3f}")
    if "power_law_with_E" in fits:
        q = fits["power_law_with_E"]["params"]
        ax.loglog(grid, q["E"] + q["a"] * grid ** -q["alpha"], "--",
                  label=f"L = {q['E']:.3g} + {q['a']:.3g}·N^-{q['alpha']:.3f}")
    h = fits["held_out"]
    ax.loglog([h["largest_non_embedding"]], [h["predicted_loss"]], "x", ms=10,
              label=f"held-out prediction ({h['relative_error']:+.1%})")
    ax.set(xlabel="non-embedding parameters N", ylabel="final val loss (nats/token)", title="Loss vs model size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(path) as f:
        fig.savefig(f, dpi=120, format="png")
    plt.close(fig)
