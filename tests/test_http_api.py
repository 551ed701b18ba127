"""Issue 14 point 1: the OpenAI-compatible HTTP front, on a real server on 127.0.0.1.

Driven by the official `openai` client and by curl. The engine runs the tiny random Llama:
what is checked here is the protocol, the tenants and the errors; the engine's numbers are
checked against PEFT and transformers elsewhere. Text from the HTTP front is compared with
the same request sent over gRPC, the other transport of the same process.
"""

from __future__ import annotations

import json
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from api_helpers import eventually, free_port, linear_shapes
from http_helpers import exchange, request_head

from loramux.client import LoramuxClient
from loramux.core.config import Settings
from loramux.core.models import ResolvedModel
from loramux.server.app import RunningServer, start_server
from loramux.server.synthetic import write_random_adapter
from loramux.server.tenants import Principal

ADMIN_KEY = "admin-http-key"
BASE = "tiny-base"


@pytest.fixture(scope="module")
def adapter_folder(tiny_llama: ResolvedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("http-adapter") / "adapter"
    return write_random_adapter(
        folder, linear_shapes(tiny_llama.path), rank=4, alpha=8, seed=3, scale=0.5
    )


@pytest.fixture(scope="module")
def server(
    tiny_llama: ResolvedModel, tmp_path_factory: pytest.TempPathFactory, default_models_dir: Path
) -> Iterator[RunningServer]:
    home = tmp_path_factory.mktemp("http-home")
    (home / "models").symlink_to(default_models_dir, target_is_directory=True)
    settings = Settings(
        home=home,
        base_model=str(tiny_llama.path),
        device="cpu",
        port=0,
        metrics_port=0,
        http_port=free_port(),
        served_model_name=BASE,
        admin_keys=[ADMIN_KEY],
        lora_kernel="eager",
        grpc_workers=8,
        http_workers=8,
    )
    running = start_server(settings)
    yield running
    running.close()


@pytest.fixture(scope="module")
def url(server: RunningServer) -> str:
    assert server.http is not None
    return f"http://127.0.0.1:{server.http.port}"


@pytest.fixture(scope="module")
def keys(server: RunningServer, adapter_folder: Path) -> dict[str, str]:
    """Tenants acme (owns the private adapter `alpha`) and globex, with their keys."""
    keys = {}
    with LoramuxClient(f"127.0.0.1:{server.port}", ADMIN_KEY) as admin:
        for tenant in ("acme", "globex"):
            admin.create_tenant(tenant)
            keys[tenant] = admin.create_key(tenant)[1]
    with LoramuxClient(f"127.0.0.1:{server.port}", keys["acme"]) as acme:
        acme.upload_adapter(adapter_folder, "alpha")
    return keys


def client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def grpc_client(server: RunningServer, key: str) -> LoramuxClient:
    return LoramuxClient(f"127.0.0.1:{server.port}", key)


def test_completions_and_chat_match_grpc_and_model_picks_the_adapter(
    server: RunningServer, url: str, keys: dict[str, str]
) -> None:
    acme = client(url, keys["acme"])
    with grpc_client(server, keys["acme"]) as rpc:
        for model, adapter in ((BASE, None), ("alpha", "alpha"), ("acme/alpha", "alpha")):
            done = acme.completions.create(
                model=model, prompt="Once upon a time", max_tokens=8, temperature=0
            )
            expected = rpc.generate("Once upon a time", adapter=adapter, max_new_tokens=8)
            assert done.object == "text_completion" and done.model == model
            assert done.choices[0].text == expected.text
            assert done.choices[0].finish_reason in ("length", "stop")
            assert done.usage is not None
            assert done.usage.prompt_tokens == expected.prompt_tokens
            assert done.usage.completion_tokens == expected.completion_tokens
            assert done.usage.total_tokens == expected.prompt_tokens + expected.completion_tokens
            chat = acme.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": "Name a colour."}],
                max_tokens=8,
                temperature=0,
            )
            expected = rpc.generate(
                messages=[("user", "Name a colour.")], adapter=adapter, max_new_tokens=8
            )
            assert chat.object == "chat.completion"
            assert chat.choices[0].message.role == "assistant"
            assert chat.choices[0].message.content == expected.text
            assert chat.usage is not None and chat.usage.completion_tokens == len(
                expected.token_ids
            )
        base = rpc.generate("Once upon a time", max_new_tokens=8)
        with_adapter = rpc.generate("Once upon a time", adapter="alpha", max_new_tokens=8)
    assert base.token_ids != with_adapter.token_ids  # so `model` really chose the adapter


