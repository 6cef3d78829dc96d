"""``gptlab scale``: a scaling-law sweep of ordinary training runs, then fits, plots and report.md."""

from __future__ import annotations

import argparse

from ..options import add_json, add_out_dir, count, emit, number, number_list
from ..recipe import POSITIVE, PROBABILITY_BELOW_1, Range

FLAGS = (
    "data",
    "out_dir",
    "recipe",
    "depths",
    "shapes",
    "tokens",
    "flops",
    "width_per_layer",
    "head_dim",
    "warmup_frac",
    "jobs",
    "launcher",
    "nproc_per_node",
    "include",
)


def _shapes(text: str) -> list[list[int]]:
    """``2x64,4x128``: [[n_layer, n_embd], ...]."""
    try:
        shapes = [[int(v) for v in x.split("x")] for x in text.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(len(x) != 2 or min(x) < 1 for x in shapes):
        raise argparse.ArgumentTypeError(f"{text!r}: expected n_layer x n_embd pairs such as 2x64,4x128")
    return shapes


def summary(r: dict) -> str:
    fits = r["fits"]
    lines = [f"{'run':<14}{'non-emb N':>12}{'tokens':>12}{'C':>10}{'val loss':>10}"]
    lines += [
        f"{x['name']:<14}{x['non_embedding']:>12,}{x['tokens']:>12,}{x['compute']:>10.3g}{x['final_val_loss']:>10.4f}"
        for x in r["runs"]
    ]
    if "power_law" in fits:
        f = fits["power_law"]
        lines.append(
            f"L(N) = {f['params']['a']:.4g}·N^-{f['params']['alpha']:.4f} (alpha 95% CI "
            f"{f['ci95']['alpha'][0]:.4f}-{f['ci95']['alpha'][1]:.4f}; Kaplan et al.: 0.076)"
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
    from .sweep import Sweep, run_sweep  # here, not at the top: the sweep loads the trainer and the fits

    sw = Sweep.from_sources(args.sweep, **{k: getattr(args, k) for k in FLAGS})
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
    p.add_argument("--recipe", help="base training recipe (TOML); the sweep sets out_dir, max_iters, lr, model shape")
    p.add_argument("--data", help="a folder made by `gptlab prepare`")
    add_out_dir(p, "sweep folder (one run folder per point inside)")
    p.add_argument(
        "--depths",
        type=number_list(Range(1, 1000), integer=True),
        help="comma-separated depths, each in [1, 1000] (default 1,2,3,4,6)",
    )
    p.add_argument(
        "--shapes",
        type=_shapes,
        metavar="LxW[,LxW]",
        help="explicit sizes instead of the dial, n_layer x n_embd: 2x64,4x128,6x192",
    )
    p.add_argument(
        "--tokens",
        type=number_list(POSITIVE),
        help="training tokens per model (> 0), comma-separated for several (default 1e6)",
    )
    p.add_argument(
        "--flops",
        type=number_list(POSITIVE),
        help="IsoFLOP mode: comma-separated FLOP budgets (> 0); each depth trains on C/(6N) tokens",
    )
    p.add_argument("--width-per-layer", type=count(1), help="width = this x depth (>= 1; default 64)")
    p.add_argument("--head-dim", type=count(1), help="channels per head (>= 1; default 32)")
    p.add_argument(
        "--warmup-frac",
        type=number(PROBABILITY_BELOW_1),
        help="warmup as a fraction of each run, in [0, 1) (default: the recipe's warmup_iters, at most half the run)",
    )
    p.add_argument(
        "--jobs",
        type=count(1, 256),
        help="runs at once in child processes, threads split between them (valid: [1, 256]; default 1)",
    )
    p.add_argument(
        "--launcher",
        choices=["process", "torchrun"],
        help="torchrun: each run under torchrun --standalone --nproc-per-node",
    )
    p.add_argument(
        "--nproc-per-node", type=count(1, 1024), help="processes per torchrun run (valid: [1, 1024]; default 1)"
    )
    p.add_argument(
        "--include",
        type=lambda t: t.split(","),
        metavar="SWEEP[,SWEEP]",
        help="also fit the finished runs of these sweep folders (same data; e.g. other sizes)",
    )
    add_json(p)
    p.set_defaults(func=cmd_scale)
