"""Tool calling in chat (issue 26): the request's tools, the call format, the constraint
that forces a call, and the parser that finds calls in generated text.

The model is shown its tools by its own chat template (transformers'
``apply_chat_template(..., tools=...)``), because that is the rendering it was trained on;
a call is therefore written in the format that template teaches. LoRAMux knows one such
format, the Hermes one Qwen2/2.5/3, Hermes and many fine-tunes use::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A template "supports tools" when it reads the `tools` variable and teaches this format (it
contains ``<tool_call>``). A template that does neither cannot show the model its tools in
a way it understands, so a request with tools is refused (400 naming `tools`) rather than
rendered in a made-up generic way the model was never trained on.

`tool_choice` `required` and a named function are enforced with a structured-output
constraint (an xgrammar structural tag, compiled like every other constraint): each call's
``begin`` is fixed text up to the arguments, the arguments are JSON under the function's
schema, so every returned call names a listed function and its arguments validate. `auto`
generates freely and parses calls out of the text by the same format; a block that does
not parse (bad JSON, an unknown name) stays in the content.

Nothing here imports the transport: the HTTP front validates with it, the engine renders
with it, the compiler compiles the spec it makes.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from loramux.core.errors import InvalidArgument
from loramux.server.constraints.spec import (
    MAX_SCHEMA_CHARS,
    ConstraintKind,
    ConstraintSpec,
)

MAX_TOOLS = 128  # functions in one request
MAX_DESCRIPTION_CHARS = 4096
MAX_WHITESPACE = 8  # in a forced call's arguments, as constraints/compiler.py allows
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
CHOICES = ("none", "auto", "required")


@dataclass(frozen=True)
class ToolCallFormat:
    """How a chat template asks the model to write a call.

    A call is ``begin + name + middle + <arguments JSON> + end``; several calls are joined by
    `separator`. `open_tag` and `close_tag` delimit a call when parsing free text."""

    name: str
    begin: str
    middle: str
    end: str
    separator: str
    open_tag: str
    close_tag: str


HERMES = ToolCallFormat(
    name="hermes",
    begin='<tool_call>\n{"name": "',
    middle='", "arguments": ',
    end="}\n</tool_call>",
    separator="\n",
    open_tag="<tool_call>",
    close_tag="</tool_call>",
)


def template_format(template: str | Mapping[str, str] | None) -> ToolCallFormat | None:
    """The call format a chat template teaches, or None when it cannot render tools.

    Read from the template's source: it must use the `tools` variable (else tools never
    reach the prompt) and contain Hermes' ``<tool_call>`` (the one format parsed here). A
    tokenizer with several named templates renders tools with its `tool_use` one, as
    transformers does."""
    if isinstance(template, Mapping):
        template = template.get("tool_use") or template.get("default")
    if not template or not re.search(r"\btools\b", template):
        return None
    return HERMES if HERMES.open_tag in template else None


@dataclass(frozen=True)
class Function:
    """One function the caller offers: its name, description and parameters' JSON schema."""

    name: str
    description: str | None
    parameters: dict[str, Any]

    def template_entry(self) -> dict[str, Any]:
        """OpenAI's tool object, as chat templates expect it (`tool.function.name`...)."""
        function: dict[str, Any] = {"name": self.name, "parameters": self.parameters}
        if self.description is not None:
            function["description"] = self.description
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolRequest:
    """A chat request's validated `tools`, `tool_choice` and `parallel_tool_calls`.

    `choice`: "none", "auto", "required", or the name of the one function to call."""

    functions: tuple[Function, ...]
    choice: str
    parallel: bool

    @property
    def calls_parsed(self) -> bool:
        """Whether the reply is searched for calls (not with `none`)."""
        return self.choice != "none"

    @property
    def forced(self) -> bool:
        """Whether the reply must be calls (`required` or a named function)."""
        return self.choice not in ("none", "auto")

    def names(self) -> frozenset[str]:
        if self.forced and self.choice != "required":
            return frozenset({self.choice})
        return frozenset(f.name for f in self.functions)

    def template_tools(self) -> list[dict[str, Any]]:
        return [f.template_entry() for f in self.functions]

    def constraint(self, fmt: ToolCallFormat) -> ConstraintSpec | None:
        """The constraint that makes the reply calls in `fmt` (None unless forced).

        A named function: exactly one call of it. `required`: one call or more (one when
        parallel_tool_calls is false) of any listed function, separated as the format
        separates them, and nothing else."""
        if not self.forced:
            return None
        offered = [f for f in self.functions if f.name in self.names()]
        tags = [
            {
                "type": "tag",
                "begin": fmt.begin + f.name + fmt.middle,
                "content": {
                    "type": "json_schema",
                    "json_schema": f.parameters,
                    "max_whitespace_cnt": MAX_WHITESPACE,
                },
                "end": fmt.end,
            }
            for f in offered
        ]
        if self.choice != "required":
            shape: dict[str, Any] = tags[0]
        else:
            shape = {
                "type": "tags_with_separator",
                "tags": tags,
                "separator": fmt.separator,
                "at_least_one": True,
                "stop_after_first": not self.parallel,
            }
        source = json.dumps(
            {"type": "structural_tag", "format": shape}, separators=(",", ":"), ensure_ascii=False
        )
        if len(source) > MAX_SCHEMA_CHARS * 4:
            raise InvalidArgument("tools", f"are longer than {MAX_SCHEMA_CHARS * 4} characters")
        # named after `tools`: a schema there is what fails to compile, if anything does
        return ConstraintSpec(ConstraintKind.TOOL_CALLS, source, "tools")


