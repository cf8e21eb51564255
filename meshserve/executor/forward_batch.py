"""ForwardBatch: everything one forward step needs, passed explicitly through the model."""

from __future__ import annotations

import enum
import functools
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
    req_rows: torch.Tensor  # [B] ReqToTokenPool row per sequence (device)
    seq_lens: torch.Tensor  # [B] tokens per sequence after this step, prefix + new (device)
    kv_pool: KVPool
    req_to_token: ReqToTokenPool
    attn_backend: AttentionBackend
    # Host copies, for backends that loop over sequences on the host. None inside a CUDA graph,
    # whose replays must not depend on host values.
    host: HostLens | None = None
    extend_lens: torch.Tensor | None = None  # [B] new tokens per sequence (device); EXTEND only

    @property
    def batch_size(self) -> int:
        return self.seq_lens.shape[0]

    @functools.cached_property
    def padded_kv_slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every sequence's KV slots padded to the longest: ([B, L] slot ids, [B, L] visible).
        Entries past a sequence's length are stale but valid slot ids, hidden by `visible`.
        Computed once per step and shared by every layer."""
        assert self.host is not None
        max_len = max(self.host.seq_lens)
        slots = self.req_to_token.table[self.req_rows, :max_len]
        visible = torch.arange(max_len, device=slots.device)[None, :] < self.seq_lens[:, None]
        return slots, visible

    @functools.cached_property
    def extend_starts(self) -> torch.Tensor:
        """[B] index of each sequence's first new token on the [T] axis (device); computed once
        per step and shared by every layer."""
        assert self.extend_lens is not None
        return self.extend_lens.cumsum(0) - self.extend_lens

    def last_token_index(self) -> torch.Tensor | None:
        """Index into the [T] token axis of each sequence's last new token (where logits are
        taken); None in decode, where every token is its sequence's last."""
        if self.mode is ForwardMode.DECODE:
            return None
        return self.extend_starts + self.extend_lens - 1


@dataclass(frozen=True)
class HostLens:
    req_rows: list[int]
    seq_lens: list[int]
    extend_lens: list[int]

    @functools.cached_property
    def max_extend_len(self) -> int:
        """Computed once per step, shared by every layer."""
        return max(self.extend_lens)
