"""The (token, expert) pairs of a batch ordered by expert, the index the grouped expert GEMM
(grouped_gemm.py) walks: pair p is token p // top_k's (p % top_k)-th choice.

    sorted_pairs [max_blocks * block_m]  each local expert's pairs, pair index ascending (stable),
                                         its run padded to whole blocks of block_m with the
                                         padding value num_pairs; the experts in slot order
    block_expert [max_blocks]            the expert of each block
    num_blocks   [1]                     blocks in use; past them sorted_pairs holds padding only
                                         and block_expert num_experts - 1 (never read)

Pairs of id -1 (an expert of another rank) are left out. Everything stays on the device and no
value is read back to the host, so a decode step is capturable in a CUDA graph; `max_blocks` is a
host bound from the shapes alone (below), which also sizes the GEMM's grid.

Two implementations of one contract:
* `_sort_kernel` (Triton, CUDA or Triton's interpreter): one launch, one program per local
  expert. Each program histograms all ids (so it knows every expert's padded run, hence where
  its own run starts), then scans the ids in pair order and writes its own pairs with a running
  prefix count — stable without any sort. Each program reads every id twice, so it is for
  decode-sized batches (`KERNEL_MAX_PAIRS`).
* `_sort_torch`: a stable argsort and a scatter, a dozen small kernels whatever the size — the
  large-batch (prefill) path.

Both can add each expert's pair count to an expert-load counter (`load[0]`: pairs of id -1,
`load[1 + e]`: local expert e; experts.FusedExperts.load), which the counts give for free.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Above this many pairs the per-expert programs' repeated scans of every id cost more than the
# torch path's fixed launches (a few thousand pairs: decode batches and small prefills).
KERNEL_MAX_PAIRS = 8192
_MAX_CHUNK = 1024  # ids per scan step of one program
_NUM_WARPS = 4
# At least one id per thread: a smaller block would be held in several copies across the threads,
# which the histogram must then discount (Triton does, by layout arithmetic; not relied upon).
_MIN_CHUNK = 32 * _NUM_WARPS


def max_blocks(num_pairs: int, num_experts: int, block_m: int) -> int:
    """An upper bound on the blocks in use: each is non-empty (<= num_pairs), and the padding adds
    less than one block per expert that has pairs (<= min(num_experts, num_pairs) of them)."""
    padded = (num_pairs + min(num_experts, num_pairs) * (block_m - 1)) // block_m
    return max(1, min(num_pairs, padded))


def sort_pairs(ids: torch.Tensor, num_experts: int, block_m: int,
               load: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids [T, top_k] (local expert, or -1) -> (sorted_pairs, block_expert, num_blocks) as the
    module docstring describes; with `load` ([num_experts + 1] int64), each expert's pair count
    is added to it."""
    flat = ids.flatten()
    if flat.numel() <= KERNEL_MAX_PAIRS:
        return _sort_triton(flat, num_experts, block_m, load)
    return _sort_torch(flat, num_experts, block_m, load)


