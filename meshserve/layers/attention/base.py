"""The attention-backend interface. A backend reads the paged KV pool; models only call
`AttentionLayer`, which hands the new tokens to the backend carried by the ForwardBatch. Extend
steps store the new tokens (AttentionLayer.store_new_tokens) before the backend runs; in decode
steps the backend does it, so a backend may fuse the rotation and the store into its kernel."""

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
    # True when the backend accepts values narrower than keys (AttentionLayer.v_head_dim) read
    # from KVPool's latent layout: multi-head latent attention.
    supports_latent_kv = False

    def forward(self, layer: AttentionLayer, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """q: [T, Hq, D]; k, v: [T, Hkv, D] of the new tokens as projected: not yet rotated, not
        yet in the pool. Returns [T, Hq, D]."""
        if batch.mode is ForwardMode.DECODE:
            return self.decode(layer, positions, q, k, v, batch)
        q, k = layer.store_new_tokens(positions, q, k, v, batch)
        return self.extend(layer, q, k, v, batch)

    @abstractmethod
    def extend(self, layer: AttentionLayer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               batch: ForwardBatch) -> torch.Tensor:
        """q, k rotated; k, v: the new tokens' keys and values, already in the pool too."""

    @abstractmethod
    def decode(self, layer: AttentionLayer, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """One new token per sequence, as projected (see forward): the backend brings it into the
        pool, with layer.store_new_tokens or inside its own kernel."""
