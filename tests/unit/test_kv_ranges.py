"""kv_ranges: the rows cover exactly the requested items' bytes, with consecutive runs merged."""

import numpy as np
import pytest

from meshserve.disagg.kv_ranges import HeadSlice, kv_ranges, paired_head_ranges, paired_kv_ranges


def covered(rows: np.ndarray) -> set[int]:
    return {a for addr, n in rows.tolist() for a in range(addr, addr + n)}


def test_runs_merge_per_base_in_given_order():
    rows = kv_ranges([1000, 5000], 10, np.array([3, 4, 5, 9, 2, 3]))
    assert rows.dtype == np.int64
    assert rows.tolist() == [[1030, 30], [1090, 10], [1020, 20],
                             [5030, 30], [5090, 10], [5020, 20]]


def test_rows_cover_exactly_the_items_bytes():
    rng = np.random.default_rng(0)
    items = rng.choice(200, size=60, replace=False)
    items[10:20] = np.arange(150, 160)  # a run among random slots (the choice may repeat them: harmless)
    bases, size = [10_000, 50_000, 90_000], 16
    rows = kv_ranges(bases, size, items)
    expect = {b + i * size + k for b in bases for i in items.tolist() for k in range(size)}
    assert covered(rows) == expect


def test_single_item_and_empty():
    assert kv_ranges([64], 8, np.array([7])).tolist() == [[120, 8]]
    assert kv_ranges([64, 128], 8, np.array([], dtype=np.int64)).shape == (0, 2)


def test_paired_rows_split_where_either_side_breaks():
    src, dst = paired_kv_ranges([0x1000], [0x9000], 4, np.array([1, 2, 3, 4, 8]), np.array([5, 6, 10, 11, 12]))
    assert src.tolist() == [[0x1004, 8], [0x100C, 8], [0x1020, 4]]
    assert dst.tolist() == [[0x9014, 8], [0x9028, 8], [0x9030, 4]]
    assert (src[:, 1] == dst[:, 1]).all()


def test_paired_copy_moves_every_item_to_its_destination():
    """Applying the rows as memcpys to byte arrays puts src item i at dst item j, for each pair."""
    rng = np.random.default_rng(1)
    size, n_src, n_dst = 6, 40, 50
    src_mem = [rng.integers(1, 255, size * n_src, dtype=np.uint8) for _ in range(2)]
    dst_mem = [np.zeros(size * n_dst, dtype=np.uint8) for _ in range(2)]
    src_items = np.concatenate([np.arange(3, 13), rng.choice(np.arange(20, 40), 8, replace=False)])
    dst_items = np.concatenate([np.arange(30, 36), np.arange(0, 4), np.arange(40, 48)])
    src_rows, dst_rows = paired_kv_ranges([0, 10**6], [0, 10**6], size, src_items, dst_items)
    for (s, n), (d, _) in zip(src_rows.tolist(), dst_rows.tolist()):
        layer = s // 10**6
        dst_mem[layer][d % 10**6 : d % 10**6 + n] = src_mem[layer][s % 10**6 : s % 10**6 + n]
    for layer in range(2):
        got = dst_mem[layer].reshape(n_dst, size)
        want = src_mem[layer].reshape(n_src, size)
        assert (got[dst_items] == want[src_items]).all()
        untouched = np.setdiff1d(np.arange(n_dst), dst_items)
        assert (got[untouched] == 0).all()
    assert len(src_rows) < 2 * len(src_items)  # the runs did merge


def test_head_slice_moves_a_tensor_parallel_ranks_heads():
    """A prefill server holding all 4 heads feeds a decode rank holding heads 2-3 as its 2 heads."""
    rng = np.random.default_rng(2)
    head_bytes, n = 8, 12
    src_mem = rng.integers(1, 255, (n, 4, head_bytes), dtype=np.uint8)  # one buffer: [slot, head, byte]
    dst_mem = np.zeros((n, 2, head_bytes), dtype=np.uint8)
    src_items, dst_items = np.array([1, 2, 3, 7]), np.array([4, 5, 6, 0])
    src_rows, dst_rows = paired_head_ranges([0], [0], src_items, dst_items,
                                            HeadSlice(4, head_bytes, 2, 4), HeadSlice(2, head_bytes, 0, 2))
    assert len(src_rows) == 4  # a partial slice never merges
    flat_src, flat_dst = src_mem.reshape(-1), dst_mem.reshape(-1)
    for (s, k), (d, _) in zip(src_rows.tolist(), dst_rows.tolist()):
        flat_dst[d : d + k] = flat_src[s : s + k]
    assert (dst_mem[dst_items] == src_mem[src_items][:, 2:4]).all()
    assert not dst_mem[np.setdiff1d(np.arange(n), dst_items)].any()
    whole = paired_head_ranges([0], [0], src_items, dst_items, HeadSlice(4, 8, 0, 4), HeadSlice(4, 8, 0, 4))
    assert [r.tolist() for r in whole] == [r.tolist() for r in paired_kv_ranges([0], [0], 32, src_items, dst_items)]
    with pytest.raises(ValueError, match="differ in size"):
        paired_head_ranges([0], [0], src_items, dst_items, HeadSlice(4, 8, 0, 3), HeadSlice(2, 8, 0, 2))


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="1-D integer"):
        kv_ranges([0], 4, np.array([[1, 2]]))
    with pytest.raises(ValueError, match="non-negative"):
        kv_ranges([0], 4, np.array([-1]))
    with pytest.raises(ValueError, match="destination items"):
        paired_kv_ranges([0], [0], 4, np.array([1, 2]), np.array([1]))
    with pytest.raises(ValueError, match="destination buffers"):
        paired_kv_ranges([0, 8], [0], 4, np.array([1]), np.array([1]))
