"""What the kernels ask of the CUDA device they launch on: the multiprocessor count (grid sizes),
the compute capability (programmatic dependent launch) and the shared memory one program may
take (tile sizes). Each is asked once per device and cached: launches read them inside CUDA
graph capture and on every decode step, where a driver query would cost host time."""

from __future__ import annotations

import functools

import torch
import triton


def device_index(device: torch.device) -> int:
    """`device`'s index; a bare "cuda" means the current device, as torch allocates on it."""
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.cache
def _max_shared(index: int) -> int:
    return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of the CUDA `device`."""
    return _sm_count(device_index(device))


def capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) compute capability of the CUDA `device`."""
    return _capability(device_index(device))


def max_shared_bytes(device: torch.device) -> int | None:
    """The shared memory a program may opt in to on `device` (Triton's own limit when it
    compiles); None off CUDA (Triton's interpreter has none)."""
    return _max_shared(device_index(device)) if device.type == "cuda" else None
