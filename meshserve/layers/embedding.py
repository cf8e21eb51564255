"""Vocabulary-parallel token embedding and LM head.

The vocabulary is padded up to a multiple of the tensor-parallel size and split in contiguous
ranges; rows past the real vocabulary are zero and their logits are cut off before sampling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from meshserve.cluster.comm import SINGLE, RankGroup
from meshserve.layers.dense import dense_linear


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, *, dtype: torch.dtype = torch.float32,
                 tp: RankGroup = SINGLE) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        padded = -(-vocab_size // tp.size) * tp.size
        self.vocab_start, self.vocab_local = tp.shard(padded)
        self.weight = nn.Parameter(torch.zeros(self.vocab_local, hidden_size, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        if loaded.shape[0] != self.vocab_size:
            raise ValueError(f"embedding has {loaded.shape[0]} rows, the config says vocab_size={self.vocab_size}")
        rows = loaded[self.vocab_start : self.vocab_start + self.vocab_local]
        param.data[: rows.shape[0]].copy_(rows)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.vocab_local)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Hidden states to logits. Each rank computes its vocabulary range; ranges are gathered."""

    def __init__(self, vocab_size: int, hidden_size: int, *, dtype: torch.dtype = torch.float32,
                 tp: RankGroup = SINGLE) -> None:
        super().__init__(vocab_size, hidden_size, dtype=dtype, tp=tp)

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        """Share the embedding's weight (tie_word_embeddings); both shard the vocabulary alike."""
        self.weight = embedding.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab_size] float32 logits."""
        local = dense_linear(hidden, self.weight)
        full = self.tp.all_gather(local, dim=-1)
        return full[:, : self.vocab_size].float()
