"""CUDA graphs for small extend batches: a prefill of a few hundred tokens launches hundreds of
kernels too short to hide the host's launch time (a 256-token prefill of an 8B model spent
about 12 ms launching about 6 ms of GPU work on the H200), so a lone short prompt's first
token — the latency users see at low load — was bound by Python, not by the GPU.

A batch of at most MAX_SEQS sequences and at most the largest bucket's tokens runs in the graph
of the smallest token bucket that holds it. Padding tokens (past the batch's real tokens) are
token 0 at position 0 writing their KV to slot 0, which the pool never hands out; padding
sequences have no new tokens and length 0, so no attention program reads or writes for them,
and their logits (taken at an in-range index) are dropped. The extend kernel's grid is sized
for the bucket (every sequence could hold all its tokens); blocks past a sequence's new tokens
exit at once.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable

import torch

from meshserve.executor.cuda_graph import capture_graph
from meshserve.executor.forward_batch import ForwardBatch, ForwardMode

logger = logging.getLogger("meshserve")

TOKEN_BUCKETS = (32, 64, 128, 256, 512)
MAX_SEQS = 8  # a graph's grid covers MAX_SEQS sequences of up to its bucket's tokens each


class ExtendGraphRunner:
    def __init__(self, *, forward: Callable[[ForwardBatch], torch.Tensor], make_batch: Callable[..., ForwardBatch],
                 device: torch.device) -> None:
        self._forward = forward
        self._make_batch = make_batch
        max_tokens = TOKEN_BUCKETS[-1]
        # Static inputs: per token (ids, positions, KV slots), per sequence (rows, lengths, new
        # tokens). Zeros are the padding values, except where `_reset_padding` says otherwise.
        self.tokens = torch.zeros((3, max_tokens), dtype=torch.int64, device=device)
        self.seqs = torch.zeros((3, MAX_SEQS), dtype=torch.int64, device=device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}

    def capture(self, pool) -> None:
        """Capture every bucket, sharing `pool` (the decode graphs' memory pool) when given."""
        started = time.perf_counter()
        stream = torch.cuda.Stream()
        for bucket in reversed(TOKEN_BUCKETS):
            # One sequence holding every token: the capture runs a real, valid batch.
            self._load_static(bucket, torch.zeros(bucket, dtype=torch.int64, device=self.tokens.device),
                              torch.arange(bucket, device=self.tokens.device), self.tokens.new_zeros(bucket),
                              self.seqs.new_zeros(1), self.seqs.new_full((1,), bucket), self.seqs.new_full((1,), bucket))
            graph, out = capture_graph(self._forward, functools.partial(self._static_batch, bucket), stream, pool)
            pool = graph.pool()
            self._graphs[bucket], self._outputs[bucket] = graph, out
        torch.cuda.synchronize()
        logger.info("captured CUDA graphs for extend batches of up to %d sequences and %s tokens in %.1f s",
                    MAX_SEQS, list(TOKEN_BUCKETS), time.perf_counter() - started)

    @staticmethod
    def can_run(num_seqs: int, num_tokens: int) -> bool:
        return num_seqs <= MAX_SEQS and num_tokens <= TOKEN_BUCKETS[-1]

    def replay(self, input_ids: torch.Tensor, positions: torch.Tensor, out_cache_loc: torch.Tensor,
               req_rows: torch.Tensor, seq_lens: torch.Tensor, extend_lens: torch.Tensor) -> torch.Tensor:
        """Logits [B, vocab] of the B sequences' last new tokens (device inputs, as ModelRunner
        packs them)."""
        bucket = next(b for b in TOKEN_BUCKETS if b >= input_ids.shape[0])
        self._load_static(bucket, input_ids, positions, out_cache_loc, req_rows, seq_lens, extend_lens)
        return self._run(bucket)[: req_rows.shape[0]]

    def _run(self, bucket: int) -> torch.Tensor:
        """The bucket's forward on the static inputs: its graph's replay."""
        self._graphs[bucket].replay()
        return self._outputs[bucket]

    def _load_static(self, bucket: int, input_ids: torch.Tensor, positions: torch.Tensor, out_cache_loc: torch.Tensor,
                     req_rows: torch.Tensor, seq_lens: torch.Tensor, extend_lens: torch.Tensor) -> None:
        tokens, seqs = input_ids.shape[0], req_rows.shape[0]
        for i, values in enumerate((input_ids, positions, out_cache_loc)):
            self.tokens[i, :tokens].copy_(values)
        for i, values in enumerate((req_rows, seq_lens, extend_lens)):
            self.seqs[i, :seqs].copy_(values)
        # Padding: token 0 at position 0 into slot 0; sequences of row 0 with nothing new.
        self.tokens[:, tokens:bucket].zero_()
        self.seqs[:, seqs:].zero_()

    def _static_batch(self, bucket: int) -> ForwardBatch:
        input_ids, positions, out_cache_loc = self.tokens[:, :bucket]
        req_rows, seq_lens, extend_lens = self.seqs
        return self._make_batch(mode=ForwardMode.EXTEND, input_ids=input_ids, positions=positions,
                                out_cache_loc=out_cache_loc, req_rows=req_rows, seq_lens=seq_lens,
                                extend_lens=extend_lens, host=None)