def test_streaming_chunks_and_the_usage_chunk(url: str, keys: dict[str, str]) -> None:
    acme = client(url, keys["acme"])
    messages = [{"role": "user", "content": "Tell me a story."}]
    whole = acme.chat.completions.create(
        model="alpha", messages=messages, max_tokens=12, temperature=0
    )
    chunks = list(
        acme.chat.completions.create(
            model="alpha",
            messages=messages,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    *body, usage = chunks
    assert usage.choices == [] and usage.usage is not None
    assert usage.usage.model_dump() == {
        "prompt_tokens": whole.usage.prompt_tokens,  # type: ignore[union-attr]
        "completion_tokens": whole.usage.completion_tokens,  # type: ignore[union-attr]
        "total_tokens": whole.usage.total_tokens,  # type: ignore[union-attr]
        "completion_tokens_details": None,
        "prompt_tokens_details": None,
    }
    assert all(c.usage is None for c in body)
    assert body[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    # Without include_usage there is no usage chunk (as OpenAI).
    plain = list(
        acme.completions.create(
            model=BASE, prompt="Hello", max_tokens=6, temperature=0, stream=True
        )
    )
    assert all(c.choices for c in plain) and all(c.usage is None for c in plain)
    assert plain[-1].choices[0].finish_reason is not None


def test_models_lists_the_base_and_the_callers_adapters(
    server: RunningServer, url: str, keys: dict[str, str]
) -> None:
    acme, globex = client(url, keys["acme"]), client(url, keys["globex"])
    seen = {m.id: m.model_dump() for m in acme.models.list()}
    assert set(seen) == {BASE, "alpha"}
    assert seen["alpha"]["owned_by"] == "acme" and seen["alpha"]["parent"] == BASE
    assert {m.id for m in globex.models.list()} == {BASE}
    with grpc_client(server, keys["acme"]) as rpc:
        rpc.load_adapter("alpha")
        assert {m.id: m.model_dump()["loaded"] for m in acme.models.list()}["alpha"] is True
        rpc.unload_adapter("alpha")
        assert {m.id: m.model_dump()["loaded"] for m in acme.models.list()}["alpha"] is False
    with grpc_client(server, ADMIN_KEY) as admin:
        admin.set_adapter_public("acme", "alpha")
        try:
            assert {m.id for m in globex.models.list()} == {BASE, "acme/alpha"}
            done = globex.completions.create(model="acme/alpha", prompt="Hi", max_tokens=2)
            assert done.usage is not None and done.usage.completion_tokens >= 1
        finally:
            admin.set_adapter_public("acme", "alpha", False)


def test_unknown_and_foreign_models_are_404_never_the_base(url: str, keys: dict[str, str]) -> None:
    globex = client(url, keys["globex"])
    for model in ("no-such-adapter", "alpha", "acme/alpha"):  # acme's is private
        with pytest.raises(openai.NotFoundError) as info:
            globex.completions.create(model=model, prompt="Hi", max_tokens=2)
        error = info.value.body
        assert isinstance(error, dict)
        assert error["code"] == "model_not_found" and error["param"] == "model"
        assert model in error["message"]
        with pytest.raises(openai.NotFoundError):
            list(
                globex.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": "Hi"}], stream=True
                )
            )


def test_keys_are_required_and_checked(url: str, keys: dict[str, str]) -> None:
    with pytest.raises(openai.AuthenticationError) as info:
        client(url, "not-a-key").completions.create(model=BASE, prompt="Hi", max_tokens=2)
    assert info.value.body["code"] == "invalid_api_key"  # type: ignore[index]
    body = {"model": BASE, "prompt": "Hi", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Basic eDp5"}, {"Authorization": "Bearer"}):
        response = httpx.post(f"{url}/v1/completions", json=body, headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["param"] == "authorization"
    with pytest.raises(openai.AuthenticationError):
        client(url, "not-a-key").models.list()
    # Health and readiness need no key (probes of load balancers and Kubernetes).
    for path in ("/health", "/ready"):
        assert httpx.get(url + path).status_code == 200


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 10**6}, "max_tokens"),
        ({"n": 17}, "n"),  # over --max-n (16)
        ({"n": 0}, "n"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"logprobs": 21}, "logprobs"),
        ({"echo": True, "logprobs": 21, "max_tokens": 0}, "logprobs"),
        ({"echo": True, "stream": True}, "echo"),
        ({"suffix": "x"}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"logit_bias": {"x": 1}}, "logit_bias['x']"),
        ({"logit_bias": {"5": 101}}, "logit_bias[5]"),
        ({"min_tokens": 5}, "min_tokens"),  # more than max_tokens 2
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"no_such_field": 1}, "no_such_field"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ["a", ""]}, "prompt[1]"),
        ({"prompt": [10**9]}, "prompt"),
        ({"prompt": [[5, 6], [7, 10**9]]}, "prompt[1]"),
        ({"prompt": [[5] * 1000] * 3}, "prompt"),  # over --max-batch-tokens (2048) in total
        ({"seed": -1}, "seed"),
        ({"stop": [""]}, "stop"),
    ],
)
def test_bad_completion_requests_name_the_field(
    url: str, keys: dict[str, str], extra: dict[str, object], param: str
) -> None:
    body = {"model": BASE, "prompt": "Hi", "max_tokens": 2, **extra}
    response = httpx.post(
        f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {keys['acme']}"}
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert error["message"]


def test_bad_chat_requests_name_the_field(url: str, keys: dict[str, str]) -> None:
    acme = client(url, keys["acme"])
    cases = [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs=true
        ({"n": 17}, "n"),
    ]
    for extra, param in cases:
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **extra}
        with pytest.raises(openai.BadRequestError) as info:
            acme.chat.completions.create(model=BASE, **body)  # type: ignore[call-overload]
        assert info.value.body["param"] == param, (extra, info.value.body)  # type: ignore[index]


