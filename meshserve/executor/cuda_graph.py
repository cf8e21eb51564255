"""CUDA graphs for decode steps: the whole model forward of a decode batch, captured once per
batch size and replayed, so a step costs one graph launch instead of hundreds of kernel
launches from Python.

A batch of B sequences runs in the smallest captured size >= B. Padding entries decode a dummy
token of row 0 at length 1 and write their KV to slot 0, which the pool never hands out; their
logits are dropped.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable

import torch

from meshserve.executor.forward_batch import ForwardBatch, ForwardMode

logger = logging.getLogger("meshserve")

DECODE_INPUT_ROWS = 5  # input ids, positions, KV slots, request rows, sequence lengths


def capture_graph(forward: Callable[[ForwardBatch], torch.Tensor], batch: Callable[[], ForwardBatch],
                  stream: torch.cuda.Stream, pool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """One forward captured on `stream` into a graph drawing from memory `pool` (None: a new
    pool), after two warm-up runs outside the graph (Triton compilation, cuBLAS workspaces).
    Each run gets a fresh batch from `batch`: a ForwardBatch caches values derived from its
    inputs (extend_starts), which the captured run must compute inside the graph. Returns the
    graph and its output tensor, which each replay overwrites."""
    with torch.cuda.stream(stream):
        for _ in range(2):
            forward(batch())
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=stream):
        out = forward(batch())
    return graph, out


def capture_sizes(max_bs: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to 256, then every 32: padding wastes at most ~12 %."""
    sizes = [1, 2, 4, 8] + list(range(16, 257, 16)) + list(range(288, max_bs + 1, 32))
    return sorted({s for s in sizes if s <= max_bs} | {max_bs})


class CudaGraphRunner:
    def __init__(self, *, forward: Callable[[ForwardBatch], torch.Tensor],
                 make_batch: Callable[..., ForwardBatch], max_bs: int, device: torch.device) -> None:
        self.sizes = capture_sizes(max_bs)
        self.max_bs = max_bs
        self._forward = forward
        # Static inputs, one row each: input ids, positions, KV slots, request rows, sequence
        # lengths. Replays read these buffers, so each step copies its values in (one copy).
        self.inputs = torch.zeros((DECODE_INPUT_ROWS, max_bs), dtype=torch.int64, device=device)
        # What padding entries hold: a dummy token of row 0 at length 1, written to slot 0.
        self._padding = torch.zeros_like(self.inputs)
        self._padding[-1].fill_(1)  # the sequence-length row
        self.inputs.copy_(self._padding)
        self._make_batch = make_batch
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        self._pool = None

    def capture(self) -> None:
        started = time.perf_counter()
        stream = torch.cuda.Stream()
        # Largest first: later, smaller graphs reuse the largest one's memory pool.
        for bs in reversed(self.sizes):
            graph, out = capture_graph(self._forward, functools.partial(self._static_batch, bs), stream, self._pool)
            self._pool = graph.pool()
            self._graphs[bs], self._outputs[bs] = graph, out
        torch.cuda.synchronize()
        logger.info("captured CUDA graphs for decode batch sizes %s in %.1f s", self.sizes,
                    time.perf_counter() - started)

    @property
    def pool(self):
        """The graphs' memory pool (after capture), for other graphs to share."""
        return self._pool

    def can_run(self, batch_size: int) -> bool:
        return batch_size <= self.max_bs

    def replay(self, input_ids: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
        """Logits [B, vocab] of a decode batch of B sequences: input_ids [B] and `others`
        [DECODE_INPUT_ROWS - 1, B] (positions, KV slots, request rows, lengths) on the device."""
        bs = input_ids.shape[0]
        size = next(s for s in self.sizes if s >= bs)
        self.inputs[0, :bs].copy_(input_ids)
        self.inputs[1:, :bs].copy_(others)
        if size > bs:  # reset the padding entries (a previous, larger batch left values there)
            self.inputs[:, bs:size].copy_(self._padding[:, bs:size])
        self._graphs[size].replay()
        return self._outputs[size][:bs]

    def replay_static(self, batch_size: int) -> None:
        """Replay the graph that serves `batch_size` on whatever the static buffers hold (for
        timing the forward pass alone)."""
        self._graphs[next(s for s in self.sizes if s >= batch_size)].replay()

    def _static_batch(self, bs: int) -> ForwardBatch:
        input_ids, positions, out_cache_loc, req_rows, seq_lens = self.inputs[:, :bs]
        return self._make_batch(mode=ForwardMode.DECODE, input_ids=input_ids, positions=positions,
                                out_cache_loc=out_cache_loc, req_rows=req_rows, seq_lens=seq_lens, host=None)
