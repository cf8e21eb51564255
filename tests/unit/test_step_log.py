"""--step-trace-file and --decode-log-interval on the real Scheduler over the fake runner: one
record per forward step whose tokens add up to exactly the prompt and generated tokens of the run
(retractions recompute, so they are excluded), the batch lines in the log, and the summary tool
reading the file back."""

from __future__ import annotations

import logging

import pytest

from meshserve.bench.step_trace import load, summarise
from meshserve.scheduler.step_log import StepRecord
from tests.fake_runner import expected_output, fake_scheduler
from tests.scheduler_driver import greedy, output_ids, run_to_completion

PROMPTS = [[3, 4, 5], [9] * 17, [11, 12] * 15, [7] * 40]
NEW_TOKENS = [20, 5, 12, 9]


@pytest.mark.parametrize("extra", [(), ("--enable-mixed-chunk", "--chunked-prefill-size", "16"),
                                   ("--enable-overlap-schedule",)])
def test_the_trace_accounts_for_every_computed_token(tmp_path, caplog, extra):
    trace = tmp_path / "steps.jsonl"
    scheduler = fake_scheduler("--step-trace-file", str(trace), "--decode-log-interval", "4",
                               "--disable-radix-cache", *extra)
    with caplog.at_level(logging.INFO, logger="meshserve"):
        outs = run_to_completion(scheduler, {str(i): (p, greedy(n)) for i, (p, n) in enumerate(zip(PROMPTS, NEW_TOKENS))})
    for i, (p, n) in enumerate(zip(PROMPTS, NEW_TOKENS)):
        assert output_ids(outs[str(i)]) == expected_output(p, n)
    steps = load(trace)
    assert scheduler.stats["num_retracted"] == 0
    # Every prompt token is computed once; every generated token but each request's first (which
    # its prefill step samples) costs one decode slot, in a decode or a mixed step.
    assert sum(s.tokens for s in steps) == sum(map(len, PROMPTS)) + sum(NEW_TOKENS) - len(PROMPTS)
    assert [s.t for s in steps] == sorted(s.t for s in steps)
    assert {s.mode for s in steps} <= {"prefill", "mixed", "decode"}
    assert ("mixed" in {s.mode for s in steps}) == ("--enable-mixed-chunk" in extra)
    assert all(s.kv_used <= scheduler.pool.size and s.seqs >= 1 for s in steps)
    decodes = sum(s.mode == "decode" for s in steps)
    lines = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("decode: ") for m in lines) == decodes // 4
    assert sum(m.startswith("prefill batch: ") for m in lines) == sum(s.mode != "decode" for s in steps)
    report = summarise(steps, idle_gap_s=60.0, pool_size=scheduler.pool.size)
    assert f"{len(steps)} steps over" in report and "decode steps by batch size" in report


def test_no_trace_file_without_the_flag(tmp_path):
    scheduler = fake_scheduler()
    assert scheduler.step_log is not None and scheduler.step_log.trace is None


def test_the_decode_fit_recovers_a_known_step_cost():
    """Steps launched back to back, each lasting 5 ms + 4 ms per 100k KV tokens (131,072 bytes
    a token: 3.28 TB/s); the prefill step and its neighbours stay out of the fit."""
    steps, t, kv = [], 0.0, 200_000
    for i in range(60):
        mode = "prefill" if i == 30 else "decode"
        steps.append(StepRecord(t=t, mode=mode, seqs=8, tokens=8, running=8, waiting=0, kv_used=kv, retracted=0))
        t += 0.150 if mode == "prefill" else (5.0 + 4.0 * kv / 1e5) / 1e3
        kv += 3_000
    report = summarise(steps, idle_gap_s=60.0, pool_size=None, kv_bytes_per_token=131_072)
    assert "decode step fit: 5.00 ms + 4.000 ms per 100k KV tokens (KV read at 3.28 TB/s)" in report
    assert "median error 0.0% over 55 steps" in report