def test_tenant_quota_is_the_one_grpc_calls_share(
    server: RunningServer, url: str, keys: dict[str, str]
) -> None:
    """A tenant whose slot and wait line are full gets 429; the waiter is served after."""
    with grpc_client(server, ADMIN_KEY) as admin:
        admin.create_tenant("tiny", max_concurrent=1, max_queued=1)
        key = admin.create_key("tiny")[1]
    record = server.state.registry.tenant("tiny")
    gate = server.state.gate
    tiny = client(url, key)
    served: list[object] = []
    waiter = threading.Thread(
        target=lambda: served.append(tiny.completions.create(model=BASE, prompt="Hi", max_tokens=2))
    )
    # The tenant's one slot is held as a running call holds it.
    assert gate.enter(Principal(tenant="tiny", admin=False, quota=record.quota), lambda: None)
    try:
        waiter.start()
        assert eventually(lambda: gate.waiting().get("tiny") == 1)
        with pytest.raises(openai.RateLimitError) as info:
            tiny.completions.create(model=BASE, prompt="Hi", max_tokens=2)
        assert info.value.body["code"] == "resource_exhausted"  # type: ignore[index]
        assert not served
    finally:
        gate.leave("tiny")
    waiter.join(60)
    assert len(served) == 1
    assert gate.in_flight().get("tiny", 0) == 0


