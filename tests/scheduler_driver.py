"""Drive a real Scheduler in-process (no HTTP, no subprocess) for fast engine-level tests.

Every scheduler built here is remembered for the running test; tests/conftest.py's
`kv_accounting` fixture runs `check_kv_accounting` on each after the test (and flushes it), so no
engine test can leak or double-own a KV slot unnoticed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from meshserve.cluster.groups import ParallelGroups
from meshserve.config.model_config import ModelConfig
from meshserve.config.server_args import ServerArgs
from meshserve.executor.model_runner import ModelRunner
from meshserve.messages import GenerateReq, ReqOutput
from meshserve.sampling_params import SamplingParams
from meshserve.scheduler.scheduler import Scheduler


# The KV pool of schedulers built by tests unless a test sizes it itself (a later flag wins). Without
# it each would get the CPU default of 1 GiB (zero-filled, so resident): in the pytest process that
# was +0.5-1.5 GB per scheduler, and 1 GiB per rank of the TP tests. 4096 tokens hold any test's batch.
TEST_KV_ARGS = ("--max-total-tokens", "4096")


def build_scheduler(model_dir: Path | str, *extra_args: str, device: str = "cpu") -> Scheduler:
    args = ServerArgs.parse_args(["--model-path", str(model_dir), "--device", device, *TEST_KV_ARGS,
                                  *extra_args]).validate()
    model_config = ModelConfig.from_server_args(args)
    runner = ModelRunner(args, model_config, device=torch.device(device), groups=ParallelGroups.single())
    assert runner.kv_pool.page_size == args.cache.page_size, "the runner's KV pool ignores --page-size"
    return track(Scheduler(args, model_config, runner))


# Schedulers of the running test, held (strongly: a test's own reference is gone by teardown)
# until the kv_accounting fixture has checked them and cleared the list.
BUILT: list[Scheduler] = []


def track(scheduler: Scheduler) -> Scheduler:
    BUILT.append(scheduler)
    return scheduler


def check_kv_accounting(scheduler: Scheduler) -> None:
    """The ownership invariant (docs/architecture.md): every allocatable KV slot (all but the
    reserved page 0) is owned by exactly one of the pool's free list, the prefix cache, or one
    request. A request owns the whole pages of [prefix_len, kv_len) of its row, which must keep
    position i at offset i % page_size. A leaked slot (owned by nobody) or a double-owned one
    fails here."""
    pool, cache = scheduler.pool, scheduler.cache
    page = pool.page_size
    reqs = {id(r): r for r in [*scheduler.waiting, *scheduler.running,
                                *([scheduler.chunked] if scheduler.chunked else [])]}.values()
    owned = []
    for r in (r for r in reqs if r.row is not None):
        assert r.prefix_len % page == 0, "a cached prefix ends mid-page"
        slots = scheduler.rows.slots(r.row, r.kv_len, start=r.prefix_len)
        positions = torch.arange(r.prefix_len, r.kv_len)
        assert torch.equal(slots % page, positions % page), "a position is not at its offset in its page"
        pages = slots[positions % page == 0] // page
        assert torch.equal(slots // page, pages.repeat_interleave(page)[: slots.numel()]), "a page is split"
        owned.append(pool.page_slots(pages))
    free, cached = pool.free_slots(), cache.held_slots()
    assert cached.numel() == cache.total_size, "the cache's size counters disagree with its tree"
    counts = (free.numel(), cached.numel(), sum(o.numel() for o in owned))
    assert sum(counts) == pool.size, f"free + cached + owned = {counts} != capacity {pool.size}"
    everything = torch.cat([free, cached, *owned]).sort().values
    assert torch.equal(everything, torch.arange(page, page + pool.size)), \
        "a KV slot is owned twice (and another by nobody)"


def check_flush_frees_everything(scheduler: Scheduler) -> None:
    """An idle scheduler's flush succeeds and leaves the whole pool free and the cache empty."""
    ok, message = scheduler.flush_cache()
    assert ok, message
    assert scheduler.pool.num_free == scheduler.pool.size, "KV slots survive a flush"
    assert scheduler.cache.total_size == 0 and scheduler.cache.match_prefix([1, 2, 3]).length == 0


def run_to_completion(scheduler: Scheduler, requests: dict[str, tuple[list[int], SamplingParams]]
                      ) -> dict[str, list[ReqOutput]]:
    """Submit all requests at once (so they batch) and step until every one has finished."""
    for rid, (input_ids, sampling) in requests.items():
        scheduler.add_request(GenerateReq(rid=rid, input_ids=input_ids, sampling=sampling))
    outputs: dict[str, list[ReqOutput]] = {rid: [] for rid in requests}
    for _ in range(100_000):
        if not scheduler.has_work:
            break
        scheduler.step()
        for out in scheduler.take_outputs():
            outputs[out.rid].append(out)
    else:
        raise AssertionError("scheduler did not finish")
    for out in scheduler.take_outputs():
        outputs[out.rid].append(out)
    assert all(outs and outs[-1].finish is not None for outs in outputs.values())
    return outputs


def output_ids(outs: list[ReqOutput]) -> list[int]:
    return [t for out in outs for t in out.new_ids]


def greedy(max_new_tokens: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True)
