"""meshserve workers under NVIDIA Dynamo 1.6.1's real runtime: Debian's etcd and nats-server
(deploy/dynamo/control-plane.sh), Dynamo's own frontend (`python -m dynamo.frontend`) and
`python -m meshserve.dynamo.worker`, answering the `openai` client on a tiny random model:

- an aggregated worker: chat and completions, streamed and not, equal transformers' greedy
  output on the prompt ids the frontend's template gives;
- a prefill and a decode worker in Dynamo's disaggregated mode (meshserve's PD transfer moves
  the KV): the same answers as the aggregated worker;
- a client leaving mid-stream aborts the worker's request; SIGTERM unregisters at once (the
  frontend stops listing the model) while the in-flight request completes.

Dynamo is installed by the test (tests/dynamo_install.py); an install failure fails it.
"""

from __future__ import annotations

import base64
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from transformers import AutoTokenizer

from meshserve.dynamo.worker import split_argv
from tests.cluster_nodes import base_port, cluster_args
from tests.dynamo_cluster import DynamoCluster, Proc, start_dynamo
from tests.hf_reference import hf_greedy
from tests.pd_cluster import PD_ENV
from tests.server_process import free_port

WORKER_ARGS = ("--device", "cpu", "--max-total-tokens", "4096", "--context-length", "2048")
NEW_TOKENS = 8
GREEDY = {"temperature": 0, "max_tokens": NEW_TOKENS, "extra_body": {"ignore_eos": True}}
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "The capital of France is"
SEED_002_PROMPT = (
    "In the heart of the tennis world, where champions rise and fall with each Grand Slam, lies the legend of the "
    "Golden Racket of Wimbledon. Once wielded by the greatest players of antiquity, this mythical racket is said to "
    "bestow unparalleled precision, grace, and longevity upon its rightful owner. For centuries, it remained hidden, "
    "its location lost to all but the most dedicated scholars of the sport. You are Roger Federer, the Swiss maestro "
    "whose elegant play and sportsmanship have already cemented your place among the legends, but whose quest for "
    "perfection remains unquenched even as time marches on. Recent dreams have brought you visions of this ancient "
    "artifact, along with fragments of a map that seems to lead to its resting place. Your journey will take you "
    "through the hallowed grounds of tennis history, from the clay courts of Roland Garros to the hidden training "
    "grounds of forgotten champions, and finally to a secret chamber beneath Centre Court itself. Character "
    "Background: Develop a detailed background for Roger Federer in this quest. Describe his motivations for seeking "
    "the Golden Racket, his tennis skills and personal weaknesses, and any connections to the legends of the sport "
    "that came before him. Is he driven by a desire to extend his career, to secure his legacy as the greatest of all "
    "time, or perhaps by something more personal? What price might he be willing to pay to claim this artifact, and "
    "what challenges from rivals past and present might stand in his way?")
LEASE_TTL_S = 30  # Dynamo 1.6's etcd lease


@dataclass
class Deployment:
    cluster: DynamoCluster
    aggregated: Proc  # the current aggregated worker serving "tiny" (replaced after a kill -9)


def _aggregated(cluster: DynamoCluster, model_dir: Path, name: str) -> Proc:
    worker = cluster.worker(name, "--model-path", str(model_dir), *WORKER_ARGS, "--served-model-name", "tiny")
    cluster.wait_model("tiny", watch=[worker, *cluster.procs[:1]])
    return worker


