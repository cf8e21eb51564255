"""Unit tests for meshserve.server.detokenizer, with the real SmolLM2 tokenizer (byte-level BPE)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from meshserve.messages import FinishReason
from meshserve.server.detokenizer import SequenceDetokenizer, StopStringFilter

TEXTS = [
    "Hello world, how are you?",
    "Zürich is schön — très bien!",
    "中文测试：你好，世界。",
    "Emoji time 🎉🚀 and a flag 🇫🇷 done",
    "  leading and   multiple   spaces\n\ttabs\n",
]


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model_dir), local_files_only=True)


def make(tokenizer, prompt_ids: Sequence[int] = (), stop: Sequence[str] = ()) -> SequenceDetokenizer:
    return SequenceDetokenizer(lambda ids: tokenizer.decode(ids, skip_special_tokens=True), prompt_ids, stop)


def stream(detok: SequenceDetokenizer, ids: Sequence[int], step: int, finish: FinishReason) -> list[str]:
    """Push `ids` `step` at a time, the last chunk with `finish`; return the emitted pieces."""
    pieces = []
    for start in range(0, len(ids), step):
        chunk = ids[start : start + step]
        pieces.append(detok.push(chunk, finish if start + step >= len(ids) else None))
    return pieces


LENGTH = FinishReason(kind="length")


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("step", [1, 2, 3])
def test_streamed_text_equals_full_decode_and_never_splits_a_character(tokenizer, text, step):
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = stream(make(tokenizer), ids, step, LENGTH)
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


def test_first_output_token_keeps_its_leading_space(tokenizer):
    prompt = tokenizer.encode("The capital of France is", add_special_tokens=False)
    output = tokenizer.encode(" Paris.", add_special_tokens=False)
    assert "".join(stream(make(tokenizer, prompt), output, 1, LENGTH)) == " Paris."


def test_incomplete_character_is_held_then_flushed_at_the_end(tokenizer):
    ids = tokenizer.encode("ok 🎉", add_special_tokens=False)
    complete = ids[:-1]  # the emoji's last byte token is left out
    detok = make(tokenizer)
    held = [detok.push([i]) for i in complete]
    assert "".join(held) == "ok" and held[-1] == ""  # a lone emoji byte is held back
    assert detok.push([], LENGTH) == tokenizer.decode(complete)[len("ok") :]


@pytest.mark.parametrize("step", [1, 2, 4])
@pytest.mark.parametrize(
    ("text", "stop", "expected"),
    [
        ("Hello world, how are you?", ["o w"], "Hell"),
        ("Hello world, how are you?", ["how", "world"], "Hello "),
        ("Hello world, how are you?", ["are you?"], "Hello world, how "),
        ("Hello world, how are you?", ["zzz"], "Hello world, how are you?"),
        ("Ends with a partial stop: abc", ["abcd"], "Ends with a partial stop: abc"),
        ("Zürich is schön — très bien!", ["ön —"], "Zürich is sch"),
        ("Emoji 🎉🚀 time", ["🚀"], "Emoji 🎉"),
    ],
)
def test_stop_strings_across_token_boundaries(tokenizer, text, stop, expected, step):
    ids = tokenizer.encode(text, add_special_tokens=False)
    matched = next((s for s in sorted(stop, key=text.find) if s in text), None)
    finish = FinishReason(kind="stop", matched=matched) if matched else LENGTH
    detok = make(tokenizer, stop=stop)
    pieces = stream(detok, ids, step, finish)
    assert "".join(pieces) == expected
    assert detok.stop_matched == matched
    for s in stop:
        assert s not in "".join(pieces)


def test_text_that_may_become_a_stop_string_is_held_back(tokenizer):
    detok = make(tokenizer, stop=["world!"])
    first = detok.push(tokenizer.encode("Hello wor", add_special_tokens=False))
    assert first == "Hello "
    rest = detok.push(tokenizer.encode("m.", add_special_tokens=False), LENGTH)
    assert first + rest == "Hello worm."


def test_stop_found_before_the_scheduler_says_so_ends_the_text(tokenizer):
    # The scheduler decodes on its own; if it has not stopped yet, nothing after the stop leaks.
    detok = make(tokenizer, stop=["STOP"])
    emitted = detok.push(tokenizer.encode("abc STOP def", add_special_tokens=False))
    assert detok.stop_matched == "STOP"
    assert emitted + detok.push(tokenizer.encode(" more", add_special_tokens=False), LENGTH) == "abc "


def test_stop_token_text_is_not_output(tokenizer):
    ids = tokenizer.encode("Hi there.", add_special_tokens=False)
    detok = SequenceDetokenizer(lambda i: tokenizer.decode(i, skip_special_tokens=False), [], [])
    text = detok.push(ids, FinishReason(kind="stop", matched=ids[-1]))
    assert text == "Hi there"


def test_special_tokens_skipped_or_kept(tokenizer):
    eos = tokenizer.eos_token_id
    ids = [*tokenizer.encode("Hi", add_special_tokens=False), eos, *tokenizer.encode(" you", add_special_tokens=False)]
    skip = SequenceDetokenizer(lambda i: tokenizer.decode(i, skip_special_tokens=True), [], [])
    keep = SequenceDetokenizer(lambda i: tokenizer.decode(i, skip_special_tokens=False), [], [])
    assert "".join(stream(skip, ids, 1, LENGTH)) == "Hi you"
    assert "".join(stream(keep, ids, 1, LENGTH)) == f"Hi{tokenizer.eos_token} you"


class TestStopStringFilter:
    def test_no_stops_passes_everything_through(self):
        f = StopStringFilter([])
        assert f.push("abc") == "abc" and f.flush() == ""

    def test_holds_longest_prefix_and_releases_it_when_it_diverges(self):
        f = StopStringFilter(["abcd", "cx"])
        assert f.push("zzabc") == "zz"
        assert f.push("e") == "abce"
        assert f.matched is None

    def test_match_spanning_pushes(self):
        f = StopStringFilter(["abcd"])
        assert f.push("xab") == "x"
        assert f.push("c") == ""
        assert f.push("dyy") == ""
        assert f.matched == "abcd"
        assert f.push("more") == "" and f.flush() == ""

    def test_earliest_stop_wins(self):
        f = StopStringFilter(["late", "ear"])
        assert f.push("the early and late") == "the "
        assert f.matched == "ear"
