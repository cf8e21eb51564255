"""The model's generation_config.json sets the sampling of OpenAI requests that leave it out."""

from __future__ import annotations

import json
from pathlib import Path

from meshserve.config.model_config import _sampling_defaults
from meshserve.server.openai_api import ChatCompletionRequest


def defaults_of(tmp_path: Path, generation_config: dict) -> dict[str, float]:
    (tmp_path / "generation_config.json").write_text(json.dumps(generation_config))
    return _sampling_defaults(tmp_path)


def test_generation_config_keys(tmp_path: Path) -> None:
    assert defaults_of(tmp_path, {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20,
                                  "eos_token_id": 2, "max_new_tokens": 9}) == {
        "temperature": 0.6, "top_p": 0.95, "top_k": 20}
    assert defaults_of(tmp_path, {"do_sample": False, "temperature": 0.7}) == {"temperature": 0.0}  # greedy
    assert defaults_of(tmp_path, {"bos_token_id": 1}) == {}
    assert _sampling_defaults(tmp_path / "absent") == {}


def test_request_fields_win_over_model_defaults() -> None:
    defaults = {"temperature": 0.0, "top_p": 0.9}
    messages = [{"role": "user", "content": "hi"}]
    chosen = ChatCompletionRequest(messages=messages).to_generate_request(defaults).sampling
    assert (chosen.temperature, chosen.top_p) == (0.0, 0.9)
    chosen = ChatCompletionRequest(messages=messages, temperature=0.8).to_generate_request(defaults).sampling
    assert (chosen.temperature, chosen.top_p) == (0.8, 0.9)
    assert ChatCompletionRequest(messages=messages).to_generate_request().sampling.temperature == 1.0


def test_default_model_decodes_greedily(default_model_dir: Path) -> None:
    assert _sampling_defaults(default_model_dir) == {"temperature": 0.0}
