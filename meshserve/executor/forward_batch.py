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

# Largest padded K/V gather, in tokens (sequences × longest length), of one group of one-token
# sequences: the reference backend copies K and V of that many slots per layer and group
# (48 MiB for SmolLM2-135M in float32), whatever the batch's mix of lengths.
PADDED_GATHER_MAX_TOKENS = 1 << 15


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
    # DP attention: this step's token count of every DP group (in DP-rank order), exchanged before
    # the forward so that the MLP's gathers are sized alike on every rank; None otherwise.
    dp_counts: list[int] | None = None

    @property
    def batch_size(self) -> int:
        return self.seq_lens.shape[0]

    @functools.cached_property
    def single_token_groups(self) -> list[PaddedKV]:
        """The sequences with exactly one new token (all of them in decode; the decodes riding
        in a mixed extend step), sorted by length and packed into groups whose padded K/V gather
        (sequences × longest length) stays within PADDED_GATHER_MAX_TOKENS — so one long sequence
        among many short ones does not pad them all to its length. A sequence longer than the
        bound forms a group alone. Computed once per step and shared by every layer."""
        assert self.host is not None
        host = self.host
        singles: list[tuple[int, int, int]] = []  # (length, token index, request row)
        token = 0
        for row, seq_len, new in zip(host.req_rows, host.seq_lens, host.extend_lens):
            if new == 1:
                singles.append((seq_len, token, row))
            token += new
        singles.sort()
        groups: list[PaddedKV] = []
        begin = 0
        for end, (seq_len, _, _) in enumerate(singles, start=1):
            # sorted, so this sequence is the longest of the group it would join
            if end - begin > 1 and (end - begin) * seq_len > PADDED_GATHER_MAX_TOKENS:
                groups.append(self._padded(singles[begin : end - 1]))
                begin = end - 1
        if singles:
            groups.append(self._padded(singles[begin:]))
        return groups

    def _padded(self, seqs: list[tuple[int, int, int]]) -> PaddedKV:
        lens, tokens, rows = (torch.tensor(column, dtype=torch.int64) for column in zip(*seqs))
        device = self.seq_lens.device
        max_len = seqs[-1][0]
        slots = self.req_to_token.table[rows.to(device), :max_len]
        visible = torch.arange(max_len, device=device)[None, :] < lens.to(device)[:, None]
        return PaddedKV(tokens=tokens.to(device), slots=slots, visible=visible)

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
class PaddedKV:
    """Sequences with one new token each, attended together over their K/V gathered into one
    padded batch (the reference backend's way; see ForwardBatch.single_token_groups)."""

    tokens: torch.Tensor  # [B] index of each sequence's new token on the batch's [T] axis
    slots: torch.Tensor  # [B, L] KV slots; entries past a sequence's length are stale but valid
    visible: torch.Tensor  # [B, L] True within the sequence


@dataclass(frozen=True)
class HostLens:
    req_rows: list[int]
    seq_lens: list[int]
    extend_lens: list[int]

    @functools.cached_property
    def max_extend_len(self) -> int:
        """Computed once per step, shared by every layer."""
        return max(self.extend_lens)
