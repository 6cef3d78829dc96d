"""Matplotlib without a display, and PNGs written atomically (a crash never leaves half an image)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from .files import atomic_file, new_output


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (works on servers and in CI)."""
    import matplotlib  # here, not at the top: matplotlib loads slowly and most verbs plot nothing

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: str | Path, dpi: int = 120, new: bool = False) -> Path:
    """Write ``fig`` to ``path`` atomically and close it. ``new``: the path is the user's (``--plot PNG``), so it
    must not exist yet and a second writer of it is refused (:func:`gptlab.files.new_output`); else it is a plot
    gptlab owns inside its own run folder, replaced each time."""
    path = Path(path)
    try:
        with new_output(path, "plot") if new else contextlib.nullcontext(), atomic_file(path) as f:
            fig.savefig(f, dpi=dpi, format="png")
    finally:
        pyplot().close(fig)
    return path
