"""``gptlab scale``: a scaling-law sweep of ordinary training runs, then fits, plots and report.md."""

from __future__ import annotations

import argparse

from ..options import add_config_flags, add_json, add_out_dir, config_from_flags, emit
from .config import Sweep

SKIP = ("out_dir", "train")  # --out-dir keeps its old spelling --out; [train] is a table of the sweep file


def summary(r: dict) -> str:
    fits = r["fits"]
    lines = [f"{'run':<14}{'non-emb N':>12}{'tokens':>12}{'C':>10}{'val loss':>10}"]
    lines += [
        f"{x['name']:<14}{x['non_embedding']:>12,}{x['tokens']:>12,}{x['compute']:>10.3g}{x['final_val_loss']:>10.4f}"
        for x in r["runs"]
    ]
    if "power_law" in fits:
        f = fits["power_law"]
        ci = f["ci95"].get("alpha")
        interval = f"95% CI {ci[0]:.4f}-{ci[1]:.4f}" if ci else f"no interval: {f.get('ci95_note')}"
        lines.append(
            f"L(N) = {f['params']['a']:.4g}·N^-{f['params']['alpha']:.4f} (alpha {interval}; Kaplan et al.: 0.076)"
        )
    if "isoflop" in fits and "a" in fits["isoflop"]:
        lines.append(
            f"IsoFLOP: N_opt ∝ C^{fits['isoflop']['a']:.3f}, D_opt ∝ C^{fits['isoflop']['b']:.3f} "
            f"(Hoffmann et al. Approach 2: 0.49, 0.51)"
        )
    if "chinchilla" in fits:
        p = fits["chinchilla"]["params"]
        lines.append(f"L(N, D) = {p['E']:.3f} + {p['A']:.4g}/N^{p['alpha']:.3f} + {p['B']:.4g}/D^{p['beta']:.3f}")
    if "held_out" in fits:
        h = fits["held_out"]
        lines.append(
            f"held out: {h['what']}: predicted {h['predicted_loss']:.4f}, actual {h['actual_loss']:.4f} "
            f"({h['relative_error']:+.2%})"
            + (
                f"; with E: {h['predicted_loss_with_E']:.4f} ({h['relative_error_with_E']:+.2%})"
                if "predicted_loss_with_E" in h
                else ""
            )
        )
    lines.append(f"results: {r['out']}/report.md, results.csv, fits.json and plots")
    return "\n".join(lines)


def cmd_scale(args: argparse.Namespace) -> None:
    from .sweep import run_sweep  # here, not at the top: the sweep loads the trainer and the fits

    sw = config_from_flags(args, Sweep, SKIP, file=args.sweep, out_dir=args.out_dir)
    r = run_sweep(sw, progress=not args.json)
    emit(args, r, summary(r))


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "scale",
        help="scaling-law sweep: runs over sizes and budgets, fits, IsoFLOP, report",
        description="Train one ordinary run per (size, budget) on the same data: token budgets "
        "(L(N), L(D)) or FLOP budgets (--flops, IsoFLOP profiles), then fit, plot and "
        "write report.md. Finished runs are skipped on a re-run; unfinished ones resume. "
        "Flags override the --sweep file.",
    )
    p.add_argument(
        "--sweep",
        metavar="TOML",
        help="sweep file: these options as keys, a [train] table of training-recipe overrides",
    )
    add_out_dir(p, "sweep folder (one run folder per point inside)")
    add_config_flags(p, Sweep, SKIP)
    add_json(p)
    p.set_defaults(func=cmd_scale)
