"""The KV cache as a value: preallocated keys and values per layer, the padding mask so far, the filled length.

A cache goes into :meth:`Llava.forward <minillava.model.Llava.forward>` and comes back out, so it can be held,
copied, cropped to a prefix or forked without recomputing anything. Nothing about it lives on the model.

Slots are columns shared by every row: slot ``t`` holds each row's ``t``-th fed token. A row that has fewer
real tokens (left padding, or a request that joined a serving batch late) has its unused slots marked False in
:attr:`mask`; RoPE positions count a row's real tokens only, so masked slots change nothing. Slots at and past
:attr:`filled` are always False in the mask, so a static step can read the whole buffer and mask by value.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class KVCache:
    """Keys and values ``[batch, kv_heads, max_len, head_dim]`` per decoder layer, and a ``[batch, max_len]``
    bool :attr:`mask` of the slots that hold a real token.

    Make one with :meth:`Llava.new_cache <minillava.model.Llava.new_cache>` (or let ``forward(use_cache=True)``
    size one). :attr:`filled` is a host-side count, so reading it never waits for the device.
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], mask: torch.Tensor, filled: int = 0):
        self.keys = keys
        self.values = values
        self.mask = mask
        self.filled = filled
        # True once a slot below ``filled`` may be masked out: attention then needs an explicit mask. A host flag,
        # so the unpadded fast path never has to read the mask back from the device.
        self.padded = False

    @classmethod
    def empty(
        cls,
        num_layers: int,
        batch: int,
        kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> KVCache:
        """A cache of ``max_len`` zeroed slots per row, none filled."""
        if batch < 1 or max_len < 1:
            raise ValueError(f"a cache needs batch >= 1 and max_len >= 1, got batch={batch}, max_len={max_len}")
        shape = (batch, kv_heads, max_len, head_dim)
        keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        return cls(keys, values, torch.zeros(batch, max_len, dtype=torch.bool, device=device))

    @property
    def batch(self) -> int:
        return self.mask.shape[0]

    @property
    def max_len(self) -> int:
        return self.mask.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.keys[0].dtype if self.keys else torch.float32

    @property
    def device(self) -> torch.device:
        return self.mask.device

    def __repr__(self) -> str:
        return (
            f"KVCache(layers={len(self.keys)}, batch={self.batch}, max_len={self.max_len}, filled={self.filled}, "
            f"dtype={self.dtype})"
        )

    def crop(self, n: int) -> None:
        """Keep slots ``< n`` and forget the rest (the next tokens are written from slot ``n``)."""
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= self.filled:
            raise ValueError(f"crop needs 0 <= n <= filled ({self.filled}), got {n!r}")
        self.mask[:, n:] = False
        self.filled = n
        self.padded = self.padded and not bool(self.mask[:, :n].all())

    def copy(self) -> KVCache:
        """An independent copy: writing to either never changes the other."""
        other = KVCache(
            [k.clone() for k in self.keys], [v.clone() for v in self.values], self.mask.clone(), self.filled
        )
        other.padded = self.padded
        return other

    def grow(self, length: int) -> None:
        """Make room for ``length`` slots in all, keeping what is filled: the buffers are reallocated (to at least
        twice their size, so stepping one token at a time stays cheap) only when they are too short."""
        if length <= self.max_len:
            return
        new_len = max(length, 2 * self.max_len)

        self.keys = [_extend(k, new_len, self.filled) for k in self.keys]
        self.values = [_extend(v, new_len, self.filled) for v in self.values]
        mask = self.mask.new_zeros(self.batch, new_len)
        mask[:, : self.filled] = self.mask[:, : self.filled]
        self.mask = mask

    def mark(self, attention_mask: torch.Tensor | None, length: int) -> None:
        """Record the padding of ``length`` new slots from :attr:`filled`: ``attention_mask`` covers past and new
        slots ``[batch, filled + length]`` (transformers' convention) or is None (all real)."""
        start, end = self.filled, self.filled + length
        if attention_mask is None:
            self.mask[:, start:end] = True
            return
        if tuple(attention_mask.shape) != (self.batch, end):
            raise ValueError(
                f"with a cache, attention_mask must cover past and new tokens: [{self.batch}, {end}], "
                f"got {list(attention_mask.shape)}"
            )
        real = attention_mask.to(device=self.mask.device, dtype=torch.bool)
        self.mask[:, :end] = real
        self.padded = self.padded or not bool(real.all())

    def write_row(self, row: int, other: KVCache, end: int) -> None:
        """Copy row 0 of ``other`` (a one-row cache) into ``row`` so that its filled slots end at slot ``end``.

        The row's slots before them are masked out, exactly like left padding; RoPE positions come from the mask,
        so the copied keys keep their meaning. This is how a request joins a running batch at its current column.
        """
        n = other.filled
        if not 0 <= row < self.batch:
            raise ValueError(f"row {row} is outside the cache's {self.batch} rows")
        if not n <= end <= self.max_len or len(other.keys) != len(self.keys):
            raise ValueError(f"cannot place {n} filled slots to end at slot {end} of a {self.max_len}-slot cache")
        for mine, theirs in zip(self.keys + self.values, other.keys + other.values, strict=True):
            mine[row, :, end - n : end] = theirs[0, :, :n]
        self.mask[row] = False
        self.mask[row, end - n : end] = other.mask[0, :n]
        self.padded = True
        self.filled = max(self.filled, end)

    def compact(self, rows: Sequence[int] | None = None) -> None:
        """Drop the masked slots: each of ``rows`` (default: every row) keeps its real slots, in order, moved to end
        at the new :attr:`filled`, which becomes the most real slots any kept row has; the other rows are emptied.

        RoPE positions count a row's real slots only, so every moved key keeps its meaning. A serving batch calls
        this when its shared column nears the end of the buffers: rows that joined late, or finished, leave slots
        that no remaining row uses.
        """
        keep = torch.zeros(self.batch, dtype=torch.bool, device=self.device)
        if rows is None:
            keep[:] = True
        else:
            rows = list(rows)
            if any(isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < self.batch for r in rows):
                raise ValueError(f"rows must be row indices in [0, {self.batch}), got {rows!r}")
            keep[rows] = True
        real = self.mask[:, : self.filled] & keep[:, None]
        end = int(real.sum(dim=1).max())
        # A stable sort of each row's mask puts its masked slots first and its real ones last, in their order; the
        # last ``end`` indices of every row then cover all of its real slots.
        order = torch.sort(real.to(torch.uint8), dim=1, stable=True).indices[:, self.filled - end :]
        for buffer in self.keys + self.values:
            batch, heads, _, dim = buffer.shape
            buffer[:, :, :end] = buffer.gather(2, order[:, None, :, None].expand(batch, heads, end, dim))
        self.mask[:, :end] = real.gather(1, order)
        self.mask[:, end:] = False
        self.filled = end
        self.padded = not bool(self.mask[:, :end].all())


def _extend(buffer: torch.Tensor, length: int, keep: int) -> torch.Tensor:
    """``buffer`` [B, H, S, D] reallocated to ``length`` slots, its first ``keep`` slots copied."""
    out = buffer.new_zeros(*buffer.shape[:2], length, buffer.shape[3])
    out[:, :, :keep] = buffer[:, :, :keep]
    return out
