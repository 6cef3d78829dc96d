"""The training loader: memory-mapped shards, random windows of ``block_size + 1`` tokens.

Batches are a pure function of ``(seed, step, micro_step)``: a fresh generator seeded with those numbers picks the
window starts of the *global* batch and each DDP rank takes its own rows. So the loader has no hidden state to save:
resuming at step ``s`` replays exactly the batches an uninterrupted run would have drawn, and N processes with batch
B/N see the same global batch as one process with batch B. Windows never cross a shard boundary.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import GptlabError
from .shards import read_shard

_SPLIT_IDS = {"train": 0, "val": 1}


def to_device(batch: tuple[torch.Tensor, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """A host batch on ``device``. For CUDA the rows are first copied into page-locked (pinned) memory, so the
    copy to the GPU is a true asynchronous DMA (``non_blocking``) that overlaps the previous step's kernels instead of
    a synchronous staged copy (PyTorch docs, "Use pinned memory buffers"). On the CPU the tensors are returned as
    they are."""
    if device.type != "cuda":
        return tuple(t.to(device) for t in batch)
    return tuple(t.pin_memory().to(device, non_blocking=True) for t in batch)


# the keys every reader of a dataset's meta.json relies on, with their types, per format
_META_KEYS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "gptlab-tokens": {"tokenizer": dict, "vocab_size": int, "eot_id": int, "dtype": str, "files": dict},
    "gptlab-images": {
        "tokenizer": dict, "vocab_size": int, "eot_id": int, "files": dict, "image_size": int,
        "image_channels": int, "text_tokens": int,
    },
}  # fmt: skip


def read_meta(data_dir: str | Path) -> dict[str, Any]:
    """A dataset's ``meta.json``, checked: its format is known and every key its readers use has the right type."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise GptlabError(f"{data_dir} is not a prepared dataset (no meta.json); run `gptlab prepare` first")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise GptlabError(f"{path} is corrupt; re-run `gptlab prepare`") from None
    keys = _META_KEYS.get(str(meta.get("format"))) if isinstance(meta, dict) else None
    if keys is None:
        raise GptlabError(f"{path} is not a gptlab dataset's meta.json (unknown format); re-run `gptlab prepare`")
    for key, kind in keys.items():
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise GptlabError(
                f"{path} lacks {key!r} or it has the wrong type; the dataset is damaged: re-run `gptlab prepare`"
            )
    files = meta["files"]
    for split in ("train", "val") if meta["format"] == "gptlab-tokens" else files:
        names = files.get(split)
        names = list(names.values()) if isinstance(names, dict) else names
        if not isinstance(names, list) or not all(isinstance(f, str) for f in names):
            raise GptlabError(f"{path} lists no {split} files; the dataset is damaged: re-run `gptlab prepare`")
    return meta


class TokenWindows:
    """Random or sequential windows over one split (``train`` or ``val``) of a prepared dataset."""

    def __init__(self, data_dir: str | Path, split: str, block_size: int, seed: int = 0) -> None:
        meta = read_meta(data_dir)
        self.shards = [read_shard(Path(data_dir) / f) for f in meta["files"][split]]
        self.block_size = block_size
        self.seed = seed
        self.split_id = _SPLIT_IDS[split]
        span = block_size + 1
        valid = np.array([max(len(s) - span + 1, 0) for s in self.shards], dtype=np.int64)
        if valid.sum() == 0:
            raise GptlabError(
                f"the {split} split of {data_dir} has {sum(map(len, self.shards))} tokens, fewer "
                f"than one window of block_size+1 = {span}; use more data or a smaller block_size"
            )
        self._cum_valid = np.cumsum(valid)
        self.num_tokens = int(sum(len(s) for s in self.shards))

    def _windows(self, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        shard_idx = np.searchsorted(self._cum_valid, starts, side="right")
        offsets = starts - np.concatenate([[0], self._cum_valid[:-1]])[shard_idx]
        span = self.block_size + 1
        rows = np.stack([self.shards[s][o : o + span] for s, o in zip(shard_idx, offsets)]).astype(np.int64)
        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]

    def batch(
        self, batch_size: int, step: int, micro_step: int = 0, rank: int = 0, world_size: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank ``rank``'s ``batch_size`` rows of the global batch for ``(step, micro_step)``: (inputs, targets)."""
        rng = np.random.default_rng([self.seed, self.split_id, step, micro_step])
        starts = rng.integers(0, self._cum_valid[-1], size=batch_size * world_size)
        return self._windows(starts[rank * batch_size : (rank + 1) * batch_size])

    def sequential(self, batch_size: int, max_tokens: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Non-overlapping windows covering the split once (up to ``max_tokens``), for a full evaluation."""
        parts = []
        for i, shard in enumerate(self.shards):
            base = self._cum_valid[i - 1] if i else 0
            n_windows = (len(shard) - 1) // self.block_size
            parts.append(base + np.arange(n_windows) * self.block_size)
        starts = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)
        if max_tokens:
            starts = starts[: max(1, max_tokens // self.block_size)]
        for i in range(0, len(starts), batch_size):
            yield self._windows(starts[i : i + batch_size])
