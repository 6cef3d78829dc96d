"""A run's ``metrics.jsonl``: one JSON object per line, appended as training goes, and its loss plot.

The file survives every way a run can end. Each row is appended with one ``write`` of a whole line, so a crash or a
full disk can tear at most the last line, and readers skip a torn or otherwise unreadable line (with a count)
instead of failing. Resuming rewrites the file without the rows past the checkpoint's step atomically (a new file
renamed over the old), so a kill during the rewrite leaves the old history, never an empty one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .files import atomic_write_text
from .plotting import pyplot, save_png

METRICS = "metrics.jsonl"


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Every readable row of a metrics file (a JSON object with an integer ``step``); torn lines are skipped."""
    rows: list[dict[str, Any]] = []
    try:
        text = Path(path).read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return rows
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


class Metrics:
    """Append-only ``metrics.jsonl``; on resume, rows past the checkpoint's step are dropped (atomically)."""

    def __init__(self, path: Path, resume_step: int | None, enabled: bool) -> None:
        self.path, self.enabled = Path(path), enabled
        if not enabled:
            return
        rows = [r for r in read_rows(self.path) if r["step"] <= resume_step] if resume_step is not None else []
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in rows))

    def write(self, **row: Any) -> None:
        if self.enabled:
            line = (json.dumps(row) + "\n").encode()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                if os.write(fd, line) != len(line):
                    raise OSError(28, "No space left on device (short write)", str(self.path))
            finally:
                os.close(fd)

    def rows(self) -> list[dict[str, Any]]:
        return read_rows(self.path)


def plot_losses(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Train and validation loss against step, as a PNG."""
    plt = pyplot()
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="val", ms=3)
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_png(fig, path, dpi=110)
