"""GPU attention backend: decode through the paged Triton kernel (CUDA-graph safe), extend
through PyTorch's fused SDPA per sequence (flash attention on the GPU)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from meshserve.layers.attention.torch_native import TorchNativeBackend

if TYPE_CHECKING:
    from meshserve.executor.forward_batch import ForwardBatch
    from meshserve.layers.attention.layer import AttentionLayer


class TritonBackend(TorchNativeBackend):
    supports_cuda_graph = True

    def decode(self, layer: AttentionLayer, q: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        from meshserve.layers.attention.triton_decode import decode_attention

        return decode_attention(q, batch.kv_pool.k[layer.layer_id], batch.kv_pool.v[layer.layer_id],
                                batch.req_to_token.table, batch.req_rows, batch.seq_lens, layer.scaling)
