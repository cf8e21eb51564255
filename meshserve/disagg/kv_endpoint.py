"""KVEndpoint: one scheduler rank's end of prefill-decode disaggregation — its KV pool registered
with a transfer backend, its control channel, and the layout a peer must match."""

from __future__ import annotations

import socket
import uuid
from dataclasses import dataclass

import numpy as np
import torch

from meshserve.cache.kv_pool import KVPool
from meshserve.cluster.fingerprint import ModelFiles
from meshserve.config.model_config import ModelConfig
from meshserve.config.server_args import ServerArgs
from meshserve.disagg.control import ControlChannel
from meshserve.disagg.kv_ranges import HeadSlice, paired_head_ranges
from meshserve.disagg.protocol import KVLayout
from meshserve.disagg.transfer import MemoryRegion, TransferBackend, create_backend

_WILDCARDS = ("", "0.0.0.0", "::")
_SHORT = 12  # hash characters shown in a layout diff


def reachable_host(host: str) -> str:
    """The address peers reach this server on: --host, or this machine's name's address when
    --host listens everywhere (sockets still bind --host; only the advertised address differs)."""
    return socket.gethostbyname(socket.gethostname()) if host in _WILDCARDS else host


def model_identity(model_config: ModelConfig) -> str:
    files = ModelFiles.of(model_config.model_path, model_config.tokenizer_path)
    return (f"config.json {files.config_hash[:_SHORT]}, weights {files.weights_hash[:_SHORT]}, "
            f"tokenizer {files.tokenizer_hash[:_SHORT]}")


@dataclass
class KVEndpoint:
    backend: TransferBackend
    control: ControlChannel
    layout: KVLayout
    bases: list[int]  # every layer's K and V buffer, in the same order on both sides
    item_bytes: int  # one slot of one buffer
    timeout_s: float  # --disaggregation-transfer-timeout: the deadline of every PD state
    tp_rank: int

    @classmethod
    def open(cls, args: ServerArgs, model_config: ModelConfig, pool: KVPool, *, tp_rank: int,
             tp_size: int) -> KVEndpoint:
        d = args.disagg
        host = reachable_host(args.http.host)
        devices = d.disaggregation_ib_device.split(",") if d.disaggregation_ib_device else None
        backend = create_backend(d.disaggregation_transfer_backend, host=host, ib_devices=devices,
                                 agent_name=f"meshserve-{d.disaggregation_mode}-{tp_rank}-{uuid.uuid4().hex[:8]}")
        buffers = pool.layer_buffers()
        device = buffers[0].device
        backend.register([MemoryRegion(t.data_ptr(), t.nbytes, device.type, device.index or 0) for t in buffers])
        k = pool.k[0]
        layout = KVLayout(model=model_identity(model_config), dtype=str(k.dtype).removeprefix("torch."),
                          num_layers=len(pool.k), kv_heads=k.shape[1], head_dim=k.shape[2],
                          page_size=pool.page_size, tp_size=tp_size, kv_scales=pool.scales_digest())
        return cls(backend=backend, control=ControlChannel(args.http.host, host),
                   layout=layout, bases=[t.data_ptr() for t in buffers], item_bytes=k.stride(0) * k.element_size(),
                   timeout_s=d.disaggregation_transfer_timeout, tp_rank=tp_rank)

    def rows_to(self, peer_bases: list[int], src_slots: torch.Tensor, dst_slots: list[int], *,
                head_start: int, heads: int) -> tuple[np.ndarray, np.ndarray]:
        """(address, length) rows copying KV heads [head_start, head_start + heads) of our slot
        src_slots[i] onto the peer's slot dst_slots[i] (which holds just those heads) in every
        buffer; with all our heads, runs consecutive on both sides become one row."""
        head_bytes = self.item_bytes // self.layout.kv_heads
        return paired_head_ranges(self.bases, peer_bases, src_slots.numpy(), np.asarray(dst_slots),
                                  HeadSlice(self.layout.kv_heads, head_bytes, head_start, head_start + heads),
                                  HeadSlice(heads, head_bytes, 0, heads))

    def close(self) -> None:
        self.control.close()
        self.backend.close()
