"""Issue 4: the gRPC API end to end, on a real server on 127.0.0.1 with the real NF4 SmolLM2."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import signal
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from api_helpers import ServerProcess, eventually, free_port, health_status, linear_shapes
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hub_server import HubServer, local_hub

from loramux.cli import main as loramux_main
from loramux.client import (
    AsyncLoramuxClient,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    LoramuxClient,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from loramux.client.client import upload_messages
from loramux.core.config import Settings
from loramux.core.models import ResolvedModel
from loramux.server.adapters import LinearShape
from loramux.server.app import RunningServer, start_server
from loramux.server.synthetic import write_random_adapter
from loramux.v1 import loramux_pb2 as pb

pytestmark = pytest.mark.slow
ADMIN_KEY = "admin-test-key"
QUESTION = [("user", "What is the capital of France?")]
HUB_TOKEN = "hub-secret-token"


@pytest.fixture(scope="module")
def linears(smollm2: ResolvedModel) -> dict[str, LinearShape]:
    return linear_shapes(smollm2.path)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory, linears: dict) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("api-adapters")
    return {
        name: write_random_adapter(root / name, linears, rank=8, alpha=16, seed=i, scale=0.06)
        for i, name in enumerate(("alpha", "beta", "gamma"))
    }


@pytest.fixture(scope="module")
def hub() -> Iterator[HubServer]:
    with local_hub(HUB_TOKEN) as server:  # public repos readable by anyone
        yield server


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, default_models_dir: Path, hub: HubServer
) -> Iterator[RunningServer]:
    home = tmp_path_factory.mktemp("api-home")
    (home / "models").symlink_to(default_models_dir, target_is_directory=True)
    settings = Settings(
        home=home,
        port=0,
        metrics_port=free_port(),
        http_port=free_port(),
        admin_keys=[ADMIN_KEY],
        max_loaded_adapters=4,
        max_upload_bytes=20_000_000,
        tenant_max_adapters=3,
        hub_endpoint=hub.endpoint,
    )
    running = start_server(settings)
    yield running
    running.close()


@pytest.fixture(scope="module")
def address(server: RunningServer) -> str:
    return f"127.0.0.1:{server.port}"


@pytest.fixture(scope="module")
def admin(address: str) -> Iterator[LoramuxClient]:
    with LoramuxClient(address, ADMIN_KEY) as client:
        yield client


@pytest.fixture(scope="module")
def tenants(admin: LoramuxClient, address: str) -> Iterator[dict[str, LoramuxClient]]:
    clients = {}
    for name in ("acme", "globex"):
        admin.create_tenant(name)
        _, key = admin.create_key(name)
        clients[name] = LoramuxClient(address, key)
    yield clients
    for client in clients.values():
        client.close()


def test_health_and_reflection(address: str) -> None:
    assert health_status(address) == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        response = next(stub.ServerReflectionInfo(iter([request])))
    names = {s.name for s in response.list_services_response.service}
    assert {
        "loramux.v1.InferenceService",
        "loramux.v1.AdapterService",
        "grpc.health.v1.Health",
    } <= names


def test_keys_are_required_and_checked(address: str, admin: LoramuxClient, tenants: dict) -> None:
    with LoramuxClient(address) as anonymous, pytest.raises(Unauthenticated):
        anonymous.list_adapters()
    with LoramuxClient(address, "lmx_wrong") as wrong, pytest.raises(Unauthenticated):
        wrong.generate("hi", max_new_tokens=1)
    with pytest.raises(PermissionDenied):
        tenants["acme"].create_tenant("intruder")
    with pytest.raises(PermissionDenied):
        tenants["acme"].create_key("globex")
    key_id, key = admin.create_key("acme")
    with LoramuxClient(address, key) as temporary:
        assert temporary.list_adapters() is not None
        admin.revoke_key(key_id)
        with pytest.raises(Unauthenticated):
            temporary.list_adapters()


def test_two_tenants_upload_generate_and_stay_isolated(
    tenants: dict[str, LoramuxClient], adapters: dict[str, Path]
) -> None:
    acme, globex = tenants["acme"], tenants["globex"]
    uploaded = acme.upload_adapter(adapters["alpha"], "shared-name")
    assert uploaded.owner == "acme" and uploaded.rank == 8 and uploaded.alpha == 16
    assert (
        uploaded.sha256
        == hashlib.sha256(
            (adapters["alpha"] / "adapter_model.safetensors").read_bytes()
        ).hexdigest()
    )
    # Both tenants may use the same name; each sees only its own adapter.
    globex.upload_adapter(adapters["beta"], "shared-name")
    assert [a.owner for a in acme.list_adapters()] == ["acme"]
    assert [a.owner for a in globex.list_adapters()] == ["globex"]
    base = acme.generate(messages=QUESTION, max_new_tokens=10)
    with_acme = acme.generate(messages=QUESTION, adapter="shared-name", max_new_tokens=10)
    with_globex = globex.generate(messages=QUESTION, adapter="shared-name", max_new_tokens=10)
    assert "Paris" in base.text
    assert with_acme.token_ids != with_globex.token_ids  # different adapters behind one name
    assert with_acme.token_ids != base.token_ids
    # Another tenant's private adapter does not exist for you, whatever you do with it.
    for call in (
        lambda: globex.generate("hi", adapter="acme/shared-name", max_new_tokens=1),
        lambda: globex.get_adapter("acme/shared-name"),
        lambda: globex.delete_adapter("acme/shared-name"),
        lambda: globex.load_adapter("acme/shared-name"),
    ):
        with pytest.raises(NotFound):
            call()
    with pytest.raises(NotFound) as info:
        acme.generate("hi", adapter="no-such-adapter", max_new_tokens=1)
    assert info.value.field == "adapter"


def test_public_adapters_are_usable_but_not_writable(
    admin: LoramuxClient, tenants: dict[str, LoramuxClient], adapters: dict[str, Path]
) -> None:
    acme, globex = tenants["acme"], tenants["globex"]
    acme.upload_adapter(adapters["gamma"], "public-one")
    admin.set_adapter_public("acme", "public-one")
    seen = {(a.owner, a.name) for a in globex.list_adapters()}
    assert ("acme", "public-one") in seen
    shared = globex.generate(messages=QUESTION, adapter="acme/public-one", max_new_tokens=12)
    # The owner's adapter really applies: the owner's own greedy output, not the base model's.
    owner = acme.generate(messages=QUESTION, adapter="public-one", max_new_tokens=12)
    assert shared.text == owner.text
    assert shared.text != globex.generate(messages=QUESTION, max_new_tokens=12).text
    with pytest.raises(NotFound):
        globex.delete_adapter("acme/public-one")
    admin.set_adapter_public("acme", "public-one", False)
    with pytest.raises(NotFound):
        globex.get_adapter("acme/public-one")


def test_streamed_text_equals_unary_text(tenants: dict[str, LoramuxClient]) -> None:
    acme = tenants["acme"]
    unary = acme.generate(messages=QUESTION, adapter="shared-name", max_new_tokens=16)
    chunks = list(acme.generate_stream(messages=QUESTION, adapter="shared-name", max_new_tokens=16))
    assert "".join(c.text for c in chunks) == unary.text
    assert [t for c in chunks for t in c.token_ids] == unary.token_ids
    assert chunks[-1].finish_reason == unary.finish_reason
    assert chunks[-1].completion_tokens == unary.completion_tokens == len(unary.token_ids)


def test_weighted_adapters_strength_and_composition(
    address: str, tenants: dict[str, LoramuxClient]
) -> None:
    """GenerateRequest.adapters: weight 0 is the base model, weight 1 the adapter itself,
    several their weighted sum (checked against PEFT in tests/test_composition.py); the
    sync and async clients send the same; bad entries are refused naming the field."""
    acme, globex = tenants["acme"], tenants["globex"]
    ask = {"messages": QUESTION, "max_new_tokens": 12}
    base = acme.generate(**ask).token_ids
    alone = acme.generate(adapter="shared-name", **ask).token_ids
    other = acme.generate(adapter="public-one", **ask).token_ids
    assert acme.generate(adapters={"shared-name": 0.0}, **ask).token_ids == base
    assert acme.generate(adapters={"shared-name": 1.0}, **ask).token_ids == alone
    mix = {"shared-name": 2.0, "public-one": -1.5}
    first = acme.generate(adapters=mix, **ask)
    assert first.token_ids not in (base, alone, other)
    # The transports compared with the prompt's blocks in the prefix cache for both: the
    # first request computed the whole prompt, these only its tail, and a row summed in
    # another shape may take the other of two nearly tied tokens (docs/engine.md).
    composed = acme.generate(adapters=mix, **ask)
    streamed = [t for c in acme.generate_stream(adapters=mix, **ask) for t in c.token_ids]
    assert streamed == composed.token_ids
    acme_key = acme._cfg.metadata[0][1].removeprefix("Bearer ")

    async def from_async() -> list[int]:
        async with AsyncLoramuxClient(address, acme_key) as client:
            return (await client.generate(adapters=list(mix.items()), **ask)).token_ids

    assert asyncio.run(from_async()) == composed.token_ids
    cases = [
        ({"adapter": "shared-name", "adapters": {"public-one": 1.0}}, InvalidArgument, "adapters"),
        ({"adapters": {f"a{i}": 1.0 for i in range(5)}}, InvalidArgument, "adapters"),
        ({"adapters": {"shared-name": float("nan")}}, InvalidArgument, "adapters[0].weight"),
        (
            {"adapters": {"shared-name": 1.0, "public-one": 9.0}},
            InvalidArgument,
            "adapters[1].weight",
        ),
        ({"adapters": {"shared-name": 1.0, "nope": 0.5}}, NotFound, "adapters[1].name"),
    ]
    for kwargs, error, field in cases:
        with pytest.raises(error) as info:
            acme.generate("hi", max_new_tokens=1, **kwargs)
        assert info.value.field == field, kwargs
    with pytest.raises(NotFound):  # another tenant's private adapter, even at weight 0
        globex.generate("hi", max_new_tokens=1, adapters={"acme/shared-name": 0.0})


def test_openai_client_on_the_real_model(
    server: RunningServer, admin: LoramuxClient, address: str
) -> None:
    """The HTTP front on the real NF4 SmolLM2: the same answer as gRPC, and a right one."""
    import openai

    assert server.http is not None
    admin.create_tenant("openai-user")
    _, key = admin.create_key("openai-user")
    api = openai.OpenAI(
        base_url=f"http://127.0.0.1:{server.http.port}/v1", api_key=key, max_retries=0
    )
    base = api.models.list().data[0].id
    assert base == server.state.engine.info.base_model
    chat = api.chat.completions.create(
        model=base,
        messages=[{"role": "user", "content": QUESTION[0][1]}],
        max_tokens=10,
        temperature=0,
    )
    with LoramuxClient(address, key) as rpc:
        expected = rpc.generate(messages=QUESTION, max_new_tokens=10)
    assert chat.choices[0].message.content == expected.text
    assert "Paris" in expected.text


def test_cancel_frees_the_engine_row_and_deadlines_hold(
    server: RunningServer, tenants: dict[str, LoramuxClient]
) -> None:
    acme = tenants["acme"]
    engine = server.state.engine
    stream = acme.generate_stream("Count to one thousand:", max_new_tokens=500, ignore_eos=True)
    next(stream)
    assert engine.stats().running == 1
    stream.close()  # cancels the call
    assert eventually(lambda: engine.stats().running == 0)
    with pytest.raises(DeadlineExceeded):
        acme.generate("Count to one thousand:", max_new_tokens=500, ignore_eos=True, timeout=0.5)
    assert eventually(lambda: engine.stats().running == 0)


def test_bad_requests_name_the_field(tenants: dict[str, LoramuxClient]) -> None:
    acme = tenants["acme"]
    cases = [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x", "max_new_tokens": 0}, "max_new_tokens"),
        ({"prompt": "x", "max_new_tokens": 10**6}, "max_new_tokens"),
        ({"prompt": "x", "temperature": -1.0}, "temperature"),
        ({"prompt": "x", "top_p": 1.5}, "top_p"),
        ({"messages": [("wizard", "hi")]}, "messages[0].role"),
        ({"prompt": "word " * 9000}, "prompt"),
    ]
    for kwargs, field in cases:
        prompt = kwargs.pop("prompt", None)
        with pytest.raises(InvalidArgument) as info:
            acme.generate(prompt, **kwargs)
        assert info.value.field == field, kwargs


def test_upload_checks_and_quotas(
    server: RunningServer, tenants: dict[str, LoramuxClient], adapters: dict[str, Path]
) -> None:
    acme = tenants["acme"]
    home = server.state.settings.home
    before = sorted(p.name for p in (home / "adapters").iterdir())
    with pytest.raises(InvalidArgument):
        acme.upload_adapter(adapters["beta"], "../escape")
    # A header whose sha256 does not match the bytes sent (acme is under its quota here: a
    # tenant at its adapter count is refused before the bytes are read).
    messages = list(upload_messages(adapters["beta"], "tampered"))
    messages[0].header.files[1].sha256 = "0" * 64
    with pytest.raises(grpc.RpcError) as info:
        acme.adapters.UploadAdapter(iter(messages), metadata=acme._cfg.metadata)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sha256" in info.value.details()
    # Uploading to a name that exists adds its next version; the bare name still serves v1.
    second = acme.upload_adapter(adapters["beta"], "shared-name")
    assert second.version == 2 and acme.get_adapter("shared-name").version == 1
    # Over the tenant's adapter-count quota (3, counting versions): acme has three now.
    with pytest.raises(ResourceExhausted):
        acme.upload_adapter(adapters["gamma"], "fourth")
    acme.delete_adapter("shared-name@v2")
    after = sorted(p.name for p in (home / "adapters").iterdir())
    assert after == before  # nothing partial or orphaned left behind
    assert not any((home / "tmp").iterdir())
    with pytest.raises(NotFound):
        acme.get_adapter("tampered")


def test_load_unload_report_state(tenants: dict[str, LoramuxClient]) -> None:
    acme = tenants["acme"]
    assert acme.load_adapter("shared-name").state == "device"
    assert acme.unload_adapter("shared-name").state == "stored"
    assert acme.get_adapter("shared-name").state == "stored"


def test_pull_from_hub_stores_the_exact_commit(
    hub: HubServer,
    tenants: dict[str, LoramuxClient],
    adapters: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    globex = tenants["globex"]
    files = {f.name: f.read_bytes() for f in adapters["gamma"].iterdir()}
    first = hub.commit("globex/my-adapter", files)
    changed = dict(files, **{"README.md": b"# v2\n"})
    second = hub.commit("globex/my-adapter", changed)
    pinned = globex.pull_adapter("globex/my-adapter", revision=first, name="pinned")
    assert pinned.revision == first and pinned.source == "hub"
    latest = globex.pull_adapter("globex/my-adapter", revision="main", name="latest")
    assert latest.revision == second
    globex.delete_adapter("latest")  # stay within the 3-adapter quota
    assert globex.generate("Hi", adapter="pinned", max_new_tokens=2).completion_tokens >= 1
    with pytest.raises(NotFound) as missing:
        globex.pull_adapter("globex/nothing-here", name="x1")
    assert missing.value.field == "repo_id"
    with pytest.raises(NotFound) as bad_rev:
        globex.pull_adapter("globex/my-adapter", revision="no-such-branch", name="x2")
    assert bad_rev.value.field == "revision"
    # A private repo needs the caller's own token; the server never lends the one it holds.
    secret = hub.commit("globex/private-adapter", files, private=True)
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    with pytest.raises(NotFound):
        globex.pull_adapter("globex/private-adapter", name="private")
    private = globex.pull_adapter("globex/private-adapter", name="private", hub_token=HUB_TOKEN)
    assert private.revision == secret
    globex.delete_adapter("private")
    hub.stop()
    try:
        with pytest.raises(Unavailable):
            globex.pull_adapter("globex/my-adapter", name="x3")
        assert globex.generate("Hi", adapter="pinned", max_new_tokens=2).completion_tokens >= 1
    finally:
        hub.start()


def test_metrics_expose_the_series(server: RunningServer, tenants: dict) -> None:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    for series in (
        'loramux_requests_total{adapter="acme/shared-name@v1",status="OK",tenant="acme"}',
        'loramux_requests_total{adapter="unknown",status="NOT_FOUND",tenant="acme"}',
        "loramux_time_to_first_token_seconds_bucket",
        "loramux_inter_token_latency_seconds_bucket",
        'loramux_prompt_tokens_total{tenant="acme"}',
        'loramux_generated_tokens_total{tenant="acme"}',
        "loramux_queue_depth",
        "loramux_running_batch_size",
        "loramux_adapter_cache_hits_total",
        "loramux_adapter_cache_misses_total",
        "loramux_adapter_loads_total",
        "loramux_adapter_evictions_total",
        "loramux_adapter_load_seconds_total",
        'loramux_memory_bytes{part="base_model"}',
        'loramux_memory_bytes{part="adapters_cpu"}',
        'loramux_memory_bytes{part="adapters_cpu_pinned"}',
        "loramux_kv_cache_blocks_total",
        "loramux_kv_cache_blocks_used",
        "loramux_kv_cache_usage_ratio",
        "loramux_preemptions_total",
        "loramux_prefix_cache_hit_tokens_total",
        "loramux_prefill_tokens_total",
    ):
        assert series in text, series


def test_restart_keeps_adapters_and_sigterm_drains(
    tmp_path: Path, default_models_dir: Path, adapters: dict[str, Path]
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(default_models_dir, target_is_directory=True)
    args = ("--dev", "--lora-kernel", "eager", "--drain-seconds", "60")
    server = ServerProcess(home, *args).start()
    try:
        with LoramuxClient(server.address) as client:  # --dev: no keys
            client.upload_adapter(adapters["alpha"], "kept")
            expected = client.generate(messages=QUESTION, adapter="kept", max_new_tokens=8)
            stream = client.generate_stream(messages=QUESTION, max_new_tokens=40, ignore_eos=True)
            first = next(stream)
            server.signal(signal.SIGTERM)
            rest = list(stream)  # the in-flight stream finishes during the drain
            assert rest[-1].finish_reason == "length"
            assert first.token_ids and sum(len(c.token_ids) for c in rest) == 39
        assert server.wait() == 0
        assert "--dev: DEVELOPMENT MODE, every caller is an admin" in server.log.read_text()
        server.start()
        with LoramuxClient(server.address) as client:
            names = [a.name for a in client.list_adapters()]
            again = client.generate(messages=QUESTION, adapter="kept", max_new_tokens=8)
        assert names == ["kept"]
        assert again.token_ids == expected.token_ids
    finally:
        server.stop()


def test_concurrent_quota_is_resource_exhausted(
    server: RunningServer, admin: LoramuxClient, address: str
) -> None:
    admin.create_tenant("tiny", max_concurrent=1, max_queued=1)
    _, key = admin.create_key("tiny")
    with LoramuxClient(address, key) as tiny:
        first = tiny.generate_stream("Count:", max_new_tokens=300, ignore_eos=True)
        next(first)
        errors: list[Exception] = []
        waiter = threading.Thread(
            target=lambda: errors.append(_capture(lambda: tiny.generate("a", max_new_tokens=1)))
        )
        waiter.start()  # waits in the tenant's queue (one allowed)
        assert eventually(lambda: server.state.gate.waiting().get("tiny", 0) == 1)
        with pytest.raises(ResourceExhausted):
            tiny.generate("b", max_new_tokens=1)
        first.close()
        waiter.join(60)
        assert errors == [None]

        # A caller that gives up while queued leaves the line at once (not when a slot frees).
        holder = tiny.generate_stream("Count:", max_new_tokens=300, ignore_eos=True)
        next(holder)
        queued = tiny.inference.Generate.future(
            pb.GenerateRequest(prompt="c", max_new_tokens=1), metadata=tiny._cfg.metadata
        )
        assert eventually(lambda: server.state.gate.waiting().get("tiny", 0) == 1)
        queued.cancel()
        assert eventually(lambda: server.state.gate.waiting().get("tiny", 0) == 0)
        assert server.state.gate.in_flight()["tiny"] == 1  # the holder still runs
        with pytest.raises(grpc.FutureCancelledError):
            queued.result()
        holder.close()


def _capture(call) -> Exception | None:  # type: ignore[no-untyped-def]
    try:
        call()
    except Exception as exc:
        return exc
    return None


def test_async_client_streams_and_maps_errors(
    address: str, tenants: dict[str, LoramuxClient]
) -> None:
    acme_key = tenants["acme"]._cfg.metadata[0][1].removeprefix("Bearer ")
    unary = tenants["acme"].generate(messages=QUESTION, adapter="shared-name", max_new_tokens=12)

    async def scenario() -> tuple[str, list[int], str, list[str]]:
        async with AsyncLoramuxClient(address, acme_key) as client:
            chunks = [
                chunk
                async for chunk in client.generate_stream(
                    messages=QUESTION, adapter="shared-name", max_new_tokens=12
                )
            ]
            whole = await client.generate(
                messages=QUESTION, adapter="shared-name", max_new_tokens=12, timeout=120
            )
            names = [a.name for a in await client.list_adapters()]
            with pytest.raises(NotFound):
                await client.get_adapter("globex/shared-name")
            with pytest.raises(NotFound):
                async for _ in client.generate_stream("hi", adapter="nope", max_new_tokens=1):
                    pass
            with pytest.raises(PermissionDenied):
                await client.list_tenants()
            text = "".join(c.text for c in chunks)
            return text, [t for c in chunks for t in c.token_ids], whole.text, names

    streamed_text, streamed_ids, whole_text, names = asyncio.run(scenario())
    assert streamed_text == whole_text == unary.text
    assert streamed_ids == unary.token_ids
    assert "shared-name" in names


def test_incompatible_or_oversized_uploads_are_refused(
    server: RunningServer,
    admin: LoramuxClient,
    address: str,
    tmp_path: Path,
    linears: dict[str, LinearShape],
    adapters: dict[str, Path],
) -> None:
    admin.create_tenant("small", max_bytes=1000)
    _, key = admin.create_key("small")
    home = server.state.settings.home
    before = sorted(p.name for p in (home / "adapters").iterdir())
    wrong = {n: LinearShape(s.in_features * 2, s.out_features) for n, s in linears.items()}
    misfit = write_random_adapter(tmp_path / "misfit", wrong, rank=4)
    with pytest.raises(FailedPrecondition) as info:
        admin.upload_adapter(misfit, "misfit")
    assert "another base model" in info.value.message
    assert info.value.field == "adapter_model.safetensors"
    with LoramuxClient(address, key) as small:
        # Over the tenant's byte quota (1000 bytes).
        with pytest.raises(ResourceExhausted) as quota:
            small.upload_adapter(adapters["alpha"], "too-big-for-me")
        assert "bytes" in quota.value.message
        # A header announcing more than --max-upload-bytes is refused before any byte moves.
        header = next(upload_messages(adapters["alpha"], "huge"))
        header.header.files[1].size = 10**12
        with pytest.raises(grpc.RpcError) as huge:
            small.adapters.UploadAdapter(iter([header]), metadata=small._cfg.metadata)
        assert huge.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert dict(huge.value.trailing_metadata())["loramux-error-field"] == "files"
        assert small.list_adapters() == []
    assert sorted(p.name for p in (home / "adapters").iterdir()) == before
    assert not any((home / "tmp").iterdir())


def test_cli_commands_against_the_server(
    admin: LoramuxClient, address: str, adapters: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    def run(*args: str, key: str = ADMIN_KEY) -> tuple[int, str, str]:
        capsys.readouterr()
        code = loramux_main([*args, "--address", address, "--api-key", key])
        out, err = capsys.readouterr()
        return code, out, err

    limits = ("--max-adapters", "2", "--requests-per-minute", "50")
    assert run("tenants", "create", "cli-user", *limits)[0] == 0
    code, out, _ = run("tenants", "key", "cli-user")
    key = re.search(r"^key\s+(\S+)$", out, re.MULTILINE).group(1)  # type: ignore[union-attr]
    code, out, _ = run("tenants", "list")
    assert code == 0 and re.search(
        r"^cli-user .* adapters=2 .* requests/min=50 ", out, re.MULTILINE
    )
    assert run("adapters", "upload", str(adapters["beta"]), "--name", "cli-one", key=key)[0] == 0
    code, out, _ = run("adapters", "list", "--json", key=key)
    assert [(a["owner"], a["name"], a["rank"]) for a in json.loads(out)] == [
        ("cli-user", "cli-one", 8)
    ]
    assert json.loads(run("adapters", "load", "cli-one", "--json", key=key)[1])["state"] == "device"
    code, out, _ = run("adapters", "unload", "cli-one", key=key)
    assert code == 0 and " stored " in out
    code, out, _ = run(
        "generate", "Hello", "--adapter", "cli-one", "--max-new-tokens", "3", "--no-stream", key=key
    )
    assert code == 0 and out.strip()
    code, out, _ = run("generate", "--chat", "Hi", "--max-new-tokens", "3", key=key)
    assert code == 0 and out.strip()
    code, _, err = run("tenants", "list", key=key)  # not an admin
    assert code == 2 and "admin" in err
    code, _, err = run("adapters", "show", "nothing-here", key=key)
    assert code == 2 and "nothing-here" in err
    assert run("adapters", "rm", "cli-one", key=key)[0] == 0
    with LoramuxClient(address, key) as cli_user:
        assert cli_user.list_adapters() == []


def test_metric_labels_stay_bounded(server: RunningServer, tenants: dict) -> None:
    metrics = server.state.metrics
    for i in range(2000):
        metrics.request_done("acme", f"acme/many-{i}", "OK", 0.0)
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    labels = set(re.findall(r'^loramux_requests_total\{adapter="([^"]*)"', text, re.MULTILINE))
    assert len(labels) <= metrics.adapter_label.limit + 3  # + base, unknown, other
    assert "other" in labels


def test_an_adapter_deleted_while_a_request_resolves_it_is_not_found(
    server: RunningServer,
    admin: LoramuxClient,
    address: str,
    linears: dict[str, LinearShape],
    tmp_path: Path,
) -> None:
    """A request found the adapter's row; before it reached the engine the adapter was
    deleted (its entry evicted, its files removed), so the request registered it again and
    its load found no files. The answer is NOT_FOUND, as if the delete had come first, not
    a FAILED_PRECONDITION about missing files (the soak test met this race once)."""
    admin.create_tenant("initech")
    _, key = admin.create_key("initech")
    state = server.state
    with LoramuxClient(address, key) as initech:
        # Files of its own (stored files are shared by digest and stay while any row uses them)
        files = write_random_adapter(
            tmp_path / "own", linears, rank=8, alpha=16, seed=99, scale=0.06
        )
        record = initech.upload_adapter(files, "short-lived")
        registry = state.registry
        find = registry.find
        racing = threading.Event()

        def find_then_delete(tenant: str, ref: str, **kwargs: object) -> object:
            found = find(tenant, ref, **kwargs)  # type: ignore[arg-type]
            if ref == "short-lived" and not kwargs.get("for_write") and not racing.is_set():
                racing.set()  # the delete runs in full between this lookup and the engine
                initech.delete_adapter("short-lived")
                engine_id = found.engine_id
                assert eventually(lambda: engine_id not in state.engine.adapters)
            return found

        registry.find = find_then_delete  # type: ignore[method-assign]
        try:
            with pytest.raises(NotFound) as info:
                initech.generate("hi", adapter="short-lived", max_new_tokens=1)
        finally:
            registry.find = find  # type: ignore[method-assign]
        assert racing.is_set()
        assert info.value.field == "adapter"
        assert record.name not in [a.name for a in initech.list_adapters()]
