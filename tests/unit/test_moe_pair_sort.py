"""The pair sort of the grouped expert GEMM (layers/moe/pair_sort.py): the Triton kernel (Triton's
interpreter on the CPU, compiled on the GPU machine) and the large-batch torch path, against a
plain Python reading of the contract, over random ids with pairs of other ranks (-1)."""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs CUDA or TRITON_INTERPRET=1 (set by tests/conftest.py without CUDA)")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _expected(ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[list[int], list[int], list[int]]:
    """(used part of sorted_pairs, block_expert of the used blocks, load counts) from the contract."""
    flat = ids.flatten().tolist()
    pairs, experts = [], []
    for expert in range(num_experts):
        own = [p for p, e in enumerate(flat) if e == expert]
        blocks = -(-len(own) // block_m)
        pairs += own + [len(flat)] * (blocks * block_m - len(own))
        experts += [expert] * blocks
    load = [flat.count(-1)] + [flat.count(e) for e in range(num_experts)]
    return pairs, experts, load


def _check(impl, ids: torch.Tensor, num_experts: int, block_m: int) -> None:
    from meshserve.layers.moe.pair_sort import max_blocks

    pairs, experts, load = _expected(ids, num_experts, block_m)
    counter = torch.full((num_experts + 1,), 5, dtype=torch.int64, device=DEVICE)  # counts add to what was there
    sorted_pairs, block_expert, num_blocks = impl(ids.to(DEVICE).flatten(), num_experts, block_m, counter)
    used = int(num_blocks)
    assert used == len(experts)
    bound = max_blocks(ids.numel(), num_experts, block_m)
    assert sorted_pairs.numel() == bound * block_m and block_expert.numel() == bound
    assert sorted_pairs[: used * block_m].tolist() == pairs
    assert block_expert[:used].tolist() == experts
    assert (sorted_pairs[used * block_m :] == ids.numel()).all()  # past the used blocks: padding only
    assert (block_expert[used:] == num_experts - 1).all()
    assert counter.tolist() == [5 + n for n in load]


def _random_ids(tokens: int, top_k: int, num_experts: int, seed: int) -> torch.Tensor:
    """Each token's distinct top_k experts, skewed towards low ids, some pairs -1 (another rank)."""
    gen = torch.Generator().manual_seed(seed)
    skew = torch.linspace(3.0, 0.1, num_experts)
    ids = torch.stack([torch.multinomial(skew, top_k, generator=gen) for _ in range(tokens)])
    return ids.masked_fill(torch.rand(tokens, top_k, generator=gen) < 0.2, -1)


@pytest.mark.parametrize("impl_name", ["_sort_triton", "_sort_torch"])
@pytest.mark.parametrize(("tokens", "top_k", "num_experts", "block_m"),
                         [(1, 1, 1, 16), (1, 8, 128, 16), (3, 2, 4, 4), (37, 6, 60, 16), (64, 8, 128, 16),
                          (256, 8, 128, 64), (625, 8, 64, 16), (2500, 2, 8, 64)])
def test_pairs_sorted_by_expert_in_whole_blocks(impl_name, tokens, top_k, num_experts, block_m):
    from meshserve.layers.moe import pair_sort

    _check(getattr(pair_sort, impl_name), _random_ids(tokens, top_k, num_experts, tokens), num_experts, block_m)


@pytest.mark.parametrize("impl_name", ["_sort_triton", "_sort_torch"])
def test_degenerate_batches(impl_name):
    """No pairs (a rank's idle forward), only other ranks' pairs, one expert taking every pair."""
    from meshserve.layers.moe import pair_sort

    impl = getattr(pair_sort, impl_name)
    _check(impl, torch.empty(0, 8, dtype=torch.int64), 16, 16)
    _check(impl, torch.full((5, 2), -1), 4, 16)
    _check(impl, torch.full((300, 1), 2), 4, 16)


def test_sort_pairs_takes_the_torch_path_above_the_kernel_size(monkeypatch):
    """Both paths give the same index (above, the kernel's per-expert scans stop paying)."""
    from meshserve.layers.moe import pair_sort

    ids = _random_ids(40, 4, 16, 0).to(DEVICE)
    small = pair_sort.sort_pairs(ids, 16, 16)
    monkeypatch.setattr(pair_sort, "KERNEL_MAX_PAIRS", ids.numel() - 1)
    monkeypatch.setattr(pair_sort, "_sort_triton", None)  # must not be reached
    large = pair_sort.sort_pairs(ids, 16, 16)
    for a, b in zip(small, large):
        assert torch.equal(a, b)
