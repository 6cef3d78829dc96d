"""A sweep's plots (loss vs N, IsoFLOP curves, predicted vs actual) and its markdown report, with the published
constants beside the fitted ones."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import GptlabError
from ..plan.scaling import APPROACH_EXPONENTS, BESIROGLU, HOFFMANN, KAPLAN_D, KAPLAN_N, KAPLAN_N_OPT
from ..plotting import pyplot, save_png
from .analysis import largest_budget, predictions

CAVEATS = """Published constants come from other data, tokenizers and scales (Kaplan et al.: WebText2, BPE, models
to 1.5B trained near convergence; Hoffmann et al.: MassiveText, SentencePiece, 70M-16B parameters). Losses are in
nats per token of *this* sweep's tokenizer, so E, A and B do not transfer between setups, and exponents fitted over
one or two decades of small, data-limited models can differ from the published ones by a factor of several. Treat
the fit as a description of this setup and check any extrapolation against a held-out run, as this report does."""


def _ci(fit: dict[str, Any], key: str, fmt: str = ".4g") -> str:
    """A fitted value with its 95 % interval, or with "(no interval)" where the runs cannot give one."""
    ci = fit.get("ci95", {}).get(key)
    return f"{fit['params'][key]:{fmt}}" + (f" [{ci[0]:{fmt}}, {ci[1]:{fmt}}]" if ci else " (no interval)")


def report(rows: list[dict[str, Any]], fits: dict[str, Any], sweep: dict[str, Any]) -> str:
    """``report.md``: the runs, each fitted constant with its 95 % interval next to the published values, the
    held-out check and the caveats."""
    mode = "IsoFLOP (FLOP budgets)" if sweep.get("flops") else "token budgets"
    out = [
        f"# Scaling sweep: {sweep['out_dir']}",
        "",
        f"Data `{sweep['data']}`, base recipe `{sweep.get('recipe')}`, {len(rows)} runs, {mode}; depth dial with "
        f"width = {sweep['width_per_layer']}·depth, head_dim {sweep['head_dim']}. C = 6·N·D with total N.",
        "",
        "| run | N (total) | N (non-emb.) | D (tokens) | C (FLOPs) | val loss |",
        "|---|---|---|---|---|---|",
    ]
    out += [
        f"| {r['name']} | {r['params']:,} | {r['non_embedding']:,} | {r['tokens']:,} | {r['compute']:.3g} | "
        f"{r['final_val_loss']:.4f} |"
        for r in rows
    ]
    out += [
        "",
        "## Fitted constants (95 % intervals) and published values",
        "",
        "Intervals: a t-interval from least squares for the pure power laws (n − 2 degrees of freedom), a "
        'percentile bootstrap over the runs for the fits with an irreducible term; "no interval" where the runs '
        "are too few to estimate one"
        + "".join(f" ({k}: {f['ci95_note']})" for k, f in fits.items() if isinstance(f, dict) and f.get("ci95_note"))
        + ".",
        "",
        "| quantity | this sweep | Kaplan et al. 2020 | Hoffmann et al. 2022 | Besiroglu et al. 2024 |",
        "|---|---|---|---|---|",
    ]
    if "power_law" in fits:
        out.append(f"| α in L(N) = a·N^-α (non-emb. N) | {_ci(fits['power_law'], 'alpha')} | {KAPLAN_N[1]} | | |")
    if "power_law_with_E" in fits:
        f = fits["power_law_with_E"]
        out.append(f"| L(N) = E + a·N^-α: E, α | E {_ci(f, 'E')}, α {_ci(f, 'alpha')} | | | |")
    if "data_law" in fits:
        out.append(f"| β in L(D) = b·D^-β (largest model) | {_ci(fits['data_law'], 'alpha')} | {KAPLAN_D[1]} | | |")
    if "data_law_with_E" in fits:
        f = fits["data_law_with_E"]
        out.append(f"| L(D) = E + b·D^-β: E, β | E {_ci(f, 'E')}, β {_ci(f, 'alpha')} | | | |")
    if "chinchilla" in fits:
        f = fits["chinchilla"]
        for k, pub in (("E", "E"), ("A", "A"), ("B", "B"), ("alpha", "alpha"), ("beta", "beta")):
            out.append(f"| L(N, D): {k} | {_ci(f, k)} | | {getattr(HOFFMANN, pub)} | {getattr(BESIROGLU, pub)} |")
        p = f["params"]
        out.append(
            f"| N_opt ∝ C^a from L(N, D): a = β/(α+β) | {p['beta'] / (p['alpha'] + p['beta']):.3f} | "
            f"{KAPLAN_N_OPT[1]} | {HOFFMANN.a:.2f} (Approach 3) | {BESIROGLU.a:.2f} |"
        )
    if "isoflop" in fits and "a" in fits["isoflop"]:
        iso = fits["isoflop"]
        ci = iso.get("ci95", {})
        span = lambda k: f" [{ci[k][0]:.3f}, {ci[k][1]:.3f}]" if k in ci else ""
        out.append(
            f"| IsoFLOP: N_opt ∝ C^a, D_opt ∝ C^b | a = {iso['a']:.3f}{span('a')}, b = {iso['b']:.3f}"
            f"{span('b')} | a = {KAPLAN_N_OPT[1]} | a = {APPROACH_EXPONENTS['approach2']} (Approach 2) | |"
        )
    if "isoflop" in fits:
        ci = fits["isoflop"].get("ci95", {})
        out += ["", "| budget C | N_opt [95 % bootstrap] | D_opt | D_opt/N_opt | min loss |", "|---|---|---|---|---|"]
        for o in fits["isoflop"]["budgets"]:
            lo, hi = ci.get(f"n_opt@{o['compute']:.3g}", (None, None))
            interval = f" [{lo:,.0f}, {hi:,.0f}]" if lo is not None else ""
            out.append(
                f"| {o['compute']:.3g} | {o['n_opt']:,.0f}{interval} | {o['d_opt']:,.0f} | "
                f"{o['d_opt'] / o['n_opt']:.1f} | {o['loss_min']:.4f} |"
            )
        if "bootstrap_kept" in fits["isoflop"]:
            out.append(
                f"\nIsoFLOP intervals: {fits['isoflop']['bootstrap_kept']} of 200 resamples of the runs "
                f"within each budget still bracketed every budget; the intervals are over those."
            )
        out += [f"| {o['compute']:.3g} | not bracketed: {o['reason']} | | | |" for o in fits["isoflop"]["skipped"]]
    if "isoflop_error" in fits:
        out += ["", f"No IsoFLOP optimum: {fits['isoflop_error']}."]
    if "held_out" in fits:
        h = fits["held_out"]
        out += [
            "",
            "## Held-out prediction",
            "",
            f"{h['what']} (fitted on {h['fit_on']}): predicted {h['predicted_loss']:.4f}, actual "
            f"{h['actual_loss']:.4f}, error {h['relative_error']:+.2%}."
            + (
                f" With an irreducible term (E + a·N^-α, fitted on the same runs): predicted "
                f"{h['predicted_loss_with_E']:.4f}, error {h['relative_error_with_E']:+.2%}."
                if "predicted_loss_with_E" in h
                else ""
            ),
        ]
    out += ["", "## Caveats", "", CAVEATS, ""]
    return "\n".join(out)


def loss_plot(path: Path, rows: list[dict[str, Any]], fits: dict[str, Any]) -> Path:
    """Log-log loss against non-embedding N at the largest token budget, with the fits and the held-out point."""
    top = largest_budget(rows)
    n = np.array([r["non_embedding"] for r in top], dtype=float)
    grid = np.logspace(np.log10(n.min() / 1.5), np.log10(n.max() * 1.5), 100)
    fig, ax = pyplot().subplots(figsize=(6.5, 4.5))
    ax.loglog(n, [r["final_val_loss"] for r in top], "o", label="runs")
    p = fits["power_law"]["params"]
    ax.loglog(grid, p["a"] * grid ** -p["alpha"], "-", label=f"L = {p['a']:.3g}·N^-{p['alpha']:.3f}")
    if "power_law_with_E" in fits:
        q = fits["power_law_with_E"]["params"]
        ax.loglog(
            grid,
            q["E"] + q["a"] * grid ** -q["alpha"],
            "--",
            label=f"L = {q['E']:.3g} + {q['a']:.3g}·N^-{q['alpha']:.3f}",
        )
    h = fits["held_out"]
    ax.loglog(
        [h["largest_non_embedding"]],
        [h["predicted_loss"]],
        "x",
        ms=10,
        label=f"held-out prediction ({h['relative_error']:+.1%})",
    )
    ax.set(
        xlabel="non-embedding parameters N",
        ylabel="final val loss (nats/token)",
        title=f"Loss vs model size ({top[0]['tokens']:,} tokens each)",
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)


def isoflop_plot(path: Path, rows: list[dict[str, Any]], fits: dict[str, Any]) -> Path:
    """Loss against N per FLOP budget with each budget's parabola in log N and its vertex; N_opt against C."""
    fig, (ax, bx) = pyplot().subplots(1, 2, figsize=(11, 4.5))
    kept = {o["compute"]: o for o in fits["isoflop"]["budgets"]}
    for c in sorted({r["budget"] for r in rows}):
        sel = sorted((r for r in rows if r["budget"] == c), key=lambda r: r["params"])
        (line,) = ax.semilogx(
            [r["params"] for r in sel],
            [r["final_val_loss"] for r in sel],
            "o--",
            lw=0.6,
            label=f"C = {c:.2g}" + ("" if c in kept else " (optimum not bracketed)"),
        )
        if c in kept:
            o = kept[c]
            lo, hi = np.log10(o["n_range"])
            grid = np.logspace(lo, hi, 100)
            ax.semilogx(grid, np.polyval(o["parabola"], np.log(grid)), "-", color=line.get_color(), lw=1.5)
            ax.plot(o["n_opt"], o["loss_min"], "*", ms=12, color=line.get_color())
    ax.set(xlabel="parameters N (total)", ylabel="final val loss (nats/token)", title="IsoFLOP profiles")
    iso = fits["isoflop"]
    c = np.array([o["compute"] for o in iso["budgets"]])
    bx.loglog(c, [o["n_opt"] for o in iso["budgets"]], "*", ms=12, label="N_opt per budget")
    if "a" in iso:
        bx.loglog(c, iso["k_n"] * c ** iso["a"], "-", label=f"N_opt ∝ C^{iso['a']:.2f}")
    bx.set(xlabel="compute C (FLOPs)", ylabel="N_opt", title="Compute-optimal size")
    for a in (ax, bx):
        a.grid(True, which="both", alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)


def predicted_plot(path: Path, rows: list[dict[str, Any]], fits: dict[str, Any]) -> Path:
    """Each run's loss as the fit predicts it against the measured loss, and the held-out prediction."""
    predicted = predictions(rows, fits)
    if predicted is None:
        raise GptlabError("no fit predicts these runs' losses; nothing to plot")
    label, covered, pred = predicted
    actual = [r["final_val_loss"] for r in covered]
    fig, ax = pyplot().subplots(figsize=(5.5, 5))
    ax.plot(actual, pred, "o", label=f"runs, fit {label}")
    h = fits.get("held_out")
    extremes = actual + pred
    if h:
        ax.plot(
            [h["actual_loss"]],
            [h["predicted_loss"]],
            "x",
            ms=10,
            mew=2,
            label=f"held out, power law without it ({h['relative_error']:+.1%})",
        )
        extremes += [h["actual_loss"], h["predicted_loss"]]
    lo, hi = min(extremes) * 0.98, max(extremes) * 1.02
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="predicted = actual")
    ax.set(
        xlabel="measured val loss",
        ylabel="predicted val loss",
        xlim=(lo, hi),
        ylim=(lo, hi),
        title="Predicted vs actual",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)
