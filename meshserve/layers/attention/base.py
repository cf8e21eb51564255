"""The attention-backend interface. A backend reads the paged KV pool; models only call
`AttentionLayer`, which stores the new tokens' keys and values and hands the attention to the
backend carried by the ForwardBatch."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

from meshserve.executor.forward_batch import ForwardMode

if TYPE_CHECKING:
    from meshserve.executor.forward_batch import ForwardBatch
    from meshserve.layers.attention.layer import AttentionLayer


class AttentionBackend(ABC):
    # True when decode() reads only device tensors of the ForwardBatch (never `batch.host`), so a
    # decode step can be captured once in a CUDA graph and replayed.
    supports_cuda_graph = False

    def forward(self, layer: AttentionLayer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                batch: ForwardBatch) -> torch.Tensor:
        """q: [T, Hq, D]; k, v: [T, Hkv, D] of the new tokens, already in the pool (AttentionLayer
        stores them). Returns [T, Hq, D]."""
        if batch.mode is ForwardMode.DECODE:
            return self.decode(layer, q, batch)
        return self.extend(layer, q, k, v, batch)

    @abstractmethod
    def extend(self, layer: AttentionLayer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               batch: ForwardBatch) -> torch.Tensor:
        """k, v: the new tokens' keys and values (already in the pool too)."""

    @abstractmethod
    def decode(self, layer: AttentionLayer, q: torch.Tensor, batch: ForwardBatch) -> torch.Tensor: ...
