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
