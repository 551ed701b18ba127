"""Issue 7.6: requests with randomly generated fields against a running server.

Hypothesis builds GenerateRequests, uploads (well-formed streams of mutated adapter files,
and arbitrary message sequences), Hub pulls and adapter references. Every call runs under
a deadline; every answer must be one of the statuses that call may give (never UNKNOWN,
INTERNAL or a missed deadline); and afterwards the server still serves a normal request,
reports SERVING and holds a consistent data dir.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from api_helpers import health_status
from grpc_health.v1 import health_pb2
from hardening_helpers import (
    ADMIN_KEY,
    Answer,
    assert_consistent,
    call,
    create_tenants,
    generate_request,
    read_folder,
    stream_call,
    stubs,
    tiny_server,
    token_ids,
    upload_requests,
)
from hub_server import HubServer, local_hub
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from loramux.core.models import ResolvedModel
from loramux.server.adapters import CONFIG_FILE, WEIGHTS_FILE
from loramux.server.app import RunningServer
from loramux.server.lora import base_linear_shapes
from loramux.server.registry import ALLOWED_FILES
from loramux.server.synthetic import write_random_adapter
from loramux.v1 import loramux_pb2 as pb

S = grpc.StatusCode
DEADLINE = 30.0
GENERATE_CODES = {S.OK, S.INVALID_ARGUMENT, S.NOT_FOUND}
UPLOAD_CODES = {
    S.OK,
    S.INVALID_ARGUMENT,
    S.FAILED_PRECONDITION,
    S.RESOURCE_EXHAUSTED,
    S.ALREADY_EXISTS,
}
PULL_CODES = {S.OK, S.INVALID_ARGUMENT, S.NOT_FOUND, S.FAILED_PRECONDITION, S.ALREADY_EXISTS}
REF_CODES = {S.OK, S.INVALID_ARGUMENT, S.NOT_FOUND}
FUZZ = settings(
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)

text = st.text(st.characters(exclude_categories=["Cs"]), max_size=80)  # protobuf strings: UTF-8
names = st.one_of(
    st.sampled_from(
        [
            "mine",
            "owner/pub",
            "owner/private",
            "../x",
            "/etc/passwd",
            "x\0y",
            "",
            "a" * 65,
            "mine\n",
        ]
    ),
    text,
)
floats32 = st.floats(width=32)  # NaN, infinities, subnormals included
wild_sampling = st.builds(  # anything a float32 can hold
    pb.SamplingParameters,
    temperature=st.one_of(st.just(0.0), floats32),
    top_p=st.one_of(st.none(), floats32),
    top_k=st.integers(0, 2**32 - 1),
    repetition_penalty=st.one_of(st.none(), floats32),
    seed=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
)
plausible_sampling = st.builds(  # what a client would send
    pb.SamplingParameters,
    temperature=st.floats(0, 2, width=32),
    top_p=st.one_of(st.none(), st.floats(0.125, 1, width=32)),
    top_k=st.integers(0, 50),
    repetition_penalty=st.one_of(st.none(), st.floats(0.5, 2, width=32)),
    seed=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
)
chat = st.lists(
    st.tuples(st.one_of(st.sampled_from(["system", "user", "assistant", "tool", ""]), text), text),
    max_size=4,
)
plausible_chat = st.lists(
    st.tuples(st.sampled_from(["system", "user", "assistant"]), text), min_size=1, max_size=3
)


@st.composite
def generate_requests(draw: st.DrawFn) -> pb.GenerateRequest:
    """Half plausible (so that many do generate, with odd text), half wild."""
    plausible = draw(st.booleans())
    request = pb.GenerateRequest(
        adapter=draw(st.sampled_from(["", "mine", "owner/pub"]) if plausible else names),
        sampling=draw(plausible_sampling if plausible else wild_sampling),
        stop=draw(
            st.lists(text, max_size=2)
            if plausible
            else st.lists(st.text(max_size=300), max_size=17)
        ),
        stop_token_ids=draw(st.lists(st.integers(0, 2**32 - 1), max_size=4)),
        ignore_eos=draw(st.booleans()),
        request_id=draw(text),
    )
    wild_tokens = st.one_of(st.none(), st.integers(-(2**31), 2**31 - 1))
    new_tokens = draw(st.integers(1, 8) if plausible else wild_tokens)
    if new_tokens is not None:
        request.max_new_tokens = new_tokens
    which = draw(st.sampled_from(["prompt", "chat"] if plausible else ["prompt", "chat", "none"]))
    if which == "prompt":
        request.prompt = draw(st.text(min_size=int(plausible), max_size=400))
    elif which == "chat":
        messages = [
            pb.ChatMessage(role=r, content=c)
            for r, c in draw(plausible_chat if plausible else chat)
        ]
        request.chat.CopyFrom(pb.ChatMessages(messages=messages))
    return request


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), text),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(text, inner, max_size=3)),
    max_leaves=8,
)
config_keys = st.sampled_from(
    ["r", "lora_alpha", "rank_pattern", "alpha_pattern", "peft_type", "use_dora", "use_rslora",
     "target_modules", "modules_to_save", "bias", "fan_in_fan_out", "base_model_name_or_path"]
)  # fmt: skip


@st.composite
def mutated_files(draw: st.DrawFn, good: dict[str, bytes]) -> dict[str, bytes]:
    """A good adapter with some of: config fields replaced, bytes flipped, a truncation."""
    files = dict(good)
    config = json.loads(files[CONFIG_FILE])
    for key, value in draw(st.lists(st.tuples(config_keys, json_values), max_size=3)):
        config[key] = value
    files[CONFIG_FILE] = json.dumps(config).encode()
    weights = bytearray(files[WEIGHTS_FILE])
    for position, value in draw(
        st.lists(st.tuples(st.integers(0, len(weights) - 1), st.integers(0, 255)), max_size=6)
    ):
        weights[position] = value
    cut = draw(st.one_of(st.none(), st.integers(0, len(weights))))
    files[WEIGHTS_FILE] = bytes(weights[:cut] if cut is not None else weights)
    if draw(st.booleans()):
        files["README.md"] = draw(st.binary(max_size=200))
    return files


file_entries = st.builds(
    pb.FileEntry,
    path=st.one_of(st.sampled_from(ALLOWED_FILES), text),
    size=st.one_of(st.integers(0, 64), st.integers(0, 2**64 - 1)),
    sha256=st.one_of(text, st.text("0123456789abcdef", min_size=64, max_size=64)),
)
upload_messages = st.lists(
    st.one_of(
        st.builds(
            lambda n, f: pb.UploadAdapterRequest(header=pb.UploadHeader(name=n, files=f)),
            names,
            st.lists(file_entries, max_size=4),
        ),
        st.builds(
            lambda p, d: pb.UploadAdapterRequest(chunk=pb.FileChunk(path=p, data=d)),
            st.one_of(st.sampled_from(ALLOWED_FILES), text),
            st.binary(max_size=128),
        ),
    ),
    max_size=5,
)


@pytest.fixture(scope="module")
def hub() -> Iterator[HubServer]:
    with local_hub() as server:
        yield server


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, tiny_llama: ResolvedModel, hub: HubServer
) -> Iterator[RunningServer]:
    running = tiny_server(
        tmp_path_factory.mktemp("fuzz") / "home",
        tiny_llama,
        max_new_tokens_limit=8,
        max_rank=16,
        max_upload_bytes=200_000,
        hub_endpoint=hub.endpoint,
    )
    yield running
    running.close()


@pytest.fixture(scope="module")
def good_files(server: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    linears = base_linear_shapes(server.state.engine.model)
    return read_folder(
        write_random_adapter(tmp_path_factory.mktemp("fuzz-good") / "a", linears, rank=4, scale=0.3)
    )


@pytest.fixture(scope="module")
def api(
    server: RunningServer, good_files: dict[str, bytes], hub: HubServer
) -> Iterator[tuple[Any, Any, str]]:
    """(inference stub, adapter stub, the fuzzing tenant's key); adapters for names to hit."""
    channel, inference, adapters, admin = stubs(f"127.0.0.1:{server.port}")
    keys = create_tenants(admin, ("fuzz", "owner"))
    for tenant, name in (("fuzz", "mine"), ("owner", "pub"), ("owner", "private")):
        answer = call(adapters.UploadAdapter, iter(upload_requests(name, good_files)), keys[tenant])
        assert answer.code == S.OK, answer.details
    public = pb.SetAdapterPublicRequest(owner="owner", name="pub", public=True)
    assert call(admin.SetAdapterPublic, public, ADMIN_KEY).code == S.OK
    hub.commit("acme/good", good_files)
    hub.commit("acme/no-weights", {CONFIG_FILE: good_files[CONFIG_FILE]})
    yield inference, adapters, keys["fuzz"]
    channel.close()


def _check(answer: Answer, allowed: set[grpc.StatusCode], what: str, request: Any) -> None:
    event(f"{what}: {answer.code.name}")  # shown with --hypothesis-show-statistics
    assert answer.code in allowed, f"{what}: {answer.code.name} {answer.details!r} for {request!r}"


def _forget(api: tuple[Any, Any, str], answer: Answer) -> None:
    """Delete what a fuzzed call happened to store, so later examples start alike."""
    if (
        answer.code == S.OK
        and answer.response is not None
        and answer.response.name not in ("mine",)
    ):
        _, adapters, key = api
        assert (
            call(adapters.DeleteAdapter, pb.AdapterRef(name=answer.response.name), key).code == S.OK
        )


@settings(FUZZ, max_examples=120)
@given(request=generate_requests(), streamed=st.booleans())
def test_fuzz_generate(
    api: tuple[Any, Any, str], request: pb.GenerateRequest, streamed: bool
) -> None:
    inference, _, key = api
    if streamed:
        answer = stream_call(inference.GenerateStream, request, key, timeout=DEADLINE)
    else:
        answer = call(inference.Generate, request, key, timeout=DEADLINE)
    _check(answer, GENERATE_CODES, "Generate", request)


@settings(FUZZ, max_examples=100)
@given(data=st.data(), name=st.one_of(st.from_regex(r"fz-[a-z0-9]{1,8}", fullmatch=True), names))
def test_fuzz_upload_of_mutated_adapters(
    api: tuple[Any, Any, str], good_files: dict[str, bytes], data: st.DataObject, name: str
) -> None:
    _, adapters, key = api
    files = data.draw(mutated_files(good_files))
    answer = call(adapters.UploadAdapter, iter(upload_requests(name, files)), key, timeout=DEADLINE)
    _check(
        answer,
        UPLOAD_CODES,
        "UploadAdapter",
        {p: hashlib.sha256(d).hexdigest()[:12] for p, d in files.items()},
    )
    _forget(api, answer)


@settings(FUZZ, max_examples=40)
@given(messages=upload_messages)
def test_fuzz_upload_message_sequences(
    api: tuple[Any, Any, str], messages: list[pb.UploadAdapterRequest]
) -> None:
    _, adapters, key = api
    answer = call(adapters.UploadAdapter, iter(messages), key, timeout=DEADLINE)
    _check(answer, UPLOAD_CODES - {S.OK}, "UploadAdapter", messages)


@settings(FUZZ, max_examples=30)
@given(
    name=st.one_of(st.from_regex(r"pl-[a-z0-9]{1,8}", fullmatch=True), names),
    repo_id=st.one_of(
        st.sampled_from(["acme/good", "acme/missing", "acme/no-weights", "acme/good\n"]), text
    ),
    revision=st.one_of(st.sampled_from(["", "main", "no-such-branch", "0" * 40]), text),
)
def test_fuzz_pull(api: tuple[Any, Any, str], name: str, repo_id: str, revision: str) -> None:
    _, adapters, key = api
    request = pb.PullAdapterRequest(name=name, repo_id=repo_id, revision=revision)
    answer = call(adapters.PullAdapter, request, key, timeout=DEADLINE)
    _check(answer, PULL_CODES, "PullAdapter", request)
    _forget(api, answer)


@settings(FUZZ, max_examples=40)
@given(
    method=st.sampled_from(["GetAdapter", "LoadAdapter", "UnloadAdapter", "DeleteAdapter"]),
    name=names,
)
def test_fuzz_adapter_refs(api: tuple[Any, Any, str], method: str, name: str) -> None:
    _, adapters, key = api
    if method == "DeleteAdapter" and name == "mine":
        return  # the one adapter the other examples aim at
    answer = call(getattr(adapters, method), pb.AdapterRef(name=name), key, timeout=DEADLINE)
    if method in ("LoadAdapter", "UnloadAdapter"):
        # Another tenant's public adapter may be used, but only its owner or an admin may
        # load or unload it.
        _check(answer, REF_CODES | {S.PERMISSION_DENIED}, method, name)
        if name == "owner/pub":
            assert answer.code == S.PERMISSION_DENIED, (method, answer.details)
    else:
        _check(answer, REF_CODES, method, name)


def test_still_serving_after_fuzzing(api: tuple[Any, Any, str], server: RunningServer) -> None:
    inference, adapters, key = api
    address = f"127.0.0.1:{server.port}"
    assert health_status(address) == health_pb2.HealthCheckResponse.SERVING
    assert token_ids(call(inference.Generate, generate_request("Still here", "mine", 4), key))
    assert call(adapters.GetAdapter, pb.AdapterRef(name="owner/pub"), key).code == S.OK
    assert server.state.engine.stats().running == 0
    assert_consistent(server.state.settings.home)
