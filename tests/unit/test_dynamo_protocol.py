"""meshserve/dynamo/protocol.py: Dynamo 1.6's request dicts (as measured, see
../shared/notes/dynamo-runtime.md) to /generate's sampling parameters, accepted by meshserve's
own validation; what meshserve cannot honour is refused, not dropped."""

from __future__ import annotations

import pytest

from meshserve.dynamo import protocol
from meshserve.messages import Bootstrap, FinishReason
from meshserve.server.generation import SequenceOutput
from meshserve.server.native_api import engine_requests

REQUEST = {
    "token_ids": [1, 2, 3],
    "stop_conditions": {"max_tokens": 30, "stop": ["\n\n"], "stop_token_ids": [7], "min_tokens": 2,
                        "ignore_eos": True, "stop_token_ids_hidden": [2]},
    "sampling_options": {"n": 1, "temperature": 0.699999988079071, "top_p": 0.8999999761581421, "top_k": 20,
                         "seed": 5, "frequency_penalty": None, "use_beam_search": False, "guided_decoding": None},
    "output_options": {"skip_special_tokens": True},
    "bootstrap_info": {"bootstrap_host": "10.0.0.1", "bootstrap_port": 8998, "bootstrap_room": 2**62 + 3,
                       "handoff_id": b"\x00" * 16},
}


def test_sampling_options_and_stop_conditions_map_to_meshserve_names():
    params = protocol.sampling_params(REQUEST, with_stop_strings=True)
    assert params == {"max_new_tokens": 30, "min_new_tokens": 2, "ignore_eos": True, "stop_token_ids": [7],
                      "stop": ["\n\n"], "temperature": 0.7, "top_p": 0.9, "top_k": 20, "seed": 5,
                      "skip_special_tokens": True}
    # What meshserve's own request validation accepts, field for field.
    (request,), _ = engine_requests(None, params, [1, 2, 3])
    assert (request.sampling.max_new_tokens, request.sampling.temperature, request.sampling.stop) == (30, 0.7, ["\n\n"])
    assert "stop" not in protocol.sampling_params(REQUEST, with_stop_strings=False)


@pytest.mark.parametrize("options, name", [({"n": 2}, "n and best_of"), ({"use_beam_search": True}, "beam"),
                                           ({"guided_decoding": {"json": {}}}, "guided_decoding")])
def test_what_meshserve_cannot_honour_is_refused(options, name):
    with pytest.raises(ValueError, match=name):
        protocol.sampling_params({**REQUEST, "sampling_options": options}, with_stop_strings=True)


@pytest.mark.parametrize("name", ["logprobs", "prompt_logprobs"])
def test_logprobs_are_refused_not_dropped(name):
    with pytest.raises(ValueError, match=f"output_options.{name}"):
        protocol.sampling_params({**REQUEST, "output_options": {name: 0}}, with_stop_strings=True)


def test_bootstrap_info_and_response_items():
    assert protocol.bootstrap(REQUEST) == Bootstrap("10.0.0.1", 8998, 2**62 + 3)
    assert protocol.bootstrap({"token_ids": [1]}) is None
    middle = SequenceOutput(index=0, rid="r", text="", token_ids=[4, 5], logprobs=[], top_logprobs=[], finish=None,
                            prompt_tokens=3, cached_tokens=0, completion_tokens=2)
    assert protocol.response_item(middle) == {"token_ids": [4, 5], "index": 0}
    last = SequenceOutput(index=0, rid="r", text="", token_ids=[], logprobs=[], top_logprobs=[],
                          finish=FinishReason("abort"), prompt_tokens=3, cached_tokens=1, completion_tokens=2)
    assert protocol.response_item(last) == {
        "token_ids": [], "index": 0, "finish_reason": "cancelled",
        "completion_usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5,
                             "prompt_tokens_details": {"cached_tokens": 1}}}
