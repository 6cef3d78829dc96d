"""``gptlab serve --runs DIR``: read-only JSON about the training runs under DIR, for the page's Runs view.

A run is a folder under DIR (at most ``MAX_DEPTH`` levels down, symlinks not followed) holding a
``metrics.jsonl``. Runs are named by their path relative to DIR. A name that is absolute, contains ``..``, a
backslash or a NUL, resolves outside DIR, or is not a run is refused: nothing outside DIR is ever read, and only two
files of a run are read at all, ``metrics.jsonl`` and its newest checkpoint's ``state.json``.

- ``GET /api/runs``: every run with its steps and its latest losses.
- ``GET /api/runs/{name}``: a run's curves (train loss per step, val loss per eval), its config (model and training,
  from the newest checkpoint) and a summary.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from ..checkpoint import list_checkpoints
from ..metrics import METRICS, read_rows

MAX_DEPTH = 4
MAX_RUNS = 500
MAX_NAME = 1024  # characters of a run name (a relative path)


class RunsError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def find_runs(root: Path) -> list[str]:
    """Names (relative paths) of the run folders under ``root``, sorted."""
    found: list[str] = []
    base = len(root.parts)
    for folder, dirs, files in os.walk(root, followlinks=False):
        here = Path(folder)
        if len(here.parts) - base >= MAX_DEPTH:
            dirs[:] = []
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "checkpoints")
        if METRICS in files and not (here / METRICS).is_symlink():
            found.append(here.relative_to(root).as_posix() or ".")
        if len(found) >= MAX_RUNS:
            break
    return sorted(found)


def resolve_run(root: Path, name: str) -> Path:
    """The folder of run ``name`` under ``root``, or :class:`RunsError` (400 malformed, 404 not a run)."""
    if not name or "\x00" in name or "\\" in name or name.startswith("/") or ".." in Path(name).parts:
        raise RunsError(400, "a run is named by its path relative to the runs folder, without '..'")
    if len(name) > MAX_NAME or any(len(part.encode()) > 255 for part in Path(name).parts):
        raise RunsError(400, f"a run name has at most {MAX_NAME} characters and 255 bytes per folder")
    try:
        path = (root / name).resolve()
        if path != root and root not in path.parents:
            raise RunsError(400, "that path is outside the runs folder")
        if not (path / METRICS).is_file() or (path / METRICS).is_symlink():
            raise RunsError(404, f"{name[:200]} is not a training run (no metrics.jsonl)")
    except OSError:  # (a loop of symlinks, a permission): say nothing of the server's paths
        raise RunsError(404, "that run cannot be read") from None
    return path


def _state(path: Path) -> dict[str, Any]:
    """The newest checkpoint's state.json (configs and best val loss), or {}."""
    ckpts = list_checkpoints(path)
    if not ckpts:
        return {}
    state = ckpts[-1] / "state.json"
    if state.is_symlink() or not state.resolve().is_relative_to(path):
        return {}
    try:
        meta = json.loads(state.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and x == x and abs(x) != float("inf") else None


def summarize(root: Path, name: str, curves: bool) -> dict[str, Any]:
    path = resolve_run(root, name)
    rows = read_rows(path / METRICS)
    train = [[r["step"], _finite(r["loss"])] for r in rows if "loss" in r]
    val = [[r["step"], _finite(r["val_loss"])] for r in rows if "val_loss" in r]
    final = [r["final_val_loss"] for r in rows if "final_val_loss" in r]
    speed = [r["tok_per_s"] for r in rows if isinstance(r.get("tok_per_s"), (int, float))]
    out: dict[str, Any] = {
        "name": name,
        "steps": max((r["step"] for r in rows), default=0),
        "train_loss": train[-1][1] if train else None,
        "val_loss": val[-1][1] if val else None,
        "final_val_loss": _finite(final[-1]) if final else None,
        "modified": (path / METRICS).stat().st_mtime,
    }
    if curves:
        state = _state(path)
        out.update(
            train=train,
            val=val,
            tok_per_s=speed[-1] if speed else None,
            best_val=_finite(state.get("best_val")),
            best_step=state.get("best_step"),
            tokens_seen=state.get("tokens_seen"),
            model_config=state.get("model_config"),
            train_config=state.get("train_config"),
        )
    return out


def add_routes(app: FastAPI, root: Path, error: Any) -> None:
    """Register the runs endpoints; ``error(status, message)`` builds the API's error response."""
    root = root.resolve()

    @app.get("/api/runs")
    async def runs() -> Any:
        return {"root": root.name, "runs": [summarize(root, n, curves=False) for n in find_runs(root)]}

    @app.get("/api/runs/{name:path}")
    async def run(name: str) -> Any:
        try:
            return summarize(root, name, curves=True)
        except RunsError as e:
            return error(e.status, str(e))
