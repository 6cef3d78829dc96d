"""Automatic prefix caching: the keys and values of prompt blocks that earlier requests computed, kept so that a
request sharing a prefix with them (a system prompt, a few-shot header, the earlier turns of a chat, the ``n``
choices of one prompt) skips that part of its prefill.

The design is vLLM's (Kwon et al. 2023, PagedAttention; the "automatic prefix caching" page of vLLM's docs): a
prompt's cache slots are cut into fixed-size blocks, and block ``i`` is named by a hash chain, ``sha256(name of
block i-1 + the tokens of block i)``, so a name stands for the whole prefix up to the block's end. The chain's root is
empty for a text prompt and the image's hash for a prompt after an image prefix (the image's slots count as tokens
-1): the same text after a different image never matches. Eviction is least recently used, leaves before the
blocks their chains need (a lookup refreshes a chain from its end to its root).

Unlike vLLM, gptlab's pool is one contiguous row per sequence (:mod:`gptlab.serve.scheduler`), so the cache is a
separate store of ``budget`` bytes: a hit copies the blocks into the request's row (a memory copy, far cheaper than
the forward passes it replaces) and a request never holds a block once admitted. Eviction therefore never races a
reader, and blocks need no reference counts.

**Exact.** A hit gives bit for bit the keys, values, logits and tokens of a miss, because the scheduler prefills every
prompt one block per forward pass, on the same block grid (:meth:`Scheduler._prefill`): the passes a hit skips are
exactly the passes a miss runs, and the passes after it see the same inputs with the same shapes. (Chunks of a
different size would not do, nor rows batched together through a BLAS: it picks its blocking and threading from the
matrix shapes, so one row of a product can round differently with a different number of rows; on a 2-core AVX-512
CPU, MKL's 64-row product of a 1536 x 576 matrix differs from the same rows of its 1,100-row product. The scheduler
packs several prompts' blocks into one pass only where gptlab's row-invariant kernel computes every product:
:func:`~gptlab.serve.scheduler.packs_prompts`.) Only keys and values
computed by prefill passes are stored: those of generated tokens come from decode steps of other shapes, so a chat's
next turn reuses its earlier prompts and prefills the answers once.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

import torch

from ..config import GPTConfig
from ..kv_cache import KVCache


class PrefixCache:
    """Up to ``max_blocks`` blocks of ``block`` slots (every layer's keys and values), named by hash chains."""

    def __init__(
        self, cfg: GPTConfig, block: int, max_blocks: int, device: torch.device | str, dtype: torch.dtype
    ) -> None:
        shape = (cfg.n_layer, max_blocks, cfg.n_kv_heads, block, cfg.head_dim)
        # empty, not zeros: a block is always written before it is read, and untouched memory is not committed
        # (zeros would make the whole budget resident at start-up)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.block, self.max_blocks = block, max_blocks
        self.where: OrderedDict[bytes, int] = OrderedDict()  # name -> storage index, least recently used first
        self.unused = list(range(max_blocks - 1, -1, -1))

    @staticmethod
    def block_bytes(cfg: GPTConfig, block: int, dtype: torch.dtype) -> int:
        """Keys and values of one block, every layer."""
        return KVCache.row_bytes(cfg, block, dtype)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @property
    def used(self) -> int:
        return len(self.where)

    def names(self, root: bytes, slot_tokens: Sequence[int]) -> list[bytes]:
        """The names of the whole blocks of a sequence whose cache slots hold ``slot_tokens``."""
        out, name = [], root
        for i in range(len(slot_tokens) // self.block):
            name = hashlib.sha256(
                name + array("q", slot_tokens[i * self.block : (i + 1) * self.block]).tobytes()
            ).digest()
            out.append(name)
        return out

    def match(self, names: Sequence[bytes]) -> list[int]:
        """Storage indices of the longest run of ``names``, from the first, that the cache holds (refreshed)."""
        found = []
        for name in names:
            at = self.where.get(name)
            if at is None:
                break
            found.append(at)
        self._refresh(names[: len(found)])
        return found

    def load(self, found: Sequence[int], cache: KVCache, row: int) -> None:
        """Copy blocks ``found`` (from :meth:`match`) into slots ``0 : len(found) * block`` of ``cache``'s row."""
        if not found:
            return
        at = torch.tensor(found, device=self.k.device)
        n = len(found) * self.block
        for i, layer in enumerate(cache.layers):  # [blocks, heads, block, hd] -> [heads, blocks * block, hd]
            layer.k[row, :, :n] = self.k[i, at].transpose(0, 1).flatten(1, 2)
            layer.v[row, :, :n] = self.v[i, at].transpose(0, 1).flatten(1, 2)

    def store(self, names: Sequence[bytes], cache: KVCache, row: int) -> int:
        """Keep the blocks of ``cache``'s row named ``names`` (block ``i`` = slots ``i*block : (i+1)*block``),
        evicting the least recently used; return how many were evicted."""
        names = names[: self.max_blocks]  # a chain longer than the whole cache keeps its first blocks
        self._refresh([n for n in names if n in self.where])  # the chain's own blocks are not evicted for it
        evicted = 0
        for i, name in enumerate(names):
            if name in self.where:
                continue
            if self.unused:
                at = self.unused.pop()
            else:
                _, at = self.where.popitem(last=False)
                evicted += 1
            self.where[name] = at
            lo, hi = i * self.block, (i + 1) * self.block
            for j, layer in enumerate(cache.layers):
                self.k[j, at] = layer.k[row, :, lo:hi]
                self.v[j, at] = layer.v[row, :, lo:hi]
        self._refresh(names)
        return evicted

    def _refresh(self, names: Sequence[bytes]) -> None:
        for name in reversed(names):  # the root ends most recent: a chain is evicted from its end
            self.where.move_to_end(name)

    @staticmethod
    def root(image: torch.Tensor | None, adapter: int = 0) -> bytes:
        """The chain's root: empty for text, the hash of the image's pixels (and shape) for an image prefix; the
        LoRA adapter a request uses (served with ``--lora``) is part of it, as it changes every key and value."""
        root = b"" if not adapter else f"lora-adapter-{adapter}".encode()
        if image is None:
            return root
        pixels = image.detach().to("cpu", torch.float32).contiguous()
        return hashlib.sha256(root + repr(tuple(pixels.shape)).encode() + pixels.numpy().tobytes()).digest()
