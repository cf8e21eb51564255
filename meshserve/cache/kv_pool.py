"""The paged KV cache: per-layer key/value tensors, a page allocator, and the request-to-token table.

A "slot" is one token's K and V in every layer: slot s of layer l is `k[l][s]` and `v[l][s]`.
Slots are handed out in pages of `page_size` tokens (`--page-size`): page p holds slots
[p * page_size, (p + 1) * page_size). The layout is the same for every page size, so the
attention kernels, which read per-token slots through the request-to-token table, do not know
pages exist; pages only make a sequence's slots contiguous runs (one KV-transfer descriptor per
run per layer instead of per token). A sequence keeps position i at offset i % page_size of its
page: it fills its last page before taking a new one, and prefix caches share whole pages only.

Page 0 is never handed out; slot 0 is the write target for padding entries (a CUDA-graph batch
padded to a captured size), so padding can never overwrite a live request's cache.

Two layouts per token and layer: K and V of `num_kv_heads` heads of `head_dim` each (two buffers),
or MLA's latent layout (`latent_v_dim`): one buffer of one head holding [c_kv | k_rope] (head_dim =
kv_lora_rank + qk_rope_head_dim), whose leading latent_v_dim (= kv_lora_rank) features are also
the values — `v[layer]` is a view into `k[layer]`, with K's strides, and takes no memory.

FP8 storage (`--kv-cache-dtype fp8_e4m3`): the buffers hold float8_e4m3fn and each layer has one
scale for K and one for V (per tensor; 1.0 unless the checkpoint gives `k_scale`/`v_scale`): a
stored value is round_fp8(clamp(x / scale)), read back as stored * scale. Every writer (`write`,
the rotary store kernel, the fused decode kernel) and every reader (`gather`, the Triton
kernels) applies them, so a token's K/V are the same rounded values whichever path touches them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch

FP8_KV_DTYPES = (torch.float8_e4m3fn,)
_FP8_MAX = 448.0  # largest float8_e4m3fn; larger values are clamped before the cast (no NaN)


def quantize_kv(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """x as an FP8 pool stores it (the torch path; the kernels do the same)."""
    return (x.float() / scale).clamp(-_FP8_MAX, _FP8_MAX).to(dtype)


class KVPool:
    def __init__(self, *, size: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, page_size: int = 1,
                 latent_v_dim: int | None = None, scales: Sequence[tuple[float, float]] | None = None) -> None:
        """`size` tokens, rounded down to whole pages, plus the reserved page 0. With
        `latent_v_dim`, the MLA layout (see the module docstring). `dtype` is what the buffers
        hold; an FP8 dtype takes per-layer (K, V) `scales` (default 1.0)."""
        self.quantized = dtype in FP8_KV_DTYPES
        if self.quantized and latent_v_dim is not None:
            raise ValueError("an FP8 KV cache with the latent (MLA) layout is not supported yet")
        scales = list(scales) if scales is not None else [(1.0, 1.0)] * num_layers
        if len(scales) != num_layers or (not self.quantized and any(s != (1.0, 1.0) for s in scales)):
            raise ValueError("KV scales: one (K, V) pair per layer, and only for an FP8 cache")
        self.k_scale = [float(k) for k, _ in scales]
        self.v_scale = [float(v) for _, v in scales]
        self.dtype = dtype
        if size < page_size:
            raise ValueError(f"KV pool needs at least one page of {page_size} slots, got {size}")
        self.page_size = page_size
        self.num_pages = size // page_size  # allocatable pages: 1 .. num_pages
        self.size = self.num_pages * page_size  # allocatable slots, in tokens (the scheduler's unit)
        shape = ((self.num_pages + 1) * page_size, num_kv_heads, head_dim)
        if latent_v_dim is not None and (num_kv_heads != 1 or not 0 < latent_v_dim <= head_dim):
            raise ValueError(f"the latent KV layout has one head whose first {latent_v_dim} of {head_dim} "
                             f"features are the values; got {num_kv_heads} heads")
        self.latent_v_dim = latent_v_dim
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [k[..., :latent_v_dim] for k in self.k] if latent_v_dim is not None else \
            [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.bytes_per_slot = self.bytes_per_token(num_layers=num_layers, num_kv_heads=num_kv_heads,
                                                   head_dim=head_dim, dtype=dtype, latent=latent_v_dim is not None)
        self.device = device
        self._offsets = torch.arange(page_size, dtype=torch.int64)
        self.clear()

    @staticmethod
    def bytes_per_token(*, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                        latent: bool = False) -> int:
        buffers = 1 if latent else 2
        return buffers * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def layer_buffers(self) -> list[torch.Tensor]:
        """Every KV buffer, K then V of each layer (K alone in the latent layout, where V lies in
        it): [num_slots, kv heads, head_dim] each, slot s (of page s // page_size) at row s — what a
        KV transfer registers and addresses."""
        if self.latent_v_dim is not None:
            return list(self.k)
        return [t for layer in zip(self.k, self.v) for t in layer]

    @property
    def num_free(self) -> int:
        """Free slots, in tokens (whole free pages)."""
        return self._num_free * self.page_size

    @property
    def num_free_pages(self) -> int:
        return self._num_free

    def free_slots(self) -> torch.Tensor:
        """Every slot of every free page (read-only accounting, for tests and debugging)."""
        return self.page_slots(self._free[: self._num_free])

    def page_slots(self, pages: torch.Tensor) -> torch.Tensor:
        """The slots of `pages`, page after page, each in offset order."""
        return (pages[:, None] * self.page_size + self._offsets).flatten()

    def alloc_pages(self, n: int) -> torch.Tensor | None:
        """n free pages (int64, CPU), or None when fewer than n are free (the caller evicts or retracts)."""
        if n > self._num_free:
            return None
        start = self._num_free - n
        pages = self._free[start : self._num_free].clone()
        self._num_free = start
        return pages

    def pages_for(self, length: int, n: int) -> int:
        """New pages a sequence holding `length` positions needs for n more: its last page's free
        tail comes first."""
        return self._pages_holding(length + n) - self._pages_holding(length)

    def _pages_holding(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def alloc(self, n: int, after: int | None = None) -> torch.Tensor | None:
        """Slots for a sequence's next n positions, or None when too few pages are free. `after`
        is the slot of its newest position when that is not the last of its page: the page's
        following slots come first. Without it the sequence is page-aligned (or new)."""
        tail = torch.empty(0, dtype=torch.int64)
        if after is not None:
            room = self.page_size - 1 - after % self.page_size
            tail = torch.arange(after + 1, after + 1 + min(room, n), dtype=torch.int64)
        pages = self.alloc_pages(self._pages_holding(n - tail.numel()))
        if pages is None:
            return None
        return torch.cat([tail, self.page_slots(pages)[: n - tail.numel()]])

    def free(self, slots: torch.Tensor) -> None:
        """Give back the pages of `slots`: whole pages the caller owns, in offset order, where a
        page is named by its first slot (a partial page's unused tail need not be listed)."""
        pages = slots[slots % self.page_size == 0] // self.page_size
        n = pages.numel()
        if n == 0:
            return
        if self._num_free + n > self.num_pages:
            raise RuntimeError("KV pool double free: more pages returned than were allocated")
        self._free[self._num_free : self._num_free + n] = pages.to(torch.int64).cpu()
        self._num_free += n

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Slot slots[i] of `layer` gets k[i] and v[i] ([T, kv heads, head_dim] each). On CUDA the
        attention layer writes with the rotary kernel instead (kernels/rotary.py)."""
        if self.quantized:
            k, v = quantize_kv(k, self.k_scale[layer], self.dtype), quantize_kv(v, self.v_scale[layer], self.dtype)
        self.k[layer][slots] = k
        if self.latent_v_dim is None:  # latent layout: v is k's leading features, already written
            self.v[layer][slots] = v

    def scales_digest(self) -> str:
        """What a KV transfer's peer must share for the bytes to mean the same values: "none" for
        an unquantized pool, else a digest of every layer's K and V scale."""
        if not self.quantized:
            return "none"
        values = ",".join(f"{k!r}/{v!r}" for k, v in zip(self.k_scale, self.v_scale))
        return hashlib.sha256(values.encode()).hexdigest()[:16]

    def gather(self, layer: int, slots: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of `slots` (any index shape) of `layer`, dequantized to `dtype` when FP8."""
        k, v = self.k[layer][slots], self.v[layer][slots]
        if not self.quantized:
            return k, v
        return (k.float() * self.k_scale[layer]).to(dtype), (v.float() * self.v_scale[layer]).to(dtype)

    def clear(self) -> None:
        """Forget every allocation (flush). Only valid when no request holds slots."""
        self._free = torch.arange(1, self.num_pages + 1, dtype=torch.int64)  # on CPU: host bookkeeping
        self._num_free = self.num_pages


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

    def slot(self, row: int, position: int) -> int:
        """Row `row`'s slot at `position` (host copy)."""
        return int(self._host[row][position])

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
