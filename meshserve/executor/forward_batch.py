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
    def decode_rows(self) -> int:
        """How many sequences at the end of the batch are decodes: each has exactly one new token,
        whose query is its sequence's last position and so sees every key it has. All of them in
        a DECODE step; in an EXTEND step, the decodes riding in a mixed extend step
        (--enable-mixed-chunk: the scheduler appends the running sequences after the prompts).
        Backends attend to these rows as in a decode step and to the rows before them as
        prompts. Counted once per step on the host. Inside an extend CUDA graph (host None; at
        most a few sequences, executor/extend_graph.py) none: its replays cannot depend on the
        step's lengths, and the extend kernel serves one-token rows too, only more slowly."""
        if self.mode is ForwardMode.DECODE:
            return self.batch_size
        return 0 if self.host is None else self.host.trailing_single_tokens

    @functools.cached_property
    def decode_groups(self) -> list[PaddedKV]:
        """The decode rows (decode_rows), sorted by length and packed into groups whose padded
        K/V gather (sequences × longest length) stays within PADDED_GATHER_MAX_TOKENS — so one
        long sequence among many short ones does not pad them all to its length. A sequence
        longer than the bound forms a group alone. Computed once per step and shared by every layer."""
        assert self.host is not None
        host = self.host
        first, tokens = len(host.extend_lens) - self.decode_rows, sum(host.extend_lens)
        # (length, token index, request row) of each decode row (one token each), by length
        decodes = sorted(zip(host.seq_lens[first:], range(tokens - self.decode_rows, tokens), host.req_rows[first:]))
        groups: list[PaddedKV] = []
        begin = 0
        for end, (seq_len, _, _) in enumerate(decodes, start=1):
            # sorted, so this sequence is the longest of the group it would join
            if end - begin > 1 and (end - begin) * seq_len > PADDED_GATHER_MAX_TOKENS:
                groups.append(self._padded(decodes[begin : end - 1]))
                begin = end - 1
        if decodes:
            groups.append(self._padded(decodes[begin:]))
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
    padded batch (the reference backend's way; see ForwardBatch.decode_groups)."""

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

    @functools.cached_property
    def trailing_single_tokens(self) -> int:
        """How many sequences at the end have one new token each (ForwardBatch.decode_rows)."""
        count = 0
        for new in reversed(self.extend_lens):
            if new != 1:
                break
            count += 1
        return count
