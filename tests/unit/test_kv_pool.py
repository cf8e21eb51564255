"""KVPool hands out whole pages and continues a sequence's partial last page in place;
ReqToTokenPool: the host copy of each row always equals the device table."""

from __future__ import annotations

import pytest
import torch

from meshserve.cache.kv_pool import KVPool, ReqToTokenPool


def make_pool(size: int, page_size: int) -> KVPool:
    return KVPool(size=size, num_layers=2, num_kv_heads=2, head_dim=4, dtype=torch.float16,
                  device=torch.device("cpu"), page_size=page_size)


def test_pages_are_whole_and_a_sequence_fills_its_last_page_first():
    pool = make_pool(size=18, page_size=4)  # rounded down to 4 pages; page 0 is reserved besides
    assert (pool.num_pages, pool.size, pool.num_free, pool.num_free_pages) == (4, 16, 16, 4)
    assert pool.k[0].shape[0] == 20  # slot s at row s, pages 0..4
    first = pool.alloc(6)  # positions 0..5: one whole page and the head of another
    assert first is not None and first.numel() == 6 and pool.num_free_pages == 2
    assert torch.equal(first % 4, torch.arange(6) % 4) and (first >= 4).all()  # never page 0
    assert pool.pages_for(6, 2) == 0 and pool.pages_for(6, 3) == 1 and pool.pages_for(8, 1) == 1
    more = pool.alloc(3, after=int(first[-1]))  # positions 6..8: the page's two free slots, then a new page
    assert more is not None and more[:2].tolist() == [int(first[-1]) + 1, int(first[-1]) + 2]
    assert int(more[2]) % 4 == 0 and pool.num_free_pages == 1
    assert pool.alloc(5) is None and pool.num_free_pages == 1  # two pages needed: nothing taken
    pool.free(torch.cat([first, more]))  # pages named by their first slots, the partial tail too
    assert pool.num_free == pool.size and torch.equal(pool.free_slots().sort().values, torch.arange(4, 20))
    with pytest.raises(RuntimeError, match="double free"):
        pool.free(first)


def test_page_size_one_hands_out_slots_as_before():
    pool = make_pool(size=5, page_size=1)
    slots = pool.alloc(3)
    assert slots is not None and slots.tolist() == [3, 4, 5] and pool.num_free == 2  # the top of the free list
    assert pool.alloc(1, after=5).tolist() == [2]  # a page of one has no tail to continue
    pool.free(slots)
    assert pool.num_free == 4


def test_layer_buffers_and_slot_size_describe_the_layout_for_kv_transfer():
    pool = make_pool(size=8, page_size=4)
    buffers = pool.layer_buffers()
    assert len(buffers) == 4 and buffers[0] is pool.k[0] and buffers[1] is pool.v[0] and buffers[3] is pool.v[1]
    assert pool.bytes_per_slot == 2 * 2 * 2 * 4 * 2  # K and V, 2 layers, 2 heads, head_dim 4, fp16
    assert pool.bytes_per_slot == sum(b[0].numel() * b.element_size() for b in buffers)


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


def test_latent_layout_stores_one_buffer_whose_leading_features_are_the_values():
    """MLA: one head of [c_kv | k_rope] per token and layer; V is a view of K's first features."""
    pool = KVPool(size=8, num_layers=2, num_kv_heads=1, head_dim=6, dtype=torch.float32,
                  device=torch.device("cpu"), latent_v_dim=4)
    assert pool.bytes_per_slot == 2 * 6 * 4  # layers x head_dim x float32: no separate V
    assert pool.layer_buffers() == pool.k
    k = torch.arange(2 * 6, dtype=torch.float32).view(2, 1, 6)
    slots = torch.tensor([3, 5])
    pool.write(1, slots, k, k[..., :4])
    assert torch.equal(pool.k[1][slots], k) and torch.equal(pool.v[1][slots], k[..., :4])
    assert pool.v[1].data_ptr() == pool.k[1].data_ptr()
    with pytest.raises(ValueError, match="one head"):
        KVPool(size=8, num_layers=1, num_kv_heads=2, head_dim=6, dtype=torch.float32, device=torch.device("cpu"),
               latent_v_dim=4)
