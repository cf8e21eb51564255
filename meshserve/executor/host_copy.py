"""Host values to the device without making the host wait."""

from __future__ import annotations

import torch


def to_device_async(values: list | torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`values` as a `dtype` tensor on `device`, copied without a host sync. On CUDA the copy goes
    through a pinned staging buffer: only from pinned memory is a copy truly asynchronous — from
    pageable memory it may wait for the device's queued work, such as a decode step in flight."""
    host = values.to(dtype) if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)
