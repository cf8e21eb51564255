"""Tool calls of /v1/chat/completions: how each model family writes a call in its output, the
grammar that forces one (tool_choice required or a named function), and the parsers that turn
the generated text back into OpenAI `tool_calls`.

Formats, by their SGLang `--tool-call-parser` names:
  hermes, qwen, qwen25   <tool_call>\n{"name": "f", "arguments": {...}}\n</tool_call>  (repeatable)
  llama3                 [<|python_tag|>]{"name": "f", "parameters": {...}}  (several joined by ";")
The default follows the model: Qwen2/Qwen3 write the Hermes format, Llama the Llama-3 one.

Forced calls are generated under a grammar (meshserve/grammar/): the JSON of one call of one of
the allowed functions, with each function's `parameters` schema as the arguments' schema, so the
output parses and its arguments validate. With tool_choice auto the model chooses, and text that
does not parse as a call stays content.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

import xgrammar

from meshserve.grammar.spec import JSON_OPTIONS

TOOL_CALL_PARSERS = ("hermes", "qwen", "qwen25", "llama3")
_DEFAULT_BY_ARCHITECTURE = {"Qwen2ForCausalLM": "qwen25", "Qwen3ForCausalLM": "qwen25",
                            "LlamaForCausalLM": "llama3"}


# OpenAI: a function given without `parameters` takes none.
_NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


def default_tool_call_parser(architecture: str) -> str | None:
    return _DEFAULT_BY_ARCHITECTURE.get(architecture)


class ToolCallError(ValueError):
    """A tools / tool_choice the request cannot have (the HTTP layer answers 400, naming `param`)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text of an object

    def body(self, index: int) -> dict[str, Any]:
        return {"index": index, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ToolCallFormat:
    name: str
    start: str  # what opens a call in the output ("" for llama3: the JSON itself)
    end: str  # what closes one ("" when the JSON's end does)
    arguments_key: str  # "arguments" (Hermes) or "parameters" (Llama 3)

    def call_schema(self, functions: list[dict[str, Any]]) -> dict[str, Any]:
        """JSON schema of one call of any of `functions` (OpenAI function objects)."""
        options = [{
            "type": "object",
            "properties": {"name": {"const": f["name"]},
                           self.arguments_key: f.get("parameters") or _NO_PARAMETERS},
            "required": ["name", self.arguments_key],
            "additionalProperties": False,
        } for f in functions]
        return options[0] if len(options) == 1 else {"anyOf": options}

    def forced_grammar(self, functions: list[dict[str, Any]]) -> dict[str, str]:
        """The SamplingParams grammar field that makes the output exactly one call."""
        schema = json.dumps(self.call_schema(functions))
        if not self.start and not self.end:
            return {"json_schema": schema}
        try:
            call = xgrammar.Grammar.from_json_schema(schema, **JSON_OPTIONS)
        except RuntimeError as err:
            raise ToolCallError(f"a function's parameters are not a usable JSON schema: {err}", "tools") from None
        parts = [xgrammar.Grammar.from_ebnf(f"root ::= {json.dumps(text)}") for text in (self.start, self.end)]
        return {"ebnf": str(xgrammar.Grammar.concat(parts[0], call, parts[1]))}

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """(content, calls): the calls found in `text` and the text around them; text that does
        not parse as a call is left in the content."""
        if self.start:
            return self._parse_tagged(text)
        return self._parse_json(text)

    def _parse_tagged(self, text: str) -> tuple[str, list[ToolCall]]:
        calls: list[ToolCall] = []
        content: list[str] = []
        pos = 0
        pattern = re.compile(re.escape(self.start) + r"(.*?)(?:" + re.escape(self.end) + r"|$)", re.DOTALL)
        for match in pattern.finditer(text):
            call = self._call(match.group(1))
            if call is None:
                continue
            content.append(text[pos : match.start()])
            calls.append(call)
            pos = match.end()
        content.append(text[pos:])
        return "".join(content).strip() if calls else text, calls

    def _parse_json(self, text: str) -> tuple[str, list[ToolCall]]:
        body = text.strip().removeprefix("<|python_tag|>")
        if not body.startswith("{"):
            return text, []
        calls = []
        decoder = json.JSONDecoder(strict=False)
        pos = 0
        while pos < len(body):
            try:
                obj, end = decoder.raw_decode(body, pos)
            except json.JSONDecodeError:
                return text, []
            call = self._call_from(obj)
            if call is None:
                return text, []
            calls.append(call)
            pos = end
            rest = body[pos:].lstrip()
            if rest.startswith(";"):
                rest = rest[1:].lstrip()
            pos = len(body) - len(rest)
        return "", calls

    def _call(self, json_text: str) -> ToolCall | None:
        try:
            return self._call_from(json.loads(json_text.strip(), strict=False))
        except json.JSONDecodeError:
            return None

    def _call_from(self, obj: Any) -> ToolCall | None:
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        arguments = obj.get(self.arguments_key, obj.get("arguments", obj.get("parameters", {})))
        if not isinstance(arguments, dict):
            return None
        return ToolCall(obj["name"], json.dumps(arguments, ensure_ascii=False))


_HERMES = ToolCallFormat("hermes", "<tool_call>\n", "\n</tool_call>", "arguments")
FORMATS = {"hermes": _HERMES, "qwen": _HERMES, "qwen25": _HERMES,
           "llama3": ToolCallFormat("llama3", "", "", "parameters")}


@dataclass(frozen=True)
class ToolRequest:
    """What a chat request asked of tools: the format to parse (None: no parsing, tool_choice
    none) and the grammar forcing a call (empty: the model chooses)."""

    format: ToolCallFormat | None
    grammar: dict[str, str]

    @classmethod
    def from_fields(cls, tools: list[dict[str, Any]] | None, tool_choice: str | dict[str, Any] | None,
                    parser: str | None) -> ToolRequest:
        if not tools:
            if tool_choice not in (None, "none", "auto"):
                raise ToolCallError("tool_choice needs tools", "tool_choice")
            return cls(None, {})
        functions = []
        for i, tool in enumerate(tools):
            function = tool.get("function") if isinstance(tool, dict) else None
            if tool.get("type") != "function" or not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise ToolCallError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}", "tools")
            functions.append(function)
        choice = tool_choice if tool_choice is not None else "auto"
        if choice == "none":
            return cls(None, {})
        if parser is None:
            raise ToolCallError("this server has no tool-call format for its model: start it with "
                                f"--tool-call-parser ({', '.join(TOOL_CALL_PARSERS)})", "tools")
        fmt = FORMATS[parser]
        if choice == "auto":
            return cls(fmt, {})
        if choice == "required":
            return cls(fmt, fmt.forced_grammar(functions))
        if isinstance(choice, dict) and choice.get("type") == "function":
            name = (choice.get("function") or {}).get("name")
            named = [f for f in functions if f["name"] == name]
            if not named:
                raise ToolCallError(f"tool_choice names {name!r}, which is not among the tools", "tool_choice")
            return cls(fmt, fmt.forced_grammar(named))
        raise ToolCallError("tool_choice must be none, auto, required or {'type': 'function', "
                            "'function': {'name': ...}}", "tool_choice")


