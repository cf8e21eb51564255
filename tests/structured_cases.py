"""Seeded generators of random JSON schemas and regular expressions for the structured-output tests.

Every generated schema and regex bounds its outputs (strings by maxLength, arrays by maxItems,
objects by additionalProperties false, numbers by bounds, regex repeats by {m,n}), so a model that
never chooses to stop still finishes within a few dozen tokens: a length-truncated output is then
a real failure, not noise.
"""

from __future__ import annotations

import random
import re
from typing import Any

_WORDS = ["alpha", "beta", "gamma", "delta", "id", "name", "size", "tags", "ok", "mode", "x", "y", "z_1"]


def random_schema(rng: random.Random) -> dict[str, Any]:
    """An object schema with nested objects, arrays, enums, bounded numbers, required fields and
    sometimes `$defs` referenced through `$ref`."""
    defs: dict[str, Any] = {}
    if rng.random() < 0.4:
        for i in range(rng.randint(1, 2)):
            defs[f"D{i}"] = _leaf(rng)
    schema = _object(rng, depth=0, defs=defs)
    if defs:
        schema["$defs"] = defs
    return schema


def _object(rng: random.Random, depth: int, defs: dict[str, Any]) -> dict[str, Any]:
    names = rng.sample(_WORDS, rng.randint(1, 3))
    properties = {name: _value(rng, depth + 1, defs) for name in names}
    required = [name for name in names if rng.random() < 0.7]
    schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        schema["required"] = required
    return schema


def _value(rng: random.Random, depth: int, defs: dict[str, Any]) -> dict[str, Any]:
    choices = ["leaf", "leaf", "leaf"]
    if depth < 3:
        choices += ["object", "array"]
    if defs:
        choices.append("ref")
    kind = rng.choice(choices)
    if kind == "object":
        return _object(rng, depth, defs)
    if kind == "array":
        low = rng.randint(0, 2)
        items = _object(rng, depth + 1, defs) if depth < 2 and rng.random() < 0.3 else _leaf(rng)
        return {"type": "array", "items": items, "minItems": low, "maxItems": low + rng.randint(0, 2)}
    if kind == "ref":
        return {"$ref": f"#/$defs/{rng.choice(sorted(defs))}"}
    return _leaf(rng)


def _leaf(rng: random.Random) -> dict[str, Any]:
    kind = rng.choice(["integer", "number", "boolean", "enum", "string", "null"])
    if kind == "integer":
        low = rng.randint(-100, 100)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 1000)}
    if kind == "number":
        low = rng.randint(-50, 50)
        return {"type": "number", "minimum": low, "maximum": low + rng.randint(1, 100)}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", 1, 2.5, True, None, "a b"], rng.randint(1, 4))}
    if kind == "string":
        low = rng.randint(0, 3)
        return {"type": "string", "minLength": low, "maxLength": low + rng.randint(0, 6)}
    return {"type": kind}


_CLASSES = ["[a-z]", "[0-9]", "[A-F]", r"\d", "[xyz]", "[a-c0-2]"]


def random_regex(rng: random.Random, depth: int = 0) -> str:
    """A regex of literals, character classes, bounded repeats, optional parts and alternations
    (a syntax Python's `re` and xgrammar read alike)."""
    parts = []
    for _ in range(rng.randint(1, 4)):
        kind = rng.choice(["literal", "class", "class", "group"] if depth < 2 else ["literal", "class"])
        if kind == "literal":
            atom = re.escape(rng.choice(["a", "b", "-", "_", "x", ".", "@", "ok"]))
        elif kind == "class":
            atom = rng.choice(_CLASSES)
        else:
            atom = "(" + "|".join(random_regex(rng, depth + 1) for _ in range(rng.randint(1, 3))) + ")"
        quantifier = rng.choice(["", "", "?", f"{{{rng.randint(1, 3)}}}", f"{{0,{rng.randint(1, 3)}}}",
                                 f"{{1,{rng.randint(2, 4)}}}"])
        parts.append(atom + quantifier)
    return "".join(parts)
