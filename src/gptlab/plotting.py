"""Matplotlib without a display, and PNGs written atomically (a crash never leaves half an image)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .files import atomic_file


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (works on servers and in CI)."""
    import matplotlib  # here, not at the top: matplotlib loads slowly and most verbs plot nothing

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: str | Path, dpi: int = 120) -> Path:
    """Write ``fig`` to ``path`` atomically and close it."""
    path = Path(path)
    with atomic_file(path) as f:
        fig.savefig(f, dpi=dpi, format="png")
    pyplot().close(fig)
    return path
