"""The paged KV cache: per-layer key/value tensors, a slot allocator, and the request-to-token table.

Page size is 1 token: a "slot" is one token's K and V in every layer. Slot 0 is never handed
out; it is the write target for padding entries (a CUDA-graph batch padded to a captured size),
so padding can never overwrite a live request's cache.
"""

from __future__ import annotations

import numpy as np
import torch


class KVPool:
    def __init__(self, *, size: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        if size < 1:
            raise ValueError(f"KV pool needs at least one slot, got {size}")
        self.size = size
        shape = (size + 1, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.device = device
        self._free = torch.arange(1, size + 1, dtype=torch.int64)  # on CPU: allocation is host bookkeeping
        self._num_free = size

    @staticmethod
    def bytes_per_token(*, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def num_free(self) -> int:
        return self._num_free

    def free_slots(self) -> torch.Tensor:
        """A copy of the free list (read-only accounting, for tests and debugging)."""
        return self._free[: self._num_free].clone()

    def alloc(self, n: int) -> torch.Tensor | None:
        """n free slots (int64, CPU), or None when fewer than n are free (the caller evicts or retracts)."""
        if n > self._num_free:
            return None
        start = self._num_free - n
        slots = self._free[start : self._num_free].clone()
        self._num_free = start
        return slots

    def free(self, slots: torch.Tensor) -> None:
        n = slots.numel()
        if n == 0:
            return
        if self._num_free + n > self.size:
            raise RuntimeError("KV pool double free: more slots returned than were allocated")
        self._free[self._num_free : self._num_free + n] = slots.to(torch.int64).cpu()
        self._num_free += n

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Slot slots[i] of `layer` gets k[i] and v[i] ([T, kv heads, head_dim] each). On CUDA the
        attention layer writes with the rotary kernel instead (kernels/rotary.py)."""
        self.k[layer][slots] = k
        self.v[layer][slots] = v

    def clear(self) -> None:
        """Forget every allocation (flush). Only valid when no request holds slots."""
        self._free = torch.arange(1, self.size + 1, dtype=torch.int64)
        self._num_free = self.size


_KEEP_HOST_ROW = 8192  # slots of host row capacity kept across requests


class ReqToTokenPool:
    """Row r lists, in order, the KV slots of the request that owns row r.

    Kept twice: `table` on the device, read by the attention kernels, and a host copy the
    scheduler reads without waiting for the device (with a decode step in flight, reading the
    device table would wait for that step). The slots of a step's new tokens reach the device
    table through the runner, from the step's own inputs; the scheduler `record`s them on the
    host. Slots of a cached prefix are `assign`ed to both."""

    def __init__(self, *, max_requests: int, max_context: int, device: torch.device) -> None:
        self.table = torch.zeros((max_requests, max_context), dtype=torch.int64, device=device)
        self._max_context = max_context
        self._host = [np.zeros(0, dtype=np.int64) for _ in range(max_requests)]  # grown on demand
        self._free_rows = list(range(max_requests - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free_rows)

    def alloc(self) -> int | None:
        return self._free_rows.pop() if self._free_rows else None

    def free(self, row: int) -> None:
        if len(self._host[row]) > _KEEP_HOST_ROW:  # host memory follows the live requests
            self._host[row] = self._host[row][:_KEEP_HOST_ROW].copy()
        self._free_rows.append(row)

    def assign(self, row: int, start: int, slots: torch.Tensor) -> None:
        """Row `row` holds `slots` (CPU int64) from position `start` on, host and device."""
        self.table[row, start : start + slots.numel()] = slots.to(self.table.device)
        self.record(row, start, slots)

    def record(self, row: int, start: int, slots: torch.Tensor) -> None:
        """Host copy only: row `row` holds `slots` (CPU int64) from position `start` on."""
        end = start + slots.numel()
        self._host_row(row, end)[start:end] = slots.numpy()

    def record_each(self, rows: list[int], positions: list[int], slots: torch.Tensor) -> None:
        """Host copy only, one slot per row: row rows[i] holds slots[i] at positions[i]."""
        for row, position, slot in zip(rows, positions, slots.tolist()):
            self._host_row(row, position + 1)[position] = slot

    def slots(self, row: int, end: int, start: int = 0) -> torch.Tensor:
        """A copy, on the CPU, of row `row`'s slots in [start, end)."""
        return torch.from_numpy(self._host[row][start:end].copy())

    def _host_row(self, row: int, length: int) -> np.ndarray:
        held = self._host[row]
        if len(held) < length:  # grow geometrically: a decode step adds one slot at a time
            grown = np.zeros(min(self._max_context, max(length, 2 * len(held))), dtype=np.int64)
            grown[: len(held)] = held
            self._host[row] = held = grown
        return held
