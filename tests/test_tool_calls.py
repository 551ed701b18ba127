"""Issue 26 point 3: tool calling in chat, over HTTP through the `openai` client.

The model with a tool-aware template is SmolLM2-135M-Instruct's real weights in a local
Hugging Face folder the test makes, whose tokenizer carries a Qwen2.5-style (Hermes) chat
template (tests/data/hermes_tools_template.jinja). `tool_choice` required and a named
function must come back as calls whose arguments validate against the function's schema
(python `jsonschema`), streamed or not, under any adapter of a mixed batch; `auto` parses
calls out of free text; a `tool` message renders in the next turn; bad input is a 400
naming the field. The default model's template has no tools support: its 400s are in
tests/test_structured_outputs.py.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from api_helpers import free_port, linear_shapes

from loramux.client import LoramuxClient
from loramux.core.config import Settings
from loramux.core.models import ResolvedModel
from loramux.server.app import RunningServer, start_server
from loramux.server.synthetic import write_random_adapter
from loramux.server.tools import HERMES, CallParser, ToolCall, template_format

ADMIN_KEY = "admin-tools-key"
BASE = "smol-tools"
ADAPTERS = ("t1", "t2", "t3", "t4")
TEMPLATE = Path(__file__).parent / "data" / "hermes_tools_template.jinja"

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Paris", "Rome", "Oslo"]},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
}
ADD = {
    "type": "object",
    "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 99},
        "b": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["a", "b"],
}
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": WEATHER,
        },
    },
    {
        "type": "function",
        "function": {"name": "add", "description": "Add two numbers.", "parameters": ADD},
    },
]
ASK = [{"role": "user", "content": "What is the weather in Paris? Use celsius."}]


@pytest.fixture(scope="module")
def tool_model(smollm2: ResolvedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2's weights (linked) with a tokenizer whose chat template renders tools."""
    folder = tmp_path_factory.mktemp("smol-tools") / "model"
    folder.mkdir()
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        shutil.copy(smollm2.path / name, folder / name)
    (folder / "model.safetensors").symlink_to(smollm2.path / "model.safetensors")
    config = json.loads((smollm2.path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    shutil.copy(TEMPLATE, folder / "chat_template.jinja")
    return folder


@pytest.fixture(scope="module")
def server(
    tool_model: Path, tmp_path_factory: pytest.TempPathFactory, default_models_dir: Path
) -> Iterator[RunningServer]:
    home = tmp_path_factory.mktemp("tools-home")
    (home / "models").symlink_to(default_models_dir, target_is_directory=True)
    settings = Settings(
        home=home,
        base_model=str(tool_model),
        device="cpu",
        port=0,
        metrics_port=free_port(),
        http_port=free_port(),
        served_model_name=BASE,
        admin_keys=[ADMIN_KEY],
        lora_kernel="eager",
        max_batch_size=16,
    )
    running = start_server(settings)
    yield running
    running.close()


@pytest.fixture(scope="module")
def url(server: RunningServer) -> str:
    assert server.http is not None
    return f"http://127.0.0.1:{server.http.port}"


@pytest.fixture(scope="module")
def key(server: RunningServer, tool_model: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Tenant acme with four random adapters (small scale: outputs still differ)."""
    with LoramuxClient(f"127.0.0.1:{server.port}", ADMIN_KEY) as admin:
        admin.create_tenant("acme", max_concurrent=32, max_queued=32)
        key = admin.create_key("acme")[1]
    shapes = linear_shapes(tool_model)
    with LoramuxClient(f"127.0.0.1:{server.port}", key) as acme:
        for seed, name in enumerate(ADAPTERS):
            folder = tmp_path_factory.mktemp(f"adapter-{name}") / "adapter"
            write_random_adapter(folder, shapes, rank=4, alpha=8, seed=seed + 5, scale=0.03)
            acme.upload_adapter(folder, name)
    return key


@pytest.fixture(scope="module")
def client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=600)


def _chat(url: str, key: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {key}"},
        timeout=600,
    )


def _valid(name: str, arguments: str) -> dict[str, Any]:
    """A call's arguments, parsed and validated against its function's schema."""
    value = json.loads(arguments)
    jsonschema.validate(value, SCHEMAS[name])
    return value  # type: ignore[no-any-return]


def _literal_regex(text: str) -> str:
    """A regular expression matching exactly `text`."""
    special = set("\\.^$|?*+()[]{}")
    return "".join("\\n" if c == "\n" else "\\" + c if c in special else c for c in text)


def test_the_templates_say_whether_they_render_tools(smollm2: ResolvedModel) -> None:
    assert template_format((smollm2.path / "chat_template.jinja").read_text()) is None
    assert template_format(TEMPLATE.read_text()) is HERMES
    assert template_format({"default": "{{ messages }}", "tool_use": TEMPLATE.read_text()})
    assert template_format("{% for tool in tools %}{{ tool }}{% endfor %}") is None


def test_the_call_parser_gives_a_stream_what_it_gives_a_whole_reply() -> None:
    call = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    text = f"Let me add.\n{call}\n{call}\n<tool_call>\n{{not json}}\n</tool_call> bye <tool_"
    whole = CallParser(HERMES, frozenset({"add"}), None)
    pieces = whole.feed(text) + whole.finish()
    streamed = CallParser(HERMES, frozenset({"add"}), None)
    bits: list[str | ToolCall] = []
    for char in text:
        bits += streamed.feed(char)
    bits += streamed.finish()

    def shape(found: list[str | ToolCall]) -> tuple[str, list[tuple[str, str]]]:
        content = "".join(p for p in found if isinstance(p, str))
        return content, [(p.name, p.arguments) for p in found if isinstance(p, ToolCall)]

    assert shape(pieces) == shape(bits)
    content, calls = shape(pieces)
    assert calls == [("add", '{"a": 1, "b": 2}')] * 2
    # a block that does not parse, and an unfinished tag, stay content (with the
    # whitespace between the calls, now that content follows it)
    assert content == "Let me add.\n\n\n<tool_call>\n{not json}\n</tool_call> bye <tool_"
    one = CallParser(HERMES, frozenset({"add"}), 1)  # parallel_tool_calls false
    assert len([p for p in one.feed(f"{call}\n{call}") if isinstance(p, ToolCall)]) == 1
    unknown = CallParser(HERMES, frozenset({"mul"}), None)
    assert unknown.feed(call) == [call]


@pytest.mark.slow
@pytest.mark.parametrize("model", [BASE, "t1"])
def test_required_and_named_calls_round_trip_through_the_openai_client(
    client: openai.OpenAI, model: str
) -> None:
    required = client.chat.completions.create(
        model=model,
        messages=ASK,  # type: ignore[arg-type]
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=96,
        temperature=0,
    )
    choice = required.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in SCHEMAS
    _valid(call.function.name, call.function.arguments)

    named = client.chat.completions.create(
        model=model,
        messages=ASK,  # type: ignore[arg-type]
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice={"type": "function", "function": {"name": "add"}},
        max_tokens=96,
        temperature=0,
    )
    choice = named.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls or []
    assert call.function.name == "add"  # though the question is about the weather
    _valid("add", call.function.arguments)


@pytest.mark.slow
def test_parallel_required_calls_all_validate(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model=BASE,
        messages=[{"role": "user", "content": "Weather in Rome and in Oslo, in celsius?"}],
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice="required",
        max_tokens=160,
        temperature=0,
    )
    choice = answer.choices[0]
    calls = choice.message.tool_calls or []
    assert calls, choice
    for call in calls:
        _valid(call.function.name, call.function.arguments)
    assert len({call.id for call in calls}) == len(calls)
    if choice.finish_reason != "length":  # else the call cut short is content
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None


@pytest.mark.slow
def test_streamed_tool_call_deltas_assemble_to_the_same_call(client: openai.OpenAI) -> None:
    asked: dict[str, Any] = {
        "model": "t2",
        "messages": ASK,
        "tools": TOOLS,
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "max_tokens": 96,
        "temperature": 0,
    }
    whole = client.chat.completions.create(**asked)
    calls: dict[int, dict[str, str]] = {}
    content, reasons = "", []
    for chunk in client.chat.completions.create(**asked, stream=True):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            reasons.append(choice.finish_reason)
            for delta in choice.delta.tool_calls or []:
                entry = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                entry["id"] += delta.id or ""
                assert delta.function is not None
                entry["name"] += delta.function.name or ""
                entry["arguments"] += delta.function.arguments or ""
    (expected,) = whole.choices[0].message.tool_calls or []
    assert list(calls) == [0]
    assert calls[0]["name"] == expected.function.name
    assert json.loads(calls[0]["arguments"]) == json.loads(expected.function.arguments)
    assert calls[0]["id"].startswith("call_")
    assert content == ""
    assert [r for r in reasons if r is not None] == ["tool_calls"]


@pytest.mark.slow
def test_a_tool_message_renders_in_the_next_turn(
    client: openai.OpenAI, server: RunningServer
) -> None:
    first = client.chat.completions.create(
        model=BASE,
        messages=ASK,  # type: ignore[arg-type]
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=96,
        temperature=0,
    )
    message = first.choices[0].message
    (call,) = message.tool_calls or []
    result = "21 degrees, sunny"
    history: list[Any] = [
        *ASK,
        message,  # the client's own message object, sent back as it serialises it
        {"role": "tool", "tool_call_id": call.id, "content": result},
    ]
    second = client.chat.completions.create(
        model="t3",
        messages=history,
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice="none",
        max_tokens=24,
        temperature=0,
    )
    assert second.choices[0].message.tool_calls is None
    assert second.choices[0].finish_reason in ("stop", "length")
    # what the model was shown: the earlier call and the tool's result, by the template
    engine = server.state.engine
    arguments = json.loads(call.function.arguments)
    prompt = engine.render_chat(
        [
            {"role": "user", "content": ASK[0]["content"]},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": arguments},
                    }
                ],
            },
            {"role": "tool", "content": result, "tool_call_id": call.id},
        ],
        TOOLS,
    )
    assert second.usage is not None and second.usage.prompt_tokens == len(prompt)
    text = str(engine.tokenizer.decode(prompt))
    assert f"<tool_response>\n{result}\n</tool_response>" in text
    assert '"name": "get_weather", "arguments": {"city": ' in text


@pytest.mark.slow
def test_auto_parses_calls_out_of_the_text(url: str, key: str) -> None:
    """`auto` leaves the model free: what it writes in the template's call format comes
    back as a call (here forced through a regex, the model's own choice being unsure),
    anything else as content."""
    call = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
    body = {
        "model": "t4",
        "messages": [{"role": "user", "content": "What is 2 + 3?"}],
        "tools": TOOLS,
        "max_tokens": 64,
        "temperature": 0,
    }
    pattern = _literal_regex("Adding.\n" + call)
    answer = _chat(url, key, {**body, "guided_regex": pattern})
    assert answer.status_code == 200, answer.text
    choice = answer.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Adding.\n"
    (found,) = choice["message"]["tool_calls"]
    assert found["function"] == {"name": "add", "arguments": '{"a": 2, "b": 3}'}
    plain = _chat(url, key, {**body, "guided_choice": ["five", "six"]})
    assert plain.status_code == 200, plain.text
    choice = plain.json()["choices"][0]
    assert choice["message"]["content"] in ("five", "six")
    assert "tool_calls" not in choice["message"]
    assert choice["finish_reason"] == "stop"


@pytest.mark.slow
@pytest.mark.parametrize("strict", [None, True])
def test_auto_returns_a_parsed_call_whose_arguments_do_not_validate(
    url: str, key: str, strict: bool | None
) -> None:
    """`auto` calls are returned as the model wrote them, as vLLM's parsers and OpenAI's
    non-strict functions do: arguments that break the function's schema (a string for an
    integer, a required property missing) still make a tool call, not content, and are not
    altered; `strict: true` does not change that under `auto` (docs/http-api.md: only
    `required` and a named function are enforced)."""
    bad = '{"name": "add", "arguments": {"a": "two"}}'
    tools = [
        {**tool, "function": {**tool["function"], "strict": strict}} if strict else tool
        for tool in TOOLS
    ]
    assert list(jsonschema.Draft202012Validator(ADD).iter_errors({"a": "two"}))  # invalid
    body = {
        "model": BASE,
        "messages": [{"role": "user", "content": "What is two plus three?"}],
        "tools": tools,
        "tool_choice": "auto",
        "max_tokens": 64,
        "temperature": 0,
        "guided_regex": _literal_regex(f"<tool_call>\n{bad}\n</tool_call>"),
    }
    answer = _chat(url, key, body)
    assert answer.status_code == 200, answer.text
    choice = answer.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    (found,) = choice["message"]["tool_calls"]
    assert found["function"] == {"name": "add", "arguments": '{"a": "two"}'}
    assert choice["message"]["content"] is None


@pytest.mark.slow
@pytest.mark.parametrize(
    ("extra", "param"),
    [
        (
            {"tool_choice": {"type": "function", "function": {"name": "mul"}}},
            "tool_choice.function.name",
        ),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        (
            {"tools": [{"type": "function", "function": {"description": "x"}}]},
            "tools[0].function.name",
        ),
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
        (
            {"tools": [TOOLS[0], {"type": "function", "function": {"name": "f", "parameters": 3}}]},
            "tools[1].function.parameters",
        ),
        ({"tools": [TOOLS[1], TOOLS[1]]}, "tools[1].function.name"),
        ({"tools": {"type": "function"}}, "tools"),
        ({"tools": None, "tool_choice": "required"}, "tool_choice"),
        (
            {"tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format",
        ),
        ({"logprobs": True}, "logprobs"),
        (  # a schema within bounds that xgrammar cannot compile
            {
                "tool_choice": "required",
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"type": "nonsense"}},
                    }
                ],
            },
            "tools",
        ),
        ({"functions": [{"name": "f"}]}, "functions"),
    ],
)
def test_bad_tool_input_is_refused_naming_the_field(
    client: openai.OpenAI, extra: dict[str, Any], param: str
) -> None:
    body: dict[str, Any] = {"model": BASE, "messages": ASK, "tools": TOOLS, "max_tokens": 8}
    body.update(extra)
    if body["tools"] is None:
        del body["tools"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**body)
    assert caught.value.status_code == 400
    assert caught.value.param == param, caught.value


@pytest.mark.slow
def test_a_call_sent_back_with_arguments_that_are_not_json_is_refused(url: str, key: str) -> None:
    bad_call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": "{"}}
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [bad_call]}]
    answer = _chat(url, key, {"model": BASE, "messages": messages, "tools": TOOLS})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == "messages[1].tool_calls[0].function.arguments"


@pytest.mark.slow
def test_tool_calls_in_a_mixed_batch_with_other_adapters_rows(
    server: RunningServer, url: str, key: str
) -> None:
    """16 requests at once: forced calls (required and named, greedy and sampled) under
    every adapter and the base model, beside plain and JSON-schema rows of the others; the
    calls all validate, the other rows are untouched by the tools of their neighbours."""
    jobs: list[tuple[str, dict[str, Any]]] = []
    for i, model in enumerate((BASE, *ADAPTERS)):
        named = {"type": "function", "function": {"name": "add"}}
        sampled = {"temperature": 0.8, "seed": i} if i % 2 else {"temperature": 0}
        jobs.append(
            (
                "call",
                {
                    "model": model,
                    "messages": ASK,
                    "tools": TOOLS,
                    "tool_choice": named if i % 2 else "required",
                    "parallel_tool_calls": False,
                    "max_tokens": 96,
                    **sampled,
                },
            )
        )
        jobs.append(
            (
                "text",
                {
                    "model": model,
                    "messages": [{"role": "user", "content": "Say hello."}],
                    "max_tokens": 12,
                    "temperature": 0,
                },
            )
        )
        jobs.append(
            (
                "json",
                {
                    "model": model,
                    "messages": [{"role": "user", "content": "Weather in Oslo as JSON."}],
                    "response_format": {
                        "type": "json_schema",
                        "json_schema": {"name": "w", "schema": WEATHER},
                    },
                    "max_tokens": 48,
                    "temperature": 0,
                },
            )
        )
    engine = server.state.engine
    widest = 0
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(_chat, url, key, body) for _, body in jobs]
        while wait(futures, timeout=0.1).not_done:
            widest = max(widest, engine.stats().running)
        answers = [f.result() for f in futures]
    assert widest >= 8, widest
    for (kind, body), response in zip(jobs, answers, strict=True):
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        message = choice["message"]
        if kind == "call":
            assert choice["finish_reason"] == "tool_calls", (body["model"], choice)
            (call,) = message["tool_calls"]
            if isinstance(body["tool_choice"], dict):
                assert call["function"]["name"] == "add"
            _valid(call["function"]["name"], call["function"]["arguments"])
        else:
            assert "tool_calls" not in message
            if kind == "json":
                jsonschema.validate(json.loads(message["content"]), WEATHER)
