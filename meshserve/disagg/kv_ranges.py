"""Byte ranges of a request's KV cache, as the (address, length) rows a transfer backend moves.

A KV pool is a list of base buffers (each layer's K and V tensor), each an array of equal-sized
items (a token slot, or a page of slots) indexed from 0. A request owns some item indices, in
token order. Every base contributes one row per run of consecutive indices, so a request whose
slots are contiguous costs one row per buffer instead of one per token; the row count, not the
byte count, is what makes small pages slow on the wire (35 us per entry on Mooncake TCP).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _run_bounds(*items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start positions and lengths of the maximal runs i..j over which every array in `items`
    goes up by exactly one from each position to the next."""
    n = items[0].shape[0]
    breaks = np.zeros(max(n - 1, 0), dtype=bool)
    for a in items:
        breaks |= np.diff(a) != 1
    starts = np.concatenate(([0], np.flatnonzero(breaks) + 1)) if n else np.zeros(0, dtype=np.int64)
    lengths = np.diff(np.append(starts, n))
    return starts, lengths


def _rows(bases: list[int], item_bytes: int, first_items: np.ndarray, row_bytes: np.ndarray | int,
          offset: int = 0) -> np.ndarray:
    """One row per (base, first item) pair, base-major: from `offset` bytes into the item, for
    row_bytes (a run's bytes, or a part of one item)."""
    base = np.asarray(bases, dtype=np.int64)[:, None]  # (B, 1) against (R,) runs
    rows = np.empty((base.shape[0], first_items.shape[0], 2), dtype=np.int64)
    rows[:, :, 0] = base + first_items * item_bytes + offset
    rows[:, :, 1] = row_bytes
    return rows.reshape(-1, 2)


def _checked(items: np.ndarray, item_bytes: int) -> np.ndarray:
    items = np.asarray(items)
    if items.ndim != 1 or not np.issubdtype(items.dtype, np.integer):
        raise ValueError(f"items must be a 1-D integer array, got {items.dtype} {items.shape}")
    if item_bytes <= 0:
        raise ValueError(f"item_bytes must be positive, got {item_bytes}")
    if (items < 0).any():
        raise ValueError("item indices must be non-negative")
    return items.astype(np.int64, copy=False)


def kv_ranges(bases: list[int], item_bytes: int, items: np.ndarray) -> np.ndarray:
    """(N, 2) int64 rows (address, length) covering `items` in every base buffer, base by base,
    runs of consecutive indices (in the given order) merged into one row each."""
    items = _checked(items, item_bytes)
    starts, lengths = _run_bounds(items)
    return _rows(bases, item_bytes, items[starts], lengths * item_bytes)


def paired_kv_ranges(src_bases: list[int], dst_bases: list[int], item_bytes: int,
                     src_items: np.ndarray, dst_items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows for copying src_items[i] of src_bases[b] onto dst_items[i] of dst_bases[b]: src and
    dst rows of equal length row by row, as `TransferBackend.write` needs. A run is merged only
    where it is consecutive on both sides."""
    src_items = _checked(src_items, item_bytes)
    dst_items = _checked(dst_items, item_bytes)
    if src_items.shape != dst_items.shape:
        raise ValueError(f"{src_items.shape[0]} source items but {dst_items.shape[0]} destination items")
    if len(src_bases) != len(dst_bases):
        raise ValueError(f"{len(src_bases)} source buffers but {len(dst_bases)} destination buffers")
    starts, lengths = _run_bounds(src_items, dst_items)
    return (_rows(src_bases, item_bytes, src_items[starts], lengths * item_bytes),
            _rows(dst_bases, item_bytes, dst_items[starts], lengths * item_bytes))


@dataclass(frozen=True)
class HeadSlice:
    """Heads [start, stop) of items laid out as [num_heads, head_bytes] (one slot of one layer's
    K or V with page size 1). Prefill and decode servers of different tensor-parallel sizes
    hold different head ranges of the same token, so each side names the heads it moves."""

    num_heads: int
    head_bytes: int
    start: int
    stop: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.stop <= self.num_heads or self.head_bytes <= 0:
            raise ValueError(f"bad head slice {self}")

    @property
    def item_bytes(self) -> int:
        return self.num_heads * self.head_bytes

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.stop == self.num_heads


def paired_head_ranges(src_bases: list[int], dst_bases: list[int], src_items: np.ndarray,
                       dst_items: np.ndarray, src_heads: HeadSlice,
                       dst_heads: HeadSlice) -> tuple[np.ndarray, np.ndarray]:
    """Like `paired_kv_ranges`, moving heads `src_heads` of each source item onto heads
    `dst_heads` of its destination item (the same number of heads, of the same size). Runs merge
    only where both slices are whole items: a partial slice is one row per item and buffer."""
    if src_heads.stop - src_heads.start != dst_heads.stop - dst_heads.start or \
            src_heads.head_bytes != dst_heads.head_bytes:
        raise ValueError(f"head slices differ in size: {src_heads} vs {dst_heads}")
    if src_heads.whole and dst_heads.whole:
        return paired_kv_ranges(src_bases, dst_bases, src_heads.item_bytes, src_items, dst_items)
    src_items = _checked(src_items, src_heads.item_bytes)
    dst_items = _checked(dst_items, dst_heads.item_bytes)
    if src_items.shape != dst_items.shape or len(src_bases) != len(dst_bases):
        raise ValueError("source and destination differ in item or buffer count")
    part = (src_heads.stop - src_heads.start) * src_heads.head_bytes
    return (_rows(src_bases, src_heads.item_bytes, src_items, part, src_heads.start * src_heads.head_bytes),
            _rows(dst_bases, dst_heads.item_bytes, dst_items, part, dst_heads.start * dst_heads.head_bytes))
