"""ForwardBatch: everything one forward step needs, passed explicitly through the model."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from meshserve.cache.kv_pool import KVPool, ReqToTokenPool
    from meshserve.layers.attention.base import AttentionBackend


class ForwardMode(enum.Enum):
    EXTEND = "extend"  # new tokens after a (possibly empty) cached prefix: prefill and chunks of it
    DECODE = "decode"  # exactly one new token per sequence


@dataclass
class ForwardBatch:
    mode: ForwardMode
    input_ids: torch.Tensor  # [T] all new tokens of the batch, sequence after sequence
    positions: torch.Tensor  # [T]
    out_cache_loc: torch.Tensor  # [T] KV slot each new token is written to
    req_rows: list[int]  # ReqToTokenPool row per sequence
    seq_lens: list[int]  # tokens per sequence after this step (prefix + new)
    extend_lens: list[int]  # new tokens per sequence (all 1 in decode)
    kv_pool: KVPool
    req_to_token: ReqToTokenPool
    attn_backend: AttentionBackend

    @property
    def batch_size(self) -> int:
        return len(self.seq_lens)

    @property
    def prefix_lens(self) -> list[int]:
        return [total - new for total, new in zip(self.seq_lens, self.extend_lens)]

    def last_token_index(self) -> torch.Tensor:
        """Index into the [T] token axis of each sequence's last new token (where logits are taken)."""
        ends = torch.tensor(self.extend_lens, dtype=torch.int64).cumsum(0) - 1
        return ends.to(self.input_ids.device)
