"""ForwardBatch's host-side view of a step: which rows are decodes (ForwardBatch.decode_rows)
and how the reference backend groups them (decode_groups)."""

from __future__ import annotations

import pytest
import torch

from meshserve.cache.kv_pool import ReqToTokenPool
from meshserve.executor import forward_batch
from meshserve.executor.forward_batch import ForwardBatch, ForwardMode, HostLens


def _batch(mode: ForwardMode, seq_lens: list[int], extend_lens: list[int]) -> ForwardBatch:
    rows = list(range(len(seq_lens)))[::-1]  # rows out of order
    table = ReqToTokenPool(max_requests=len(rows), max_context=max(seq_lens) + 1, device=torch.device("cpu"))
    for row, total in zip(rows, seq_lens):
        table.assign(row, 0, torch.arange(total) + 1000 * row)
    tokens = sum(extend_lens)
    return ForwardBatch(
        mode=mode, input_ids=torch.zeros(tokens, dtype=torch.int64), positions=torch.zeros(tokens, dtype=torch.int64),
        out_cache_loc=torch.zeros(tokens, dtype=torch.int64), req_rows=torch.tensor(rows),
        seq_lens=torch.tensor(seq_lens), kv_pool=None, req_to_token=table, attn_backend=None,  # type: ignore[arg-type]
        host=HostLens(req_rows=rows, seq_lens=seq_lens, extend_lens=extend_lens),
        extend_lens=torch.tensor(extend_lens))


@pytest.mark.parametrize(("extend_lens", "decodes"), [
    ([37, 1, 70, 1, 1], 2),  # a one-token prompt before a longer one is a prompt row
    ([5, 1], 1),
    ([5], 0),
    ([1, 1, 1], 3),  # every row has one new token: all decodes, no prompt
])
def test_decode_rows_are_the_trailing_one_token_sequences(extend_lens, decodes):
    batch = _batch(ForwardMode.EXTEND, [n + 3 for n in extend_lens], extend_lens)
    assert batch.decode_rows == decodes
    # Each decode group names its rows' token indices (the last `decodes` of the [T] axis) and slots.
    tokens = sum(extend_lens)
    grouped = sorted(t for g in batch.decode_groups for t in g.tokens.tolist())
    assert grouped == list(range(tokens - decodes, tokens))


def test_decode_rows_without_host_lengths():
    """Inside a CUDA graph (host None): a decode step's rows are all decodes; an extend graph's
    rows are all prompt rows (the extend kernel serves them all)."""
    for mode, decodes in ((ForwardMode.DECODE, 3), (ForwardMode.EXTEND, 0)):
        batch = _batch(mode, [4, 9, 2], [1, 1, 1])
        batch.host = None
        assert batch.decode_rows == decodes


def test_decode_groups_bound_the_padded_gather(monkeypatch):
    """Sorted by length and cut where sequences × longest length would pass the bound; a
    sequence longer than the bound forms a group alone. Slots and visibility follow each row."""
    monkeypatch.setattr(forward_batch, "PADDED_GATHER_MAX_TOKENS", 40)
    seq_lens = [50, 9, 30, 10, 12, 8, 11]
    batch = _batch(ForwardMode.EXTEND, seq_lens, [20, 1, 1, 1, 1, 1, 1])  # one prompt row, six decodes
    groups = batch.decode_groups
    tokens = [g.tokens.tolist() for g in groups]
    # decode tokens 20..25 have lengths 9, 30, 10, 12, 8, 11; by length 8, 9, 10 (4 × 11 > 40),
    # then 11, 12 (3 × 30 > 40), then 30
    assert tokens == [[24, 20, 22], [25, 23], [21]]
    for g in groups:
        for i, token in enumerate(g.tokens.tolist()):
            b = token - 20 + 1  # the batch row of decode token `token`
            row, length = batch.host.req_rows[b], seq_lens[b]
            assert g.visible[i].tolist() == [j < length for j in range(g.slots.shape[1])]
            assert torch.equal(g.slots[i, :length], batch.req_to_token.table[row, :length])
