"""ReqToTokenPool: the host copy of each row always equals the device table."""

from __future__ import annotations

import torch

from meshserve.cache.kv_pool import ReqToTokenPool


def test_host_copy_follows_the_table_through_extends_decodes_and_reuse():
    pool = ReqToTokenPool(max_requests=3, max_context=20_000, device=torch.device("cpu"))
    row = pool.alloc()
    prompt = torch.arange(100, 110, dtype=torch.int64)
    pool.assign(row, 0, prompt)
    for position in range(10, 12_000):  # decode steps, one slot each; grows past the kept capacity
        pool.record_each([row], [position], torch.tensor([position + 1000]))
        pool.table[row, position] = position + 1000  # the runner's device-side write
    assert torch.equal(pool.slots(row, 12_000), pool.table[row, :12_000])
    assert torch.equal(pool.slots(row, 8, start=3), prompt[3:8])
    copy = pool.slots(row, 10)
    pool.free(row)
    again = pool.alloc()
    pool.assign(again, 0, torch.tensor([7, 8, 9]))
    assert again == row and pool.slots(again, 3).tolist() == [7, 8, 9]
    assert torch.equal(copy, prompt)  # slots() hands out copies: reuse of the row cannot change them
