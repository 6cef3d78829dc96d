"""The token shard format: a 32-byte header, then the tokens as little-endian uint16 or uint32.

Header: magic ``b"GPTLABTK"`` (8 bytes), format version (uint32), bytes per token (uint32: 2 or 4), token count
(uint64), 8 reserved zero bytes. uint16 is used whenever the vocabulary fits (< 65,536 ids), halving disk and
memory traffic. Shards are written atomically, so a reader never sees a partial one.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from ..errors import GptlabError
from ..files import atomic_file

MAGIC = b"GPTLABTK"
VERSION = 1
HEADER_BYTES = 32
_HEADER = struct.Struct("<8sIIQ8x")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def write_shard(path: Path, tokens: np.ndarray) -> None:
    """Write ``tokens`` (uint16 or uint32) to ``path`` atomically (temp file, fsync, rename)."""
    tokens = np.ascontiguousarray(tokens)
    if tokens.dtype not in (np.uint16, np.uint32):
        raise ValueError(f"shard tokens must be uint16 or uint32, not {tokens.dtype}")
    with atomic_file(path) as f:
        f.write(_HEADER.pack(MAGIC, VERSION, tokens.dtype.itemsize, tokens.size))
        f.write(tokens.astype(tokens.dtype.newbyteorder("<"), copy=False).tobytes())


def read_shard(path: Path) -> np.memmap:
    """Memory-map a shard's tokens, checking its header against its size."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
        size = path.stat().st_size
    except OSError as e:
        raise GptlabError(f"cannot read token shard {path}: {e.strerror}") from None
    if len(head) < HEADER_BYTES or head[:8] != MAGIC:
        raise GptlabError(f"{path} is not a gptlab token shard (bad magic); re-run `gptlab prepare`")
    _, version, itemsize, count = _HEADER.unpack(head)
    if version != VERSION or itemsize not in (2, 4):
        raise GptlabError(
            f"{path} has shard format version {version} / {itemsize}-byte tokens, which this gptlab "
            f"cannot read; re-run `gptlab prepare`"
        )
    if size != HEADER_BYTES + count * itemsize:
        raise GptlabError(
            f"{path} is truncated or corrupt: header says {count} tokens but the file holds "
            f"{(size - HEADER_BYTES) // itemsize}; re-run `gptlab prepare`"
        )
    dtype = np.dtype("<u2" if itemsize == 2 else "<u4")
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,))
