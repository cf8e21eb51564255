"""bench.schedule_replay: the real Scheduler under a step-time model. Twelve requests over four
request rows, eleven with 2 output tokens and the last with 30: in arrival order the long one
starts in the third wave and runs its 29 decode steps after the two waves' one step each (31);
longest-output-first starts it at once and the short ones ride along (29)."""

from __future__ import annotations

import pytest

from meshserve.bench.schedule_replay import StepCosts, replay
from meshserve.config.server_args import ServerArgs

PROMPTS = [[5 + i] * 4 for i in range(12)]
OUTPUTS = [2] * 11 + [30]


@pytest.mark.parametrize(("policy", "decode_steps", "prefill_steps"), [("fcfs", 31, 3), ("lof", 29, 4)])
def test_the_replay_counts_the_schedulers_steps_and_times_them(policy, decode_steps, prefill_steps):
    args = ServerArgs.parse_args(["--model-path", "replay", "--device", "cpu", "--max-total-tokens", "4096",
                                  "--max-running-requests", "4", "--schedule-policy", policy])
    result = replay(args, StepCosts(decode_step_ms=1.0, decode_ms_per_100k_kv=0.0, prefill_tokens_per_s=1e6),
                    PROMPTS, OUTPUTS, context_length=64)
    assert result.output_tokens == sum(OUTPUTS)
    assert dict(result.steps) == {"decode": decode_steps, "prefill": prefill_steps}
    assert result.seconds == pytest.approx(decode_steps * 1e-3 + sum(map(len, PROMPTS)) / 1e6)
    assert len(result.first_token_s) == len(PROMPTS)


def test_decode_steps_pay_for_the_context_they_read():
    costs = StepCosts(decode_step_ms=2.0, decode_ms_per_100k_kv=4.0, prefill_tokens_per_s=1e6)
    args = ServerArgs.parse_args(["--model-path", "replay", "--device", "cpu", "--max-total-tokens", "4096"])
    result = replay(args, costs, [[7] * 1000], [3], context_length=2048)
    # Two decode steps over contexts of 1,001 and 1,002 tokens, after the 1,000-token prefill.
    assert result.seconds == pytest.approx(1000 / 1e6 + 2 * 2e-3 + 4.0 * (1001 + 1002) / 1e8)


def test_a_retracted_request_pays_for_its_prefill_again():
    """Admission that reserves next to nothing (--schedule-conservativeness 0.01) over-admits 8
    requests of 10 + 40 tokens into 199 slots, so decoding retracts; without the radix cache a
    re-admission recomputes its whole sequence but its newest token (which decoding would have
    computed anyway). Decode steps are free of context cost here, so the modeled time is the
    decode steps plus every prompt, recomputed token and re-admitted newest token at the prefill
    rate. Reserving all that admitted requests may generate (2.0: a ratio of 1) never retracts."""
    prompts, outputs = [[5 + i] * 10 for i in range(8)], [40] * 8
    costs = StepCosts(decode_step_ms=1.0, decode_ms_per_100k_kv=0.0, prefill_tokens_per_s=1e4)
    runs = {}
    for conservativeness in ("0.01", "2.0"):
        args = ServerArgs.parse_args(["--model-path", "replay", "--device", "cpu", "--max-total-tokens", "200",
                                      "--disable-radix-cache", "--schedule-conservativeness", conservativeness])
        runs[conservativeness] = result = replay(args, costs, prompts, outputs, context_length=64)
        assert result.output_tokens == sum(outputs)
        prefill_tokens = sum(map(len, prompts)) + result.recomputed_tokens + result.retractions
        assert result.seconds == pytest.approx(result.steps["decode"] * 1e-3 + prefill_tokens / 1e4)
    assert runs["0.01"].retractions > 0 and runs["0.01"].recomputed_tokens > 10 * runs["0.01"].retractions
    assert runs["2.0"].retractions == runs["2.0"].recomputed_tokens == 0
