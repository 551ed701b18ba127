"""Issue 26: structured outputs per row of the mixed batch, over HTTP, on the real NF4
SmolLM2-135M-Instruct served on 127.0.0.1.

Every row may have its own adapter and its own constraint; what comes back must parse and
validate (python `jsonschema`), match its regex or be one of its choices, whatever else
shares the batch. The masks must remove nothing the grammar allowed: a greedy constrained
output follows the unconstrained one token for token for as long as the grammar accepts
the unconstrained tokens. Hostile constraints are refused with 400 naming the field.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pydantic
import pytest
from api_helpers import free_port, linear_shapes

from loramux.cli import main as loramux_main
from loramux.client import InvalidArgument, LoramuxClient
from loramux.core.config import Settings
from loramux.core.models import ResolvedModel
from loramux.server.app import RunningServer, start_server
from loramux.server.constraints.spec import ConstraintSpec
from loramux.server.synthetic import write_random_adapter

pytestmark = pytest.mark.slow

ADMIN_KEY = "admin-structured-key"
BASE = "smollm2"
ADAPTERS = tuple(f"a{i}" for i in range(1, 9))

SCHEMAS: list[dict[str, Any]] = [
    {
        "type": "object",
        "properties": {"sentiment": {"enum": ["positive", "negative", "neutral"]}},
        "required": ["sentiment"],
    },
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
        },
        "required": ["name", "age"],
    },
    {
        "type": "object",
        "properties": {
            "ok": {"type": "boolean"},
            "count": {"type": "integer", "minimum": 0, "maximum": 1000},
        },
        "required": ["ok", "count"],
    },
    {
        "type": "object",
        "properties": {
            "colors": {
                "type": "array",
                "items": {"enum": ["red", "green", "blue"]},
                "minItems": 1,
                "maxItems": 3,
            }
        },
        "required": ["colors"],
    },
    {
        "type": "object",
        "properties": {
            "city": {"enum": ["Paris", "Rome", "Oslo"]},
            "degrees": {"type": "integer", "minimum": -40, "maximum": 50},
        },
        "required": ["city", "degrees"],
    },
    {"type": "object", "properties": {"answer": {"type": "boolean"}}, "required": ["answer"]},
    {
        "type": "object",
        "properties": {
            "tags": {
                "type": "array",
                "items": {"type": "string", "maxLength": 8},
                "minItems": 1,
                "maxItems": 2,
            }
        },
        "required": ["tags"],
    },
    {
        "type": "object",
        "properties": {
            "level": {"type": "integer", "minimum": 1, "maximum": 5},
            "label": {"enum": ["low", "high"]},
        },
        "required": ["level", "label"],
    },
]
PROMPTS = [
    "Classify the sentiment of: I love this phone. Answer in JSON.",
    "Give a person's name and age in JSON.",
    "Is water wet? Answer in JSON with ok and count.",
    "List some colours in JSON.",
    "Which city is warmest today? Answer in JSON.",
    "Is the earth round? Answer in JSON.",
    "Give two tags for a cooking blog in JSON.",
    "Rate the danger of a kitten, in JSON.",
]


@pytest.fixture(scope="module")
def server(
    smollm2: ResolvedModel, tmp_path_factory: pytest.TempPathFactory, default_models_dir: Path
) -> Iterator[RunningServer]:
    home = tmp_path_factory.mktemp("structured-home")
    (home / "models").symlink_to(default_models_dir, target_is_directory=True)
    settings = Settings(
        home=home,
        device="cpu",
        port=0,
        metrics_port=free_port(),
        http_port=free_port(),
        served_model_name=BASE,
        admin_keys=[ADMIN_KEY],
        lora_kernel="eager",
        grpc_workers=100,
        http_workers=80,
        tenant_max_calls=80,  # one tenant's 72 calls all in the batch at once
        max_batch_size=64,
    )
    running = start_server(settings)
    yield running
    running.close()


@pytest.fixture(scope="module")
def url(server: RunningServer) -> str:
    assert server.http is not None
    return f"http://127.0.0.1:{server.http.port}"


@pytest.fixture(scope="module")
def key(
    server: RunningServer, smollm2: ResolvedModel, tmp_path_factory: pytest.TempPathFactory
) -> str:
    """Tenant acme, with three uploaded random adapters (small scale: outputs still differ)."""
    with LoramuxClient(f"127.0.0.1:{server.port}", ADMIN_KEY) as admin:
        admin.create_tenant("acme", max_concurrent=80, max_queued=80)
        key = admin.create_key("acme")[1]
    shapes = linear_shapes(smollm2.path)
    with LoramuxClient(f"127.0.0.1:{server.port}", key) as acme:
        for seed, name in enumerate(ADAPTERS):
            folder = tmp_path_factory.mktemp(f"adapter-{name}") / "adapter"
            write_random_adapter(folder, shapes, rank=4, alpha=8, seed=seed + 11, scale=0.03)
            acme.upload_adapter(folder, name)
    return key


def _chat(url: str, key: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {key}"},
        timeout=600,
    )


def _ok(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def _body(prompt: str, model: str = BASE, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 64,
        "temperature": 0,
        **extra,
    }


def _json_schema(i: int) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": SCHEMAS[i]}}


def test_every_row_of_a_mixed_batch_validates_under_its_own_adapter_and_schema(
    server: RunningServer, url: str, key: str
) -> None:
    """64 requests at once: 8 uploaded adapters x 8 schemas, half greedy and half sampled
    (seeded), through response_format and vLLM's structured_outputs, plus the base model on
    each schema greedy: all parse, all validate, all end by their grammar ("stop")."""
    jobs = []
    for a, model in enumerate(ADAPTERS):
        for i in range(len(SCHEMAS)):
            sampled = (a + i) % 2 == 1
            extra: dict[str, Any] = {"temperature": 0.8, "seed": i} if sampled else {}
            if sampled:
                extra["structured_outputs"] = {"json": SCHEMAS[i]}
            else:
                extra["response_format"] = _json_schema(i)
            jobs.append((i, _body(PROMPTS[i], model, **extra)))
    jobs += [(i, _body(PROMPTS[i], BASE, response_format=_json_schema(i))) for i in range(8)]
    engine = server.state.engine
    widest = 0
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(_chat, url, key, body) for _, body in jobs]
        # how many rows shared one batch, looked at every 0.1 s until all are answered
        while wait(futures, timeout=0.1).not_done:
            widest = max(widest, engine.stats().running)
        answers = [_ok(f.result()) for f in futures]
    assert widest >= 32, widest
    ended = [answer["choices"][0]["finish_reason"] for answer in answers]
    assert ended == ["stop"] * len(jobs), [
        (body["model"], i, answer["choices"][0]["message"]["content"])
        for (i, body), answer in zip(jobs, answers, strict=True)
        if answer["choices"][0]["finish_reason"] != "stop"
    ]
    texts: dict[tuple[str, int, bool], str] = {}
    for (i, body), answer in zip(jobs, answers, strict=True):
        content = answer["choices"][0]["message"]["content"]
        jsonschema.validate(json.loads(content), SCHEMAS[i])
        texts[body["model"], i, body["temperature"] > 0] = content
    # the adapters really took part: their greedy outputs are not all the base model's
    greedy = [(a, i) for a in ADAPTERS for i in range(len(SCHEMAS)) if (a, i, False) in texts]
    assert any(texts[a, i, False] != texts[BASE, i, False] for a, i in greedy)


def test_json_object_regex_and_choice(url: str, key: str) -> None:
    obj = _ok(_chat(url, key, _body(PROMPTS[1], response_format={"type": "json_object"})))
    assert isinstance(json.loads(obj["choices"][0]["message"]["content"]), dict)
    pattern = r"[0-9]{3}-[0-9]{4}"
    regex = _ok(_chat(url, key, _body("Give a phone number.", "a1", guided_regex=pattern)))
    assert re.fullmatch(pattern, regex["choices"][0]["message"]["content"])
    assert regex["choices"][0]["finish_reason"] == "stop"
    labels = ["positive", "negative", 'say "maybe"']
    for model in (BASE, "a2"):
        picked = _ok(
            _chat(
                url,
                key,
                _body("Sentiment of: great film!", model, structured_outputs={"choice": labels}),
            )
        )
        assert picked["choices"][0]["message"]["content"] in labels
        assert picked["choices"][0]["finish_reason"] == "stop"
    completion = httpx.post(
        f"{url}/v1/completions",
        json={"model": "a3", "prompt": "The answer is", "guided_choice": labels, "max_tokens": 8},
        headers={"Authorization": f"Bearer {key}"},
        timeout=600,
    )
    assert _ok(completion)["choices"][0]["text"] in labels


def test_a_grammar_cut_by_max_tokens_says_length(url: str, key: str) -> None:
    schema = {"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"]}
    body = _body("Tell a long story.", guided_json=schema, max_tokens=4)
    answer = _ok(_chat(url, key, body))
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] == 4


def _accepted_prefix(server: RunningServer, spec: ConstraintSpec, tokens: list[int]) -> int:
    """How many of `tokens` the grammar accepts from its start."""
    matcher = server.state.engine.grammars.compile(spec).matcher()
    for n, token in enumerate(tokens):
        matcher.accept(token)
        if matcher.rejected:
            return n
    return len(tokens)


@pytest.mark.parametrize(
    ("prompt", "field", "value", "least"),
    [
        ("Is the sky blue? Answer yes or no.", "guided_choice", ["Yes", "No"], 1),
        ("Is fire cold? Answer Yes or No.", "guided_choice", ["Yes", "No", "Maybe"], 1),
        # unconstrained, the model writes exactly this valid JSON: all of it must survive
        ('Output the JSON {"name": "Ann", "age": 3}', "guided_json", SCHEMAS[1], 99),
        ("What is 2 + 2? Reply with the number only.", "guided_regex", r"[0-9]+", 1),
    ],
)
def test_greedy_masks_remove_nothing_the_grammar_allowed(
    server: RunningServer,
    url: str,
    key: str,
    prompt: str,
    field: str,
    value: Any,
    least: int,
) -> None:
    """The constrained greedy output equals the unconstrained one over the longest prefix the
    grammar accepts (token for token, checked through the text and the grammar), and the
    whole of it when the grammar accepts all of it."""
    engine = server.state.engine
    free = _ok(_chat(url, key, _body(prompt, max_tokens=24)))["choices"][0]
    free_ids = engine.tokenize(free["message"]["content"])
    if free["finish_reason"] == "stop":
        free_ids = [*free_ids, *sorted(engine.eos_token_ids)[:1]]
    bound = _ok(_chat(url, key, _body(prompt, max_tokens=24, **{field: value})))["choices"][0]
    make = {
        "guided_choice": ConstraintSpec.choice,
        "guided_json": ConstraintSpec.json_schema,
        "guided_regex": ConstraintSpec.regex,
    }[field]
    spec = make(value, field)
    kept = _accepted_prefix(server, spec, free_ids)
    least = min(least, len(free_ids))
    assert kept >= least, (free, kept)  # the case checks what it means to
    text = str(engine.tokenizer.decode(free_ids[:kept], skip_special_tokens=True))
    assert bound["message"]["content"].startswith(text), (free, bound, kept)
    if kept == len(free_ids):
        assert bound["message"]["content"] == free["message"]["content"]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"guided_regex": "(a"}, "guided_regex"),
        ({"guided_grammar": "root ::= "}, "guided_grammar"),
        ({"guided_choice": []}, "guided_choice"),
        ({"structured_outputs": {"json": {"type": "nonsense"}}}, "structured_outputs.json"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 3}}},
            "response_format.json_schema.schema",
        ),
        ({"guided_regex": "a" * 5000}, "guided_regex"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "guided_regex"),
        # SmolLM2's chat template renders no tools (tests/test_tool_calls.py: one that does)
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "tool", "tool_call_id": "call_1", "content": "3"},
                ]
            },
            "messages[1].role",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "call_1",
                                "type": "function",
                                "function": {"name": "f", "arguments": "{}"},
                            }
                        ],
                    },
                ]
            },
            "messages[1].tool_calls",
        ),
    ],
)
def test_bad_constraints_are_refused_naming_the_field(
    url: str, key: str, extra: dict[str, Any], param: str
) -> None:
    response = _chat(url, key, _body("hi", **extra))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_a_deeply_nested_schema_is_refused_before_compiling(url: str, key: str) -> None:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(40):
        schema = {"type": "object", "properties": {"x": schema}}
    response = _chat(url, key, _body("hi", guided_json=schema))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "guided_json"
    assert "nests" in response.json()["error"]["message"]


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=10)
    age: int = pydantic.Field(ge=0, le=99)


def test_openai_parse_round_trips_a_pydantic_model(url: str, key: str) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=600)
    for model in (BASE, "a3"):
        done = client.chat.completions.parse(
            model=model,
            messages=[{"role": "user", "content": "Invent a person: name and age."}],
            response_format=Person,
            max_tokens=64,
            temperature=0,
        )
        parsed = done.choices[0].message.parsed
        assert isinstance(parsed, Person), done


def test_grpc_client_and_cli_constrain_too(
    server: RunningServer, key: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """GenerateRequest.constraint through the Python client (token ids end with EOS: the
    grammar completed), its errors naming constraint.<kind>, and `loramux generate
    --json-schema FILE`."""
    address = f"127.0.0.1:{server.port}"
    with LoramuxClient(address, key) as rpc:
        done = rpc.generate(
            messages=[("user", PROMPTS[1])], adapter="a1", json_schema=SCHEMAS[1], max_new_tokens=64
        )
        jsonschema.validate(json.loads(done.text), SCHEMAS[1])
        assert done.finish_reason == "eos"
        assert done.token_ids[-1] in server.state.engine.eos_token_ids
        picked = rpc.generate(messages=[("user", "Pick one.")], choice=["red", "blue"])
        assert picked.text in ("red", "blue")
        with pytest.raises(InvalidArgument) as caught:
            rpc.generate("hi", regex="(a")
        assert caught.value.field == "constraint.regex"
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(SCHEMAS[0]))
    capsys.readouterr()
    shape = ["--json-schema", str(schema_file), "--max-new-tokens", "64"]
    code = loramux_main(
        ["generate", "--chat", PROMPTS[0], *shape, "--address", address, "--api-key", key]
    )
    out = capsys.readouterr().out
    assert code == 0
    jsonschema.validate(json.loads(out), SCHEMAS[0])


def test_metrics_count_constraints_cache_hits_and_compile_time(
    server: RunningServer, url: str, key: str
) -> None:
    """Two requests with one new schema: one compile (in the histogram), one cache hit."""
    engine = server.state.engine
    before = engine.grammars.snapshot()
    schema = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 9}}}
    for _ in range(2):
        _ok(_chat(url, key, _body("A number in JSON.", guided_json=schema, max_tokens=16)))
    after = engine.grammars.snapshot()
    assert after.compiles == before.compiles + 1
    assert after.cache_hits == before.cache_hits + 1
    assert after.requests["json_schema"] == before.requests.get("json_schema", 0) + 2
    scrape = f"http://127.0.0.1:{server.metrics_port}/metrics"
    text = httpx.get(scrape, timeout=10).text
    kinds = after.requests["json_schema"]
    assert f'loramux_constrained_requests_total{{kind="json_schema"}} {kinds:.1f}' in text
    assert f"loramux_grammar_cache_hits_total {after.cache_hits:.1f}" in text
    assert f'loramux_grammar_compile_seconds_bucket{{le="+Inf"}} {after.compiles:.1f}' in text
    assert f"loramux_grammar_compile_seconds_count {after.compiles:.1f}" in text


def test_metrics_show_mask_time_per_step(server: RunningServer, url: str, key: str) -> None:
    """A constrained request's steps show in loramux_grammar_mask_seconds: every step that
    sampled its row counts once under part="sampling", and its masks were filled ahead, on
    the helper thread (part="fill")."""
    engine = server.state.engine
    before = engine.masks.snapshot()
    body = _body("Is the sky blue?", guided_choice=["Yes, it is.", "No, it is not."])
    answer = _ok(_chat(url, key, body))
    after = engine.masks.snapshot()
    steps = answer["usage"]["completion_tokens"]  # the grammar's end (EOS) counted too
    assert after.samplings - before.samplings == steps, (answer, before, after)
    assert after.rows_ahead - before.rows_ahead == steps
    assert after.rows_at_sampling == before.rows_at_sampling
    text = httpx.get(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).text
    for part, count, total in (
        ("sampling", after.samplings, after.sampling_seconds_sum),
        ("fill", after.fills, after.fill_seconds_sum),
    ):
        assert f'loramux_grammar_mask_seconds_count{{part="{part}"}} {count:.1f}' in text
        assert f'loramux_grammar_mask_seconds_bucket{{le="+Inf",part="{part}"}} {count:.1f}' in text
        assert total > 0


def test_a_slow_compile_is_refused_in_bounded_time_and_stalls_nobody(
    server: RunningServer, url: str, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A schema that takes xgrammar seconds to compile (60 pattern-bound strings), with the
    compile bound lowered to 0.5 s: that request is a 400 naming its field, while /health
    answers within 1 s and an unconstrained request completes (the compile runs in a worker
    process, killed at the bound, never on the engine thread), and nothing is left
    compiling it after the refusal."""
    monkeypatch.setattr(server.state.engine.grammars, "timeout", 0.5)
    pattern = r"[a-z]{1,20}@[a-z]{2,10}\.(com|org|net)"
    slow = {
        "type": "object",
        "properties": {f"p{i}": {"type": "string", "pattern": pattern} for i in range(60)},
    }
    with ThreadPoolExecutor(1) as pool:
        refused = pool.submit(_chat, url, key, _body("hi", guided_json=slow))
        checks = 0
        while not refused.done():
            checks += 1
            started = time.perf_counter()
            assert httpx.get(f"{url}/health", timeout=5).status_code == 200
            assert time.perf_counter() - started <= 1.0
            free = _ok(_chat(url, key, _body("Say hi.", max_tokens=2)))
            assert free["usage"]["completion_tokens"] >= 1
        answer = refused.result()
    assert checks >= 1  # the refusal takes >= 0.5 s: health was asked meanwhile
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == "guided_json" and "compile" in error["message"]
    # nothing is still compiling it: its worker process was killed (tests/test_constraints)
    assert server.state.engine.grammars.busy()[0] == 0