@pytest.fixture(scope="module")
def dynamo(tmp_path_factory: pytest.TempPathFactory, tiny_qwen3_dir: Path) -> Iterator[Deployment]:
    cluster = start_dynamo(tmp_path_factory.mktemp("dynamo"))
    try:
        yield Deployment(cluster, _aggregated(cluster, tiny_qwen3_dir, "aggregated"))
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def expected(tiny_qwen3_dir: Path) -> dict[str, tuple[int, str]]:
    """(prompt tokens, greedy text) per surface, from transformers."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen3_dir)
    chat_text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    chat_ids = tokenizer.encode(chat_text, add_special_tokens=False)
    text_ids = tokenizer.encode(PROMPT, add_special_tokens=False)
    out = hf_greedy(tiny_qwen3_dir, [chat_ids, text_ids], NEW_TOKENS)
    return {"chat": (len(chat_ids), tokenizer.decode(out[0], skip_special_tokens=True)),
            "completions": (len(text_ids), tokenizer.decode(out[1], skip_special_tokens=True))}


def _answers(client, model: str) -> dict[str, list]:
    chat = client.chat.completions.create(model=model, messages=MESSAGES, **GREEDY)
    chat_stream = list(client.chat.completions.create(model=model, messages=MESSAGES, stream=True, **GREEDY))
    comp = client.completions.create(model=model, prompt=PROMPT, **GREEDY)
    comp_stream = list(client.completions.create(model=model, prompt=PROMPT, stream=True, **GREEDY))
    return {
        "chat": [(chat.usage.prompt_tokens, chat.choices[0].message.content),
                 "".join(c.choices[0].delta.content or "" for c in chat_stream if c.choices)],
        "completions": [(comp.usage.prompt_tokens, comp.choices[0].text),
                        "".join(c.choices[0].text for c in comp_stream if c.choices)],
        "finish": [chat.choices[0].finish_reason, comp.choices[0].finish_reason],
    }


def test_aggregated_worker_equals_transformers(dynamo, expected):
    cluster = dynamo.cluster
    answers = _answers(cluster.openai(), "tiny")
    for surface in ("chat", "completions"):
        whole, streamed = answers[surface]
        assert whole == expected[surface], surface
        assert streamed == expected[surface][1], surface
    assert answers["finish"] == ["length", "length"]


def test_prefill_and_decode_workers_equal_the_aggregated_one(dynamo, expected, tiny_qwen3_dir):
    cluster = dynamo.cluster
    bootstrap_port = free_port()
    pd_args = ("--model-path", str(tiny_qwen3_dir), *WORKER_ARGS, "--served-model-name", "tiny-pd",
               "--host", "127.0.0.1", "--disaggregation-transfer-backend", "mooncake")
    prefill = cluster.worker("prefill", *pd_args, "--disaggregation-mode", "prefill",
                             "--disaggregation-bootstrap-port", str(bootstrap_port), extra_env=PD_ENV)
    decode = cluster.worker("decode", *pd_args, "--disaggregation-mode", "decode", extra_env=PD_ENV)
    try:
        cluster.wait_model("tiny-pd", watch=[prefill, decode])
        answers = _answers(cluster.openai(), "tiny-pd")
        for surface in ("chat", "completions"):
            whole, streamed = answers[surface]
            assert whole == expected[surface], surface
            assert streamed == expected[surface][1], surface
        # A meshserve decode server refuses any request without bootstrap fields and takes the
        # prompt's KV from the prefill named there: these answers went through the PD transfer.
    finally:
        for proc in (decode, prefill):
            proc.stop()


def test_default_model_pd_pair_as_in_seed_002_equals_a_plain_server(dynamo, default_server, default_model_dir):
    """Seed 002's worker flags (--skip-tokenizer-init, nixl) on the default model: the openai
    client's answers equal a plain meshserve server's, and the seed's own curl body answers."""
    cluster = dynamo.cluster
    pd_args = ("--model-path", str(default_model_dir), *WORKER_ARGS, "--served-model-name", "smol-pd",
               "--host", "127.0.0.1", "--skip-tokenizer-init", "--disaggregation-transfer-backend", "nixl")
    # A Dynamo endpoint serves one model: this pair gets components of its own.
    prefill = cluster.worker("prefill-default", *pd_args, "--disaggregation-mode", "prefill",
                             "--disaggregation-bootstrap-port", str(free_port()),
                             "--endpoint", f"dyn://{cluster.namespace}.smolprefill.generate", extra_env=PD_ENV)
    decode = cluster.worker("decode-default", *pd_args, "--disaggregation-mode", "decode",
                            "--endpoint", f"dyn://{cluster.namespace}.smol.generate", extra_env=PD_ENV)
    try:
        cluster.wait_model("smol-pd", watch=[prefill, decode])
        plain = default_server.openai()
        plain_model = plain.models.list().data[0].id
        assert _answers(cluster.openai(), "smol-pd") == _answers(plain, plain_model)
        body = {"model": "smol-pd", "messages": [{"role": "user", "content": SEED_002_PROMPT}], "stream": False,
                "max_tokens": 30}
        seed = httpx.post(f"{cluster.frontend_url}/v1/chat/completions", json=body, timeout=120)
        assert seed.status_code == 200, seed.text
        assert seed.json()["usage"]["completion_tokens"] == 30 or seed.json()["choices"][0]["finish_reason"] == "stop"
        greedy = httpx.post(f"{cluster.frontend_url}/v1/chat/completions", json={**body, "temperature": 0},
                            timeout=120).json()
        reference = plain.chat.completions.create(model=plain_model, messages=body["messages"], max_tokens=30,
                                                  temperature=0)
        assert greedy["choices"][0]["message"]["content"] == reference.choices[0].message.content
        assert greedy["usage"]["prompt_tokens"] == reference.usage.prompt_tokens
    finally:
        for proc in (decode, prefill):
            proc.stop()


