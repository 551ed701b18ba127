"""The request fields that ask for structured output, and the one constraint they make.

OpenAI's chat `response_format` (`json_object`, `json_schema`), vLLM's `structured_outputs`
object (`json`, `regex`, `choice`, `grammar`, `json_object`; vLLM >= 0.12) and the
`guided_json`, `guided_regex`, `guided_choice`, `guided_grammar` fields older vLLM clients
still send. A request may use one of them: two constraints at once are refused, naming the
second, rather than one silently winning.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from loramux.core.errors import InvalidArgument
from loramux.server.constraints.spec import ConstraintSpec


class JsonSchemaFormat(BaseModel):
    """OpenAI's `response_format.json_schema`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = Field(default=None, max_length=4096)
    # `schema` is also a (deprecated) BaseModel method: stored under another name
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    # Accepted either way: outputs always follow the schema strictly (no properties or
    # items the schema does not name), which is valid under strict and non-strict alike.
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's chat `response_format`: text, json_object or json_schema."""

    model_config = ConfigDict(extra="forbid")

    type: str
    json_schema: JsonSchemaFormat | None = None

    def constraint(self) -> ConstraintSpec | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return ConstraintSpec.json_object("response_format")
        if self.type == "json_schema":
            if self.json_schema is None:
                raise InvalidArgument("response_format.json_schema", "is required for json_schema")
            schema = self.json_schema.json_schema
            if schema is None:  # OpenAI: no schema means any JSON object
                return ConstraintSpec.json_object("response_format.json_schema.schema")
            return ConstraintSpec.json_schema(schema, "response_format.json_schema.schema")
        raise InvalidArgument(
            "response_format.type", f"must be text, json_object or json_schema, got {self.type!r}"
        )


_BUILDERS: dict[str, Callable[[Any, str], ConstraintSpec]] = {
    "json": ConstraintSpec.json_schema,
    "regex": ConstraintSpec.regex,
    "choice": ConstraintSpec.choice,
    "grammar": ConstraintSpec.grammar,
}


def _specs(prefix: str, **values: Any) -> list[ConstraintSpec]:
    """The constraints among `values` that are set, in _BUILDERS' order, each checked and
    named `prefix + key` (vLLM spells them `structured_outputs.regex` and `guided_regex`)."""
    return [
        _BUILDERS[key](values[key], prefix + key)
        for key in _BUILDERS
        if values.get(key) is not None
    ]


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs` (its StructuredOutputsParams): one of these set."""

    model_config = ConfigDict(extra="forbid")

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def constraints(self) -> list[ConstraintSpec]:
        found = _specs(
            "structured_outputs.",
            json=self.json_,
            regex=self.regex,
            choice=self.choice,
            grammar=self.grammar,
        )
        if self.json_object:
            found.append(ConstraintSpec.json_object("structured_outputs.json_object"))
        return found


class StructuredFields(BaseModel):
    """The fields both endpoints accept (chat adds `response_format`)."""

    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def requested_constraints(self) -> list[ConstraintSpec]:
        found = self.structured_outputs.constraints() if self.structured_outputs else []
        return found + _specs(
            "guided_",
            json=self.guided_json,
            regex=self.guided_regex,
            choice=self.guided_choice,
            grammar=self.guided_grammar,
        )

    def constraint(self) -> ConstraintSpec | None:
        """The request's one constraint (None: free text)."""
        found = self.requested_constraints()
        if len(found) > 1:
            raise InvalidArgument(
                found[1].field, f"a request takes one constraint; {found[0].field} is set too"
            )
        return found[0] if found else None
