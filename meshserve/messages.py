"""Every message that crosses a process boundary, as msgspec Structs encoded with msgpack.

No pickle on any socket (DESIGN §2): a peer can only ever make us build these plain structs.
Two directions, each one tagged union:

  TokenizerManager -> scheduler leader:  ToScheduler   (GenerateReq, AbortReq, FlushCacheReq)
  scheduler leader -> TokenizerManager:  FromScheduler (SchedulerReady, SchedulerFailed,
                                                        BatchOut, FlushCacheOut, SchedulerStats)
"""

from __future__ import annotations

from typing import Literal

import msgspec

from meshserve.sampling_params import SamplingParams


class Bootstrap(msgspec.Struct, frozen=True):
    """Where the two halves of a disaggregated request meet (SGLang's protocol): the prefill
    server's bootstrap service `host:port`, and `room`, the id both halves share. The router
    adds it to the request it sends to both servers."""

    host: str
    port: int
    room: int


class GenerateReq(msgspec.Struct, tag=True, frozen=True, kw_only=True):
    """One sequence to generate. `rid` is unique among live requests (the TokenizerManager's job).
    `bootstrap` is set exactly when the server runs in a disaggregation mode."""

    rid: str
    input_ids: list[int]
    sampling: SamplingParams
    return_logprob: bool = False
    top_logprobs_num: int = 0
    bootstrap: Bootstrap | None = None


class AbortReq(msgspec.Struct, tag=True, frozen=True):
    """Stop `rid` wherever it is (waiting, running); its KV is freed and it finishes with "abort"."""

    rid: str
    message: str = "aborted"


class FlushCacheReq(msgspec.Struct, tag=True, frozen=True):
    """Drop every cached prefix. Refused (success=False) while requests are in flight."""


ToScheduler = GenerateReq | AbortReq | FlushCacheReq


class StepMessages(msgspec.Struct, frozen=True):
    """Leader -> every other rank, once per scheduler step over the gloo CPU group: the messages
    the leader received since the last step, in order, so every rank makes the same decisions.
    `stop` ends every rank's loop together."""

    messages: list[ToScheduler]
    stop: bool = False


class FinishReason(msgspec.Struct, frozen=True, omit_defaults=True):
    """Why a sequence ended. kind "stop": EOS, a stop token or a stop string (matched says which);
    "length": max_new_tokens or the context length; "abort": client abort or server error."""

    kind: Literal["stop", "length", "abort"]
    matched: int | str | None = None
    message: str | None = None


class TopLogprob(msgspec.Struct, array_like=True, frozen=True):
    token_id: int
    logprob: float


class ReqOutput(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What one step added to one sequence. Deltas only: `new_ids` are the tokens since the
    previous ReqOutput of this rid, `logprobs`/`top_logprobs` (when asked for) align with them.
    The last ReqOutput of a rid has `finish` set; none follows it."""

    rid: str
    new_ids: list[int]
    finish: FinishReason | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[float] = []
    top_logprobs: list[list[TopLogprob]] = []


class BatchOut(msgspec.Struct, tag=True, frozen=True):
    outputs: list[ReqOutput]


class SchedulerReady(msgspec.Struct, tag=True, frozen=True, kw_only=True):
    """Sent once, after the model is loaded and the KV pool is sized."""

    max_total_tokens: int
    max_running_requests: int
    context_length: int
    vocab_size: int
    device: str
    # Why structured output (grammar/) is off on this server; None when it is on.
    grammar_off: str | None = None
    dp_rank: int = 0  # which DP group's leader sends it (--dp-size)


class SchedulerFailed(msgspec.Struct, tag=True, frozen=True):
    """Fatal: the scheduler is exiting. Every in-flight request must get an error."""

    message: str


class FlushCacheOut(msgspec.Struct, tag=True, frozen=True):
    success: bool
    message: str = ""
    dp_rank: int = 0


class SchedulerStats(msgspec.Struct, tag=True, frozen=True, kw_only=True):
    """Periodic load report (for /metrics, /get_load and the routers). The PD fields stay 0 on a
    plain server; see meshserve/disagg/ for the states they count."""

    num_running: int
    num_waiting: int
    used_tokens: int
    max_total_tokens: int
    cache_hit_tokens: int
    prompt_tokens: int
    generation_tokens: int
    num_retracted: int
    num_bootstrapping: int = 0  # decode: looking the prefill up or waiting for KV slots
    num_awaiting_kv: int = 0  # decode: waiting for the KV; prefill: waiting for the decode's request
    num_awaiting_ack: int = 0  # prefill: KV sent, waiting for the decode's acknowledgement
    kv_transfers_in_flight: int = 0  # writes (prefill) or expected writes (decode) not ended yet
    # MoE expert loads since start-up (layers/moe/eplb.py; empty for dense models): (token, expert)
    # pairs per logical expert and per expert-parallel rank, summed over MoE layers; EPLB's counts.
    expert_tokens: tuple[int, ...] = ()
    ep_rank_tokens: tuple[int, ...] = ()
    eplb_rebalances: int = 0
    eplb_moved_experts: int = 0
    idle_forwards: int = 0  # DP attention: forwards run only to join other DP groups' MLPs, since start
    dp_rank: int = 0  # the reporting DP group (--dp-size); the TokenizerManager sums them


FromScheduler = SchedulerReady | SchedulerFailed | BatchOut | FlushCacheOut | SchedulerStats


class Codec:
    """Encoder/decoder pair for one direction. Decoding validates types, so a malformed or hostile
    message raises msgspec.DecodeError instead of building arbitrary objects."""

    def __init__(self, union: object) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(union)

    def encode(self, msg: msgspec.Struct) -> bytes:
        return self._encoder.encode(msg)

    def decode(self, data: bytes):
        return self._decoder.decode(data)


def step_messages_codec() -> Codec:
    return Codec(StepMessages)


def to_scheduler_codec() -> Codec:
    return Codec(ToScheduler)


def from_scheduler_codec() -> Codec:
    return Codec(FromScheduler)