def parse_request(tools: Any, tool_choice: Any, parallel: bool | None) -> ToolRequest | None:
    """Validate OpenAI's tool fields, naming the field at fault; None: no tools asked.

    `tool_choice` without `tools` is refused, as OpenAI does; `tools` without
    `tool_choice` means `auto`."""
    if tools is None or tools == []:
        if tool_choice is not None and tool_choice != "none":
            raise InvalidArgument("tool_choice", "needs tools")
        return None
    if not isinstance(tools, list):
        raise InvalidArgument("tools", "must be a list of tools")
    if len(tools) > MAX_TOOLS:
        raise InvalidArgument("tools", f"at most {MAX_TOOLS} tools, got {len(tools)}")
    functions: list[Function] = []
    for i, tool in enumerate(tools):
        functions.append(_function(tool, f"tools[{i}]"))
        if functions[-1].name in {f.name for f in functions[:-1]}:
            raise InvalidArgument(f"tools[{i}].function.name", "repeats an earlier tool's name")
    return ToolRequest(
        tuple(functions),
        _choice(tool_choice, {f.name for f in functions}),
        True if parallel is None else parallel,
    )


def _function(tool: Any, field: str) -> Function:
    if not isinstance(tool, dict):
        raise InvalidArgument(field, "must be an object")
    unknown = set(tool) - {"type", "function"}
    if unknown:
        raise InvalidArgument(f"{field}.{sorted(unknown)[0]}", "is not a recognised tool field")
    if tool.get("type") != "function":
        raise InvalidArgument(f"{field}.type", "must be 'function'")
    function = tool.get("function")
    if not isinstance(function, dict):
        raise InvalidArgument(f"{field}.function", "must be an object")
    unknown = set(function) - {"name", "description", "parameters", "strict"}
    if unknown:
        raise InvalidArgument(
            f"{field}.function.{sorted(unknown)[0]}", "is not a recognised function field"
        )
    name = function.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise InvalidArgument(
            f"{field}.function.name", "must be 1-64 letters, digits, underscores or dashes"
        )
    description = function.get("description")
    if description is not None and (
        not isinstance(description, str) or len(description) > MAX_DESCRIPTION_CHARS
    ):
        raise InvalidArgument(
            f"{field}.function.description", f"must be text of <= {MAX_DESCRIPTION_CHARS} chars"
        )
    parameters = function.get("parameters")
    if parameters is None:  # OpenAI: a function without parameters takes an empty object
        parameters = {"type": "object", "properties": {}}
    if not isinstance(parameters, dict):
        raise InvalidArgument(f"{field}.function.parameters", "must be a JSON schema object")
    # size and nesting bounded as any tenant-given schema is
    ConstraintSpec.json_schema(parameters, f"{field}.function.parameters")
    strict = function.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise InvalidArgument(f"{field}.function.strict", "must be a boolean")
    return Function(name, description, parameters)


def _choice(tool_choice: Any, names: set[str]) -> str:
    if tool_choice is None:
        return "auto"
    if isinstance(tool_choice, str):
        if tool_choice not in CHOICES:
            raise InvalidArgument(
                "tool_choice", f"must be none, auto, required or a function, got {tool_choice!r}"
            )
        return tool_choice
    if not isinstance(tool_choice, dict) or tool_choice.get("type") != "function":
        raise InvalidArgument("tool_choice", "must be none, auto, required or a function")
    function = tool_choice.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise InvalidArgument("tool_choice.function.name", "is required")
    if name not in names:
        raise InvalidArgument("tool_choice.function.name", f"names no tool in tools: {name!r}")
    return name


