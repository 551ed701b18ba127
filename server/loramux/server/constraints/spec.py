"""What a request asked to be constrained to, checked before anything is compiled.

A constraint is tenant input handed to a compiler whose cost grows with it: every source is
bounded in size (and a JSON schema in nesting depth) here, so that a hostile request is
refused with the field it came in before it costs compile time.
"""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from loramux.core.errors import InvalidArgument

MAX_SCHEMA_CHARS = 32_768  # a JSON schema, as compact JSON text
MAX_SCHEMA_DEPTH = 32  # nested objects and arrays of a JSON schema (each property level is 2)
MAX_REGEX_CHARS = 2_048
MAX_GRAMMAR_CHARS = 16_384
MAX_CHOICES = 256
MAX_CHOICE_CHARS = 512  # each choice


class ConstraintKind(enum.StrEnum):
    """What shape a request's output must have (the label of the metrics, too)."""

    JSON_OBJECT = "json_object"  # any JSON object
    JSON_SCHEMA = "json_schema"  # JSON valid against a schema
    REGEX = "regex"  # a match of a regular expression, whole
    CHOICE = "choice"  # exactly one of a list of strings
    GRAMMAR = "grammar"  # a context-free grammar in xgrammar's EBNF (GBNF)
    # calls of the request's tools in its chat template's format (server/tools.py makes
    # the source: an xgrammar structural tag, each call's arguments under its schema)
    TOOL_CALLS = "tool_calls"


@dataclass(frozen=True)
class ConstraintSpec:
    """One request's constraint: its kind, its source text and the field it came in.

    `source` is canonical text (a schema as compact JSON, choices as a JSON
    list), so that equal constraints share one compiled grammar (`digest`). `field` names
    the request field in errors ("response_format.json_schema.schema", "guided_regex").
    """

    kind: ConstraintKind
    source: str
    field: str

    @property
    def digest(self) -> str:
        return hashlib.sha256(f"{self.kind.value}\0{self.source}".encode()).hexdigest()

    @classmethod
    def json_object(cls, field: str) -> ConstraintSpec:
        return cls(ConstraintKind.JSON_OBJECT, "", field)

    @classmethod
    def json_schema(cls, schema: Any, field: str) -> ConstraintSpec:
        """A schema given as an object, or as JSON text (vLLM's guided_json takes both)."""
        if isinstance(schema, str):
            if len(schema) > MAX_SCHEMA_CHARS:
                raise InvalidArgument(field, f"is longer than {MAX_SCHEMA_CHARS} characters")
            try:
                schema = json.loads(schema)
            except ValueError as exc:
                raise InvalidArgument(field, f"is not valid JSON: {exc}") from None
        if not isinstance(schema, dict | bool):
            raise InvalidArgument(field, "must be a JSON schema (an object)")
        depth = _depth(schema)
        if depth > MAX_SCHEMA_DEPTH:
            raise InvalidArgument(field, f"nests {depth} levels; at most {MAX_SCHEMA_DEPTH}")
        # key order kept: a schema's property order is the order the output writes them
        text = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
        if len(text) > MAX_SCHEMA_CHARS:
            raise InvalidArgument(field, f"is longer than {MAX_SCHEMA_CHARS} characters")
        return cls(ConstraintKind.JSON_SCHEMA, text, field)

    @classmethod
    def regex(cls, pattern: Any, field: str) -> ConstraintSpec:
        if not isinstance(pattern, str) or not pattern:
            raise InvalidArgument(field, "must be a non-empty regular expression")
        if len(pattern) > MAX_REGEX_CHARS:
            raise InvalidArgument(field, f"is longer than {MAX_REGEX_CHARS} characters")
        return cls(ConstraintKind.REGEX, pattern, field)

    @classmethod
    def choice(cls, choices: Any, field: str) -> ConstraintSpec:
        if (
            not isinstance(choices, list)
            or not choices
            or not all(isinstance(c, str) and c for c in choices)
        ):
            raise InvalidArgument(field, "must be a non-empty list of non-empty strings")
        if len(choices) > MAX_CHOICES:
            raise InvalidArgument(field, f"has {len(choices)} choices; at most {MAX_CHOICES}")
        if any(len(c) > MAX_CHOICE_CHARS for c in choices):
            raise InvalidArgument(field, f"has a choice longer than {MAX_CHOICE_CHARS} characters")
        return cls(ConstraintKind.CHOICE, json.dumps(choices, ensure_ascii=False), field)

    @classmethod
    def grammar(cls, grammar: Any, field: str) -> ConstraintSpec:
        if not isinstance(grammar, str) or not grammar.strip():
            raise InvalidArgument(field, "must be a non-empty EBNF grammar")
        if len(grammar) > MAX_GRAMMAR_CHARS:
            raise InvalidArgument(field, f"is longer than {MAX_GRAMMAR_CHARS} characters")
        return cls(ConstraintKind.GRAMMAR, grammar, field)

    def choices(self) -> list[str]:
        return list(json.loads(self.source)) if self.kind is ConstraintKind.CHOICE else []

    def schema(self) -> Any:
        return json.loads(self.source) if self.kind is ConstraintKind.JSON_SCHEMA else None


def _depth(value: Any) -> int:
    """Nesting depth of JSON containers, iteratively (a deep value must not exhaust the
    Python stack here either)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, level = todo.pop()
        if isinstance(item, dict):
            deepest = max(deepest, level)
            todo.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            deepest = max(deepest, level)
            todo.extend((v, level + 1) for v in item)
    return deepest