class ToolCallStream:
    """Streaming: content is passed on until a call may start; from there the text is held and
    parsed at the end, where the calls go out as `tool_calls` deltas."""

    def __init__(self, fmt: ToolCallFormat) -> None:
        self.format = fmt
        self.held = ""
        self.holding = False  # a call may have started: hold everything from here
        self.content = False  # llama3: the output began as content, so it holds no call

    def push(self, text: str) -> str:
        """The content to send now for the new `text`."""
        if self.holding:
            self.held += text
            return ""
        combined, self.held = self.held + text, ""
        if not self.format.start:  # Llama 3: a call is the whole output
            if self.content:
                return combined
            head = combined.lstrip()
            if head.startswith(("{", "<|python_tag|>")):
                self.held, self.holding = combined, True
                return ""
            if not head or "<|python_tag|>".startswith(head):
                self.held = combined  # undecided yet
                return ""
            self.content = True
            return combined
        at = combined.find(self.format.start)
        if at >= 0:
            self.held, self.holding = combined[at:], True
            return combined[:at]
        # Hold back a tail that could be the start of the marker.
        marker = self.format.start
        keep = next((k for k in range(min(len(marker) - 1, len(combined)), 0, -1)
                     if marker.startswith(combined[-k:])), 0)
        self.held = combined[len(combined) - keep :]
        return combined[: len(combined) - keep]

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(content still to send, the calls) at the end of the output."""
        content, calls = self.format.parse(self.held) if self.held else ("", [])
        self.held = ""
        return content, calls