# -- the reply --


@dataclass(frozen=True)
class ToolCall:
    """A parsed call in OpenAI's shape: `arguments` is JSON text."""

    id: str
    name: str
    arguments: str

    def openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class CallParser:
    """Splits generated text, fed piece by piece, into content and calls.

    Text that may be the start of a call's open tag is held back until it is known not to
    be; a call is returned once its close tag arrives, if its JSON names an offered function
    with object arguments (otherwise its text is content). Content that is only whitespace
    (the separator between calls, the newline before one) is held until real content
    follows, and dropped at the end: the same for a stream and a whole reply."""

    def __init__(self, fmt: ToolCallFormat, names: frozenset[str], limit: int | None) -> None:
        self.fmt = fmt
        self.names = names
        self.limit = limit  # calls at most (parallel_tool_calls false: 1)
        self.calls: list[ToolCall] = []
        self._buffer = ""
        self._in_call = False
        self._blank = ""  # whitespace-only content not yet given out

    def feed(self, text: str) -> list[str | ToolCall]:
        """What `text` (the next piece of the reply) makes known: content and calls."""
        self._buffer += text
        out: list[str | ToolCall] = []
        fmt = self.fmt
        while True:
            if not self._in_call:
                at = self._buffer.find(fmt.open_tag)
                full = self.limit is not None and len(self.calls) >= self.limit
                if at < 0 or full:
                    keep = 0 if full else _partial_suffix(self._buffer, fmt.open_tag)
                    self._content(self._buffer[: len(self._buffer) - keep], out)
                    self._buffer = self._buffer[len(self._buffer) - keep :]
                    return out
                self._content(self._buffer[:at], out)
                self._buffer = self._buffer[at + len(fmt.open_tag) :]
                self._in_call = True
            at = self._buffer.find(fmt.close_tag)
            if at < 0:
                return out
            body = self._buffer[:at]
            self._buffer = self._buffer[at + len(fmt.close_tag) :]
            self._in_call = False
            call = self._call(body)
            if call is None:
                self._content(fmt.open_tag + body + fmt.close_tag, out)
            else:
                self.calls.append(call)
                out.append(call)

    def finish(self) -> list[str]:
        """The rest, at the end of the reply: an unfinished call is content."""
        rest = (self.fmt.open_tag if self._in_call else "") + self._buffer
        self._buffer, self._in_call = "", False
        out: list[str | ToolCall] = []
        self._content(rest, out)
        return [piece for piece in out if isinstance(piece, str)]

    def _content(self, text: str, out: list[str | ToolCall]) -> None:
        if not text:
            return
        if not text.strip():
            self._blank += text
            return
        out.append(self._blank + text)
        self._blank = ""

    def _call(self, body: str) -> ToolCall | None:
        try:
            value = json.loads(body)
        except ValueError:
            return None
        if not isinstance(value, dict) or value.get("name") not in self.names:
            return None
        arguments = value.get("arguments", value.get("parameters", {}))
        if isinstance(arguments, str):  # some models write the arguments as JSON text
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        if not isinstance(arguments, dict):
            return None
        return ToolCall(
            new_call_id(), str(value["name"]), json.dumps(arguments, ensure_ascii=False)
        )


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of `text` that is a proper start of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def template_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI's messages as chat templates expect them: an assistant's `tool_calls` with
    `arguments` as an object (templates write it with `tojson`), `tool` messages with their
    `tool_call_id`, everything else as role and text."""
    out = []
    for i, message in enumerate(messages):
        entry: dict[str, Any] = {"role": message["role"], "content": message.get("content")}
        if message.get("name") is not None:
            entry["name"] = message["name"]
        if message.get("tool_call_id") is not None:
            entry["tool_call_id"] = message["tool_call_id"]
        calls = message.get("tool_calls")
        if calls:
            entry["tool_calls"] = [
                {
                    "id": call["id"],
                    "type": "function",
                    "function": {
                        "name": call["function"]["name"],
                        "arguments": _arguments(
                            call["function"]["arguments"],
                            f"messages[{i}].tool_calls[{j}].function.arguments",
                        ),
                    },
                }
                for j, call in enumerate(calls)
            ]
        out.append(entry)
    return out


def _arguments(text: str, field: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        raise InvalidArgument(field, "is not valid JSON") from None
