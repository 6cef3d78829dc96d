"""Scaling-law figures as PNG: loss against N, IsoFLOP curves and the compute-optimal frontier."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .scaling import HOFFMANN, METHODS, ChinchillaLaw, allocate, kaplan_loss_n


def scaling_figure(
    out: Path, budgets: list[float], law: ChinchillaLaw = HOFFMANN, marks: dict[str, tuple[float, float]] | None = None
) -> Path:
    """Three panels: (1) Kaplan's L(N) and ``law`` at 20 tokens/parameter against N; (2) IsoFLOP curves,
    ``law``'s L(N, C/6N) against N for each budget, their minima marked; (3) N_opt against C for every allocation
    method, with ``marks`` (name -> (N, D)) placed at their compute. Written atomically."""
    from ..plotting import pyplot, save_png  # here: `gptlab plan` without --plot never loads matplotlib

    fig, axes = pyplot().subplots(1, 3, figsize=(16, 4.8))
    n = np.logspace(6, 13, 200)
    axes[0].loglog(n, [kaplan_loss_n(x) for x in n], label="Kaplan L(N) (non-embedding N, converged)")
    axes[0].loglog(n, [law.loss(x, 20 * x) for x in n], label=f"{law.source}, D = 20N")
    axes[0].set(xlabel="parameters N", ylabel="loss (nats/token)", title="Loss vs model size")
    for c in budgets:
        ns = np.logspace(np.log10((c / 6e4) ** 0.5), np.log10((c / 0.6) ** 0.5), 200)  # 0.1 to 10^4 tokens/param
        losses = [law.loss(x, c / (6 * x)) for x in ns]
        (line,) = axes[1].semilogx(ns, losses, label=f"C = {c:.0e}")
        n_opt, d_opt = law.optimal(c)
        axes[1].plot(n_opt, law.loss(n_opt, d_opt), "o", color=line.get_color())
    axes[1].set(xlabel="parameters N", ylabel="loss (nats/token)", title=f"IsoFLOP curves ({law.source})")
    cs = np.logspace(18, 27, 50)
    for m in METHODS:
        axes[2].loglog(cs, [allocate(c, m)[0] for c in cs], label=m)
    for name, (pn, pd) in (marks or {}).items():
        axes[2].plot(6 * pn * pd, pn, "k*", markersize=10)
        axes[2].annotate(name, (6 * pn * pd, pn), textcoords="offset points", xytext=(5, 5))
    axes[2].set(xlabel="training FLOPs C", ylabel="N_opt", title="Compute-optimal model size")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_png(fig, out, new=True)
