"""Byte ranges of a request's KV cache, as the (address, length) rows a transfer backend moves.

A KV pool is a list of base buffers (each layer's K and V tensor), each an array of equal-sized
items (a token slot, or a page of slots) indexed from 0. A request owns some item indices, in
token order. Every base contributes one row per run of consecutive indices, so a request whose
slots are contiguous costs one row per buffer instead of one per token; the row count, not the
byte count, is what makes small pages slow on the wire (35 us per entry on Mooncake TCP).
"""

from __future__ import annotations

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


def _rows(bases: list[int], item_bytes: int, items: np.ndarray, starts: np.ndarray,
          lengths: np.ndarray) -> np.ndarray:
    base = np.asarray(bases, dtype=np.int64)[:, None]  # (B, 1) against (R,) runs: base-major rows
    rows = np.empty((base.shape[0], starts.shape[0], 2), dtype=np.int64)
    rows[:, :, 0] = base + items[starts] * item_bytes
    rows[:, :, 1] = lengths * item_bytes
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
    return _rows(bases, item_bytes, items, starts, lengths)


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
    return (_rows(src_bases, item_bytes, src_items, starts, lengths),
            _rows(dst_bases, item_bytes, dst_items, starts, lengths))