@triton.jit
def _sort_kernel(Ids, SortedPairs, BlockExpert, NumBlocks, Load, num_pairs, num_experts, max_blocks,
                 BLOCK_M: tl.constexpr, BINS: tl.constexpr, CHUNK: tl.constexpr, COUNT_LOAD: tl.constexpr):
    expert = tl.program_id(0)
    bins = tl.arange(0, BINS)
    counts = tl.zeros([BINS], dtype=tl.int32)  # bin num_experts: pairs of other ranks (id -1)
    for start in range(0, num_pairs, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        mask = offs < num_pairs
        ids = tl.load(Ids + offs, mask=mask, other=0)
        counts += tl.histogram(tl.where(ids < 0, num_experts, ids).to(tl.int32), BINS, mask=mask)
    blocks = tl.where(bins < num_experts, (counts + BLOCK_M - 1) // BLOCK_M, 0)
    first_block = tl.sum(tl.where(bins < expert, blocks, 0))
    count = tl.sum(tl.where(bins == expert, counts, 0))
    own_blocks = (count + BLOCK_M - 1) // BLOCK_M
    used_blocks = tl.sum(blocks)
    base = first_block * BLOCK_M
    if count > 0:
        seen = 0  # this expert's pairs before the chunk: its rank among them is the stable order
        for start in range(0, num_pairs, CHUNK):
            offs = start + tl.arange(0, CHUNK)
            ids = tl.load(Ids + offs, mask=offs < num_pairs, other=-1)
            own = (ids == expert).to(tl.int32)
            tl.store(SortedPairs + base + seen + tl.cumsum(own, 0) - 1, offs, mask=own != 0)
            seen += tl.sum(own)
        pad = base + count + tl.arange(0, BLOCK_M)
        tl.store(SortedPairs + pad, num_pairs, mask=pad < base + own_blocks * BLOCK_M)
        for b in range(0, own_blocks, CHUNK):
            offs_b = b + tl.arange(0, CHUNK)
            tl.store(BlockExpert + first_block + offs_b, expert, mask=offs_b < own_blocks)
    # The blocks past the used ones, shared out over the programs: padding only.
    for b in range(used_blocks + expert, max_blocks, tl.num_programs(0)):
        tl.store(SortedPairs + b * BLOCK_M + tl.arange(0, BLOCK_M), num_pairs)
        tl.store(BlockExpert + b, num_experts - 1)
    if expert == 0:
        tl.store(NumBlocks, used_blocks)
    if COUNT_LOAD:  # each program owns its counter: a plain read-modify-write, deterministic
        tl.store(Load + 1 + expert, tl.load(Load + 1 + expert) + count)
        if expert == 0:
            tl.store(Load, tl.load(Load) + tl.sum(tl.where(bins == num_experts, counts, 0)))


def _sort_triton(flat: torch.Tensor, num_experts: int, block_m: int,
                 load: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pairs = flat.numel()
    blocks = max_blocks(pairs, num_experts, block_m)
    sorted_pairs = torch.empty(blocks * block_m, dtype=torch.int64, device=flat.device)
    block_expert = torch.empty(blocks, dtype=torch.int64, device=flat.device)
    num_blocks = torch.empty(1, dtype=torch.int64, device=flat.device)
    _sort_kernel[(num_experts,)](
        flat, sorted_pairs, block_expert, num_blocks, num_blocks if load is None else load,
        pairs, num_experts, blocks,
        BLOCK_M=block_m, BINS=triton.next_power_of_2(num_experts + 1),
        CHUNK=min(_MAX_CHUNK, max(_MIN_CHUNK, triton.next_power_of_2(pairs))), COUNT_LOAD=load is not None,
        num_warps=_NUM_WARPS)
    return sorted_pairs, block_expert, num_blocks


def _sort_torch(flat: torch.Tensor, num_experts: int, block_m: int,
                load: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pairs = flat.numel()
    blocks_bound = max_blocks(pairs, num_experts, block_m)
    flat = flat.masked_fill(flat < 0, num_experts)  # a virtual last expert, never placed
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat))
    if load is not None:
        load += counts.roll(1)  # the virtual expert's count is load[0]
    blocks = (counts[:-1] + block_m - 1) // block_m
    block_end = blocks.cumsum(0)  # exclusive end block of each expert's run
    order = flat.argsort(stable=True)
    expert_sorted = flat[order]
    run_start = counts.cumsum(0) - counts
    first = torch.cat([block_end - blocks, block_end[-1:]])  # the virtual expert's "first block"
    dest = first[expert_sorted] * block_m + torch.arange(pairs, device=flat.device) - run_start[expert_sorted]
    # The virtual expert's pairs all land on one extra trailing entry, cut off below.
    dest = dest.masked_fill(expert_sorted == num_experts, blocks_bound * block_m)
    sorted_pairs = torch.full((blocks_bound * block_m + 1,), pairs, dtype=torch.int64, device=flat.device)
    sorted_pairs[dest] = order
    block_expert = torch.searchsorted(block_end, torch.arange(blocks_bound, device=flat.device), right=True)
    return sorted_pairs[:-1], block_expert.clamp_(max=num_experts - 1), block_end[-1:]
