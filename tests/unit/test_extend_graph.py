"""Extend batches in CUDA graphs (meshserve/executor/extend_graph.py): the padded static batch a
graph replays — padding tokens into slot 0, padding sequences with nothing new, the extend
kernel's grid sized for the bucket — gives the same greedy tokens as the eager path, through the
whole engine (several prompts per step, chunked prefill over a cached prefix, decode after).
On CPU the graph itself cannot be captured: the bucket's forward runs eagerly on the static
inputs (Triton's interpreter); tests/gpu/test_extend_graph_gpu.py replays real graphs."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
                                reason="CPU variant (Triton's interpreter); tests/gpu replays real graphs")


def test_padded_static_batches_give_the_eager_outputs(tiny_llama_dir, monkeypatch):
    from meshserve.executor import extend_graph
    from meshserve.executor.extend_graph import ExtendGraphRunner
    from meshserve.layers.attention.triton import TritonBackend
    from tests.scheduler_driver import build_scheduler, greedy, output_ids, run_to_completion

    class EagerBuckets(ExtendGraphRunner):
        """The graphs' inputs and padding, each bucket's forward run eagerly instead of replayed."""

        buckets: list[int] = []

        def _run(self, bucket: int) -> torch.Tensor:
            self.buckets.append(bucket)
            return self._forward(self._static_batch(bucket))

    # Small buckets, so that the interpreter's runs stay short: steps of up to 32 new tokens run
    # in the "graphs", larger ones eagerly. Prompts of 5..60 tokens in chunks of 24: several
    # prompts per step, and later chunks extending a cached prefix.
    monkeypatch.setattr(extend_graph, "TOKEN_BUCKETS", (8, 16, 32))
    requests = {f"r{i}": (list(range(3 + 7 * i, 8 + 18 * i)), greedy(5)) for i in range(4)}
    flags = ("--dtype", "float32", "--attention-backend", "torch_native", "--disable-cuda-graph",
             "--chunked-prefill-size", "24")
    reference = run_to_completion(build_scheduler(tiny_llama_dir, *flags), requests)
    scheduler = build_scheduler(tiny_llama_dir, *flags)
    runner = scheduler.runner
    runner.attn_backend = TritonBackend()  # --attention-backend triton is refused on CPU
    runner.extend_graphs = EagerBuckets(forward=runner._forward_inference, make_batch=runner._make_batch,
                                        device=runner.device)
    got = run_to_completion(scheduler, requests)
    assert {r: output_ids(o) for r, o in got.items()} == {r: output_ids(o) for r, o in reference.items()}
    assert EagerBuckets.buckets and set(EagerBuckets.buckets) <= {8, 16, 32}
    assert len(set(EagerBuckets.buckets)) >= 2  # more than one bucket was used
