"""The KV cache: keys and values of earlier tokens, kept so that a decode step computes only the new token's.

gpt-fast's layout: per layer, preallocated key and value tensors of [batch, kv_heads, length, head_dim] and an
explicit ``update(slots, k, v)`` that writes the new keys and values in place and returns the whole cache for
attention to read. Every decode step therefore has the same shapes (what ``torch.compile`` wants). The cache stores
``cfg.n_kv_heads`` heads: a model with grouped-query attention (fewer key/value heads than query heads, Ainslie et
al. 2023) keeps only those, and its cache shrinks by ``n_head / n_kv_heads``.

Rows of a batch may be left-padded (``pad``: each row's count of padding slots, never attended to); each row's
positions start at 0 on its first real token, as if it ran alone. A forward pass fills cache ``slots``: [T] when
every row writes the same slots (a batch that started together), or [B, T] when each row is at its own length
(continuous batching: :mod:`gptlab.serve.scheduler`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

from .config import GPTConfig
from .errors import GptlabError


class LayerCache:
    """One layer's keys and values, [B, kv_heads, length, head_dim] each (two tensors, so that a compiled step
    updates each in place)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k, self.v = k, v

    def update(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new ``k``, ``v`` [B, kv_heads, T, head_dim] at ``slots`` ([T] shared, or [B, T] per row);
        return the whole cache, new entries included, for attention to read."""
        return write_slots(self.k, slots, k), write_slots(self.v, slots, v)

    def view(self, rows: slice, length: int) -> LayerCache:
        return LayerCache(self.k[rows, :, :length], self.v[rows, :, :length])


def write_slots(cache: torch.Tensor, slots: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Write ``new`` [B, H, T, hd] into ``cache`` [B, H, L, hd] at ``slots`` ([T] shared, or [B, T] per row)."""
    if slots.dim() == 1:
        return cache.index_copy_(2, slots, new)
    rows = torch.arange(cache.size(0), device=cache.device)[:, None]
    cache[rows, :, slots] = new.transpose(1, 2)  # advanced indices first: [B, T, H, hd]
    return cache


class KVCache:
    """The keys and values of every layer for a batch of sequences (see the module docstring)."""

    def __init__(
        self,
        cfg: GPTConfig,
        batch: int,
        length: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        pad: torch.Tensor | None = None,
    ) -> None:
        if length > cfg.block_size:
            raise GptlabError(f"a cache of {length} positions exceeds the model's context of {cfg.block_size}")
        shape = (batch, cfg.n_kv_heads, length, cfg.head_dim)
        self.layers = [
            LayerCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
            for _ in range(cfg.n_layer)
        ]
        self.length = length
        self.pad = torch.zeros(batch, dtype=torch.long, device=device) if pad is None else pad.to(device)

    @staticmethod
    def row_bytes(cfg: GPTConfig, length: int, dtype: torch.dtype) -> int:
        """The bytes of one row of ``length`` slots: 2 x layers x kv_heads x head_dim x length x element size."""
        return 2 * cfg.n_layer * cfg.n_kv_heads * cfg.head_dim * length * dtype.itemsize

    @property
    def nbytes(self) -> int:
        """2 (keys and values) x layers x batch x kv_heads x head_dim x length x bytes per element."""
        return sum(c.k.nbytes + c.v.nbytes for c in self.layers)

    def view(self, rows: slice, length: int) -> KVCache:
        """The same storage seen as rows ``rows`` and the first ``length`` slots: writes land in this cache, and
        attention reads only ``length`` slots (a pool's rows are rarely all full)."""
        out = object.__new__(KVCache)
        out.layers = [c.view(rows, length) for c in self.layers]
        out.length, out.pad = length, self.pad[rows]
        return out

    def copy_rows(self, src: KVCache, src_row: int, dst_row: int, lo: int, hi: int) -> None:
        """Copy slots ``lo:hi`` of ``src``'s row ``src_row`` into this cache's row ``dst_row`` (every layer)."""
        for d, s in zip(self.layers, src.layers):
            d.k[dst_row, :, lo:hi] = s.k[src_row, :, lo:hi]
            d.v[dst_row, :, lo:hi] = s.v[src_row, :, lo:hi]

    def positions_and_mask(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For queries in cache ``slots`` ([T] or [B, T]): positions [B, T] (counted from each row's first real
        token) and the attention mask [B, 1, T, length]: a query sees the real tokens at or before its slot. A
        padding query sees itself only, so its (unused) output stays finite."""
        slots = slots.expand(self.pad.size(0), -1)  # [B, T]
        key = torch.arange(self.length, device=slots.device)
        at_or_before = key <= slots[..., None]  # [B, T, length]
        real = key >= self.pad[:, None, None]
        mask = at_or_before & (real | (key == slots[..., None]))
        return (slots - self.pad[:, None]).clamp(min=0), mask[:, None]


class PackedCache:
    """Several prompts' prefill passes as one forward pass over their tokens laid end to end ([1, N]): segment
    ``(row, a, b)`` feeds slots ``[a, b)`` of the pool's row ``row``, and its tokens are the next ``b - a`` of the
    input. The products see N rows; each segment's keys and values go to its own row, and its queries attend over
    that row alone, through the same view, slots and mask as a pass of that segment alone
    (:meth:`PackedLayerCache.attend`), so where the products give each row the same bits whatever the others are
    (:func:`gptlab.kernels.row_invariant`) a segment's keys, values and hidden states are those of its pass alone.
    The serving scheduler prefills newcomers with it (vLLM's varlen prefill does the same on GPUs)."""

    def __init__(self, pool: KVCache, segments: list[tuple[int, int, int]]) -> None:
        device = pool.pad.device
        views = [pool.view(slice(row, row + 1), b) for row, _, b in segments]
        slots = [torch.arange(a, b, device=device) for _, a, b in segments]
        masks = [view.positions_and_mask(s)[1] for view, s in zip(views, slots)]
        bounds = [0]
        for s in slots:
            bounds.append(bounds[-1] + s.numel())
        self.spans = list(itertools.pairwise(bounds))
        self.slots = torch.cat(slots)
        self.layers = [
            PackedLayerCache([(v.layers[i], s, m) for v, s, m in zip(views, slots, masks)], self.spans)
            for i in range(len(pool.layers))
        ]
        self.pad = torch.zeros(1, dtype=torch.long, device=device)  # (what the image prefix reads: never packed)

    def positions_and_mask(self, slots: torch.Tensor) -> tuple[torch.Tensor, None]:
        """Positions [1, N] (a prompt's slots: no padding); no mask, each segment brings its own."""
        return self.slots[None], None


class PackedLayerCache:
    """One layer of a :class:`PackedCache`: per segment, its row's cache view, slots and mask, and its span of the
    packed tokens."""

    def __init__(
        self, segments: list[tuple[LayerCache, torch.Tensor, torch.Tensor]], spans: list[tuple[int, int]]
    ) -> None:
        self.segments, self.spans = segments, spans

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attention: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """``attention(q, k, v, mask)`` of each segment over its own row, after writing its keys and values there;
        ``q``, ``k``, ``v`` [1, heads, N, head_dim] -> [1, heads, N, head_dim]."""
        out = []
        for (cache, slots, mask), (s, e) in zip(self.segments, self.spans):
            ks, vs = cache.update(slots, k[:, :, s:e], v[:, :, s:e])
            out.append(attention(q[:, :, s:e], ks, vs, mask))
        return torch.cat(out, dim=2)
