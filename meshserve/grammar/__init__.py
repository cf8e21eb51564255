"""Structured output: outputs constrained by a JSON schema, a regex or an EBNF grammar (xgrammar)."""