def test_a_client_that_goes_away_frees_its_row_and_slot(
    server: RunningServer, url: str, keys: dict[str, str]
) -> None:
    samples = server.state.metrics.registry.get_sample_value
    labels = {"tenant": "acme", "adapter": "acme/alpha@v1", "status": "CANCELLED"}
    cancelled = samples("loramux_requests_total", labels) or 0.0
    generated = samples("loramux_generated_tokens_total", {"tenant": "acme"}) or 0.0
    headers = {"Authorization": f"Bearer {keys['acme']}"}
    body = {
        "model": "alpha",
        "prompt": "Count:",
        "max_tokens": 400,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["text"] is not None
    # The connection is closed long before 400 tokens: the engine and gate let go of it.
    assert eventually(lambda: server.state.engine.stats().running == 0)
    assert eventually(lambda: server.state.gate.in_flight().get("acme", 0) == 0)
    assert eventually(lambda: server.state.inflight == 0)
    assert samples("loramux_requests_total", labels) == cancelled + 1
    assert samples("loramux_generated_tokens_total", {"tenant": "acme"}) - generated < 400


def _oversized_completion() -> bytes:
    return b'{"model": "x", "prompt": "' + b"a" * (17 * 1024 * 1024) + b'"}'


def test_oversized_bodies_get_their_413_and_an_orderly_close(
    server: RunningServer, keys: dict[str, str]
) -> None:
    """The client writes all 17 MiB while it reads: the server reads the body away (the
    app never sees it) and answers 413, and the connection ends with a FIN, not a reset
    (a reset loses the 413 for a client still writing: CI's flaky 'peer closed connection')."""
    assert server.http is not None
    body = _oversized_completion()
    head = request_head(
        "/v1/completions",
        {
            "Authorization": f"Bearer {keys['acme']}",
            "Content-Type": "application/json",
            "Content-Length": str(len(body)),
        },
    )
    for _ in range(3):
        answer = exchange(server.http.port, head, [body])
        assert answer.send_error is None  # the server read the whole body
        assert answer.read_error is None  # and closed in order after the 413
        assert answer.status == 413
        assert answer.json()["error"]["code"] == "request_too_large"


def test_oversized_bodies_are_413_for_urllib_chunked_and_curl(
    url: str, keys: dict[str, str], tmp_path: Path
) -> None:
    auth = {"Authorization": f"Bearer {keys['acme']}", "Content-Type": "application/json"}
    body = _oversized_completion()
    # urllib writes the whole body before it reads: a reset is a ConnectionResetError.
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(
            urllib.request.Request(f"{url}/v1/completions", data=body, headers=auth), timeout=60
        )
    assert refused.value.code == 413
    assert json.load(refused.value)["error"]["code"] == "request_too_large"
    # Chunked: no declared length, the limit counts the bytes as they arrive.
    pieces = (body[i : i + (1 << 20)] for i in range(0, len(body), 1 << 20))
    response = httpx.post(f"{url}/v1/completions", content=pieces, headers=auth, timeout=60)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    # curl sends `Expect: 100-continue` for a body this large: refused before it is sent.
    (tmp_path / "body.json").write_bytes(body)
    status, text = _curl(
        "-H", f"Authorization: Bearer {keys['acme']}", "-H", "Content-Type: application/json",
        "--data-binary", f"@{tmp_path / 'body.json'}", f"{url}/v1/completions",
    )  # fmt: skip
    assert status == 413
    assert json.loads(text)["error"]["code"] == "request_too_large"


def _curl(*args: str) -> tuple[int, str]:
    out = subprocess.run(
        ["curl", "-sS", "-N", "-w", "\n%{http_code}", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    body, _, status = out.rpartition("\n")
    return int(status), body


def test_curl_streams_server_sent_events_and_gets_json_errors(
    url: str, keys: dict[str, str]
) -> None:
    auth = f"Authorization: Bearer {keys['acme']}"
    request = {
        "model": "alpha",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 5,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    status, body = _curl(
        "-H", auth, "-H", "Content-Type: application/json",
        "-d", json.dumps(request), f"{url}/v1/chat/completions",
    )  # fmt: skip
    assert status == 200
    events = [line[len("data: ") :] for line in body.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    status, body = _curl(
        "-H", auth, "-H", "Content-Type: application/json",
        "-d", json.dumps({**request, "model": "nope"}), f"{url}/v1/chat/completions",
    )  # fmt: skip
    assert status == 404
    assert json.loads(body)["error"]["code"] == "model_not_found"
    status, body = _curl("-d", "{not json", f"{url}/v1/completions")
    assert status == 400 and json.loads(body)["error"]["type"] == "invalid_request_error"
    status, body = _curl(f"{url}/ready")
    assert status == 200 and json.loads(body) == {"status": "ready"}


def test_draining_turns_ready_off_and_refuses_new_requests(
    tiny_llama: ResolvedModel, home: Path
) -> None:
    settings = Settings(
        home=home,
        base_model=str(tiny_llama.path),
        device="cpu",
        port=0,
        metrics_port=0,
        http_port=free_port(),
        lora_kernel="eager",
        dev=True,
    )
    running = start_server(settings)  # --dev: no keys
    try:
        assert running.http is not None
        url = f"http://127.0.0.1:{running.http.port}"
        models = httpx.get(f"{url}/v1/models").json()["data"]
        assert [m["id"] for m in models] == [running.state.engine.info.base_model]
        running.state.start_draining()
        assert httpx.get(f"{url}/ready").status_code == 503
        assert httpx.get(f"{url}/health").status_code == 200
        response = httpx.post(
            f"{url}/v1/completions", json={"model": models[0]["id"], "prompt": "Hi"}
        )
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "unavailable"
    finally:
        running.close()
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"{url}/health", timeout=5)


def test_model_takes_versions_and_aliases_and_models_lists_the_aliases(
    server: RunningServer,
    url: str,
    keys: dict[str, str],
    tiny_llama: ResolvedModel,
    tmp_path: Path,
) -> None:
    """Issue 28: `model` is `name`, `name@v2` or `name@alias`, as gRPC's `adapter`."""
    shapes = linear_shapes(tiny_llama.path)
    second = write_random_adapter(tmp_path / "second", shapes, rank=4, seed=77, scale=0.5)
    acme = client(url, keys["acme"])
    with grpc_client(server, keys["acme"]) as rpc:
        stored = rpc.upload_adapter(second, "alpha")
        assert stored.version == 2
        rpc.set_alias("alpha", "canary", "v2")
        try:
            texts = {}
            for model in ("alpha", "alpha@v1", "alpha@v2", "alpha@canary"):
                done = acme.completions.create(
                    model=model,
                    prompt="Once upon a time",
                    max_tokens=8,
                    temperature=0,
                    extra_headers={"loramux-route-key": "conversation-1"},
                )
                texts[model] = done.choices[0].text
                assert done.model == model
                expected = rpc.generate("Once upon a time", adapter=model, max_new_tokens=8)
                assert texts[model] == expected.text
            assert texts["alpha"] == texts["alpha@v1"] != texts["alpha@v2"] == texts["alpha@canary"]
            ids = {m.id for m in acme.models.list().data}
            assert {"alpha", "alpha@canary"} <= ids
            with pytest.raises(openai.NotFoundError) as info:
                acme.completions.create(model="alpha@v9", prompt="x", max_tokens=1)
            assert "alpha@v9" in str(info.value)
        finally:
            rpc.delete_alias("alpha", "canary")
            rpc.delete_adapter("alpha@v2")
