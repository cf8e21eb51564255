"""GrammarSpec: what a structured request asks for, checked before anything reaches a scheduler.

The check builds the grammar without a tokenizer (xgrammar's `Grammar.from_*`, well under a
millisecond for ordinary schemas), so a bad schema, regex or EBNF is a 400 naming the problem
while the scheduler compiles only grammars known to be valid. Compilation against the vocabulary
(the token masks) happens in the scheduler, off its critical path (`grammar/backend.py`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import xgrammar

# xgrammar's messages start with "[hh:mm:ss] /path/file.cc:line: "; the client needs the rest.
_LOCATION = re.compile(r"^\[[0-9:]+\] \S+?:\d+: ")
# Outputs stay compact: without this, xgrammar allows any whitespace between JSON tokens, and a
# model that likes spaces could fill max_tokens with them.
JSON_OPTIONS = dict(any_whitespace=False, strict_mode=False)
# OpenAI's response_format {"type": "json_object"}: any JSON object.
JSON_OBJECT_SCHEMA = '{"type": "object"}'


class GrammarError(ValueError):
    """The grammar cannot be built; the message says why (the HTTP layer answers 400)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind


@dataclass(frozen=True)
class GrammarSpec:
    kind: str  # json_schema | regex | ebnf (the SamplingParams field it came from)
    text: str

    def grammar(self) -> xgrammar.Grammar:
        """The grammar, or GrammarError naming the problem."""
        try:
            if self.kind == "json_schema":
                json.loads(self.text)  # its own, clearer message for text that is not JSON
                return xgrammar.Grammar.from_json_schema(self.text, **JSON_OPTIONS)
            if self.kind == "regex":
                return xgrammar.Grammar.from_regex(self.text)
            if self.kind == "ebnf":
                return xgrammar.Grammar.from_ebnf(self.text)
        except json.JSONDecodeError as err:
            raise GrammarError(self.kind, f"not valid JSON: {err}") from None
        except (RuntimeError, ValueError, TypeError) as err:
            message = _LOCATION.sub("", str(err).strip()) or type(err).__name__
            raise GrammarError(self.kind, f"invalid {_NAMES[self.kind]}: {message}") from None
        raise GrammarError(self.kind, f"unknown grammar kind {self.kind!r}")

    def check(self) -> None:
        self.grammar()


_NAMES = {"json_schema": "JSON schema", "regex": "regular expression", "ebnf": "EBNF grammar"}
