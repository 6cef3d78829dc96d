"""What ``gptlab scale`` is asked for: the sweep, whose fields are also the command's flags and the keys of a sweep
file (:mod:`gptlab.recipe`); :mod:`gptlab.scale.sweep` runs it."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from ..errors import GptlabError
from ..options import number_list
from ..recipe import COUNT, POSITIVE, PROBABILITY_BELOW_1, Range, RecipeConfig, opt

LAUNCHERS = ("process", "torchrun")


def shape_list(text: str) -> list[list[int]]:
    """``2x64,4x128``: [[n_layer, n_embd], ...]."""
    try:
        shapes = [[int(v) for v in x.split("x")] for x in text.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(len(x) != 2 or min(x) < 1 for x in shapes):
        raise argparse.ArgumentTypeError(f"{text!r}: expected n_layer x n_embd pairs such as 2x64,4x128")
    return shapes


@dataclass
class Sweep(RecipeConfig):
    """A sweep: the sizes (a depth dial, or explicit ``shapes`` of [n_layer, n_embd]), the budgets, how to launch.
    ``train`` overrides the base recipe. Loaded like a training recipe: defaults <- TOML sweep file (these fields;
    a ``[train]`` table) <- flags."""

    help_hint = "`gptlab scale --help`"
    what = "sweep"
    renamed = {"out": "out_dir"}

    data: str = opt("", "a folder made by `gptlab prepare`")
    out_dir: str = opt("", "sweep folder (one run folder per point inside)")
    recipe: str | None = opt(
        None, "base training recipe (TOML); the sweep sets out_dir, max_iters, lr, model shape", kind=str
    )
    depths: list[int] | None = opt(
        None, "comma-separated depths, each in [1, 1000] (default 1,2,3,4,6 when no shapes are given)",
        kind=list, parse=number_list(Range(1, 1000), integer=True), metavar="L[,L...]",
    )  # fmt: skip
    shapes: list[list[int]] | None = opt(
        None, "explicit sizes instead of the dial, n_layer x n_embd: 2x64,4x128,6x192",
        kind=list, parse=shape_list, metavar="LxW[,LxW...]",
    )  # fmt: skip
    tokens: list[float] = opt(
        [], "training tokens per model (> 0), comma-separated for several (default 1e6)",
        parse=number_list(POSITIVE), metavar="N[,N...]",
    )  # fmt: skip
    flops: list[float] = opt(
        [], "IsoFLOP mode: comma-separated FLOP budgets (> 0); each depth trains on C/(6N) tokens",
        parse=number_list(POSITIVE), metavar="C[,C...]",
    )  # fmt: skip
    width_per_layer: int = opt(64, "width = this x depth", COUNT)
    head_dim: int = opt(32, "channels per head", COUNT)
    base_width: int = opt(128, "the width whose learning rate the recipe gives; others scale by its sqrt ratio", COUNT)
    warmup_frac: float = opt(
        0.0,
        "warmup as a fraction of each run (0: the recipe's warmup_iters, at most half the run)",
        PROBABILITY_BELOW_1,
    )
    jobs: int = opt(1, "runs at once in child processes, threads split between them", Range(1, 256))
    launcher: str = opt(
        "process", "process, or torchrun: each run under torchrun --standalone --nproc-per-node", choices=LAUNCHERS
    )
    nproc_per_node: int = opt(1, "processes per torchrun run", Range(1, 1024))
    include: list[str] = opt(
        [], "also fit the finished runs of these sweep folders (same data; e.g. other sizes)",
        parse=lambda t: t.split(","), metavar="SWEEP[,SWEEP...]",
    )  # fmt: skip
    train: dict[str, Any] = opt({}, "training-recipe overrides (the sweep file's [train] table)")

    def __post_init__(self) -> None:
        self._both_sizes = self.depths is not None and self.shapes is not None
        if self.depths is None and self.shapes is None:
            self.depths = [1, 2, 3, 4, 6]
        try:
            self.depths = sorted(int(x) for x in self.depths or [])
            self.shapes = [[int(v) for v in x] for x in self.shapes or []]
            self.tokens = [float(x) for x in self.tokens]
            self.flops = [float(x) for x in self.flops]
            self.include = [str(x) for x in self.include]
        except (TypeError, ValueError):
            raise GptlabError(
                "invalid sweep: depths, shapes, tokens, flops and include must be lists (of integers, "
                "[n_layer, n_embd] pairs, numbers and folders)"
            ) from None
        if not self.tokens and not self.flops:
            self.tokens = [1e6]
        super().__post_init__()

    def checks(self) -> list[tuple[bool, str]]:
        shapes, depths = self.shapes or [], self.depths or []
        sizes: list[Any] = shapes or depths
        given = self._both_sizes
        return [
            (not bad, msg)
            for bad, msg in [
                (not self.data, "the sweep needs `data` (flag --data or a key in the sweep file)"),
                (not self.out_dir, "the sweep needs `out_dir` (flag --out-dir or a key in the sweep file)"),
                (given, "give depths (a dial) or shapes, not both"),
                (any(len(x) != 2 or min(x) < 1 for x in shapes), "each shape is [n_layer, n_embd], both >= 1"),
                (not sizes, "the size list is empty; give at least 3 depths (--depths 1,2,3) or shapes"),
                (
                    len(sizes) < 3
                    or len({tuple(x) if isinstance(x, list) else x for x in sizes}) != len(sizes)
                    or (bool(depths) and depths[0] < 1),
                    f"a sweep needs at least 3 distinct positive sizes, got {sizes}",
                ),
                (bool(self.tokens) and bool(self.flops), "give token budgets or FLOP budgets (IsoFLOP mode), not both"),
                (any(not 0 < x < 1e30 for x in self.tokens + self.flops), "budgets must be positive and finite"),
                (self.jobs < 1 or self.nproc_per_node < 1, "jobs and nproc_per_node must be >= 1"),
                (self.launcher not in ("process", "torchrun"), "launcher must be process or torchrun"),
                (not 0 <= self.warmup_frac < 1, "warmup_frac must be in [0, 1)"),
                (
                    self.width_per_layer < 1 or self.head_dim < 1 or self.base_width < 1,
                    "width_per_layer, head_dim and base_width must be >= 1",
                ),
            ]
        ]