def test_kill_9_drops_the_worker_within_the_lease_and_a_restarted_one_is_found(dynamo, expected, tiny_qwen3_dir):
    cluster = dynamo.cluster
    dynamo.aggregated.signal(signal.SIGKILL)
    dynamo.aggregated.popen.wait(10)
    assert cluster.wait_model("tiny", present=False, timeout=LEASE_TTL_S + 10) < LEASE_TTL_S + 5
    dynamo.aggregated = _aggregated(cluster, tiny_qwen3_dir, "aggregated-restarted")
    answer = cluster.openai().completions.create(model="tiny", prompt=PROMPT, **GREEDY)
    assert (answer.usage.prompt_tokens, answer.choices[0].text) == expected["completions"]


def test_two_nodes_register_once_from_node_0(dynamo, expected, tiny_qwen3_dir, tmp_path):
    cluster = dynamo.cluster
    common = [*cluster_args(tiny_qwen3_dir, base_port()), "--device", "cpu", "--context-length", "2048",
              "--served-model-name", "tiny-2n"]
    nodes = [cluster.worker(f"node{rank}", *common, "--node-rank", str(rank)) for rank in (0, 1)]
    try:
        cluster.wait_model("tiny-2n", watch=nodes)
        answer = cluster.openai().completions.create(model="tiny-2n", prompt=PROMPT, **GREEDY)
        assert (answer.usage.prompt_tokens, answer.choices[0].text) == expected["completions"]
        cards = _etcd_values(cluster, "v1/mdc/")
        assert sum('"tiny-2n"' in card for card in cards) == 1, cards
        assert "registered tiny-2n" in nodes[0].log and "registered" not in nodes[1].log
    finally:
        nodes[0].stop()  # node 0 stops every node
        assert nodes[1].popen.wait(30) == 0, nodes[1].log[-3000:]


def _etcd_values(cluster: DynamoCluster, prefix: str) -> list[str]:
    key = base64.b64encode(prefix.encode()).decode()
    end = base64.b64encode(prefix[:-1].encode() + bytes([ord(prefix[-1]) + 1])).decode()
    response = httpx.post(f"{cluster.env['ETCD_ENDPOINTS']}/v3/kv/range", json={"key": key, "range_end": end},
                          timeout=5)
    return [base64.b64decode(kv["value"]).decode(errors="replace") for kv in response.json().get("kvs", [])]


def test_client_disconnect_aborts_and_sigterm_unregisters_and_drains(dynamo, tiny_qwen3_dir):
    cluster, agg = dynamo.cluster, dynamo.aggregated
    client = cluster.openai()
    # A client leaving mid-stream: the worker aborts the request in meshserve's scheduler.
    stream = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=1500, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    deadline = time.monotonic() + 30
    while "cancelled by the frontend" not in agg.log and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "cancelled by the frontend" in agg.log, agg.log[-3000:]

    # SIGTERM with a request in flight: unregistered at once, and the request completes.
    result: dict[str, object] = {}

    def long_request() -> None:
        out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=200, temperature=0,
                                        extra_body={"ignore_eos": True})
        result["tokens"] = out.usage.completion_tokens
        result["finish"] = out.choices[0].finish_reason

    thread = threading.Thread(target=long_request)
    thread.start()
    time.sleep(1.0)
    agg.signal(signal.SIGTERM)
    gone_after = cluster.wait_model("tiny", present=False, timeout=10)
    thread.join(60)
    assert result == {"tokens": 200, "finish": "length"}, (result, agg.log[-3000:])
    assert gone_after < 3, gone_after  # the lease is revoked, not left to expire (30 s)
    assert agg.popen.wait(30) == 0, agg.log[-3000:]
    assert "unregistered and drained" in agg.log


def test_dynamo_flags_meshserve_lacks_are_refused_by_name():
    assert split_argv(["--endpoint", "dyn://ns.backend.generate", "--tp", "2"])[1].endpoint == "ns.backend.generate"
    with pytest.raises(SystemExit) as refused:
        split_argv(["--dyn-tool-call-parser", "hermes"])
    assert refused.value.code == 2
