"""Issue 7.2: bad requests the API tests do not cover, sent raw through the gRPC stubs.

Names that try to leave the data dir, uploads that break the streaming protocol or the
size limit, and sampling values at the edge of float32. Each gets a specific status with
the field named; nothing is written outside the data dir, nothing partial becomes
visible, and nobody else's request is disturbed.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from hardening_helpers import (
    ADMIN_KEY,
    Answer,
    assert_consistent,
    call,
    create_tenants,
    files_outside,
    generate_request,
    read_folder,
    registry_rows,
    stubs,
    tiny_server,
    token_ids,
    upload_requests,
)
from hub_server import HubServer, local_hub

from loramux.core.models import ResolvedModel
from loramux.server.app import RunningServer
from loramux.server.lora import base_linear_shapes
from loramux.server.synthetic import write_random_adapter
from loramux.v1 import loramux_pb2 as pb

UPLOAD_LIMIT = 100_000
LONG = 300  # tokens of the bystander's request that must overlap the others
OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
Api = tuple[Any, Any, Any, dict[str, str]]  # inference, adapters, admin stubs; tenant -> key

HOSTILE_NAMES = [
    "../x",
    "..",
    ".",
    "/etc/passwd",
    "../../../../etc/passwd",
    "a/../../b",
    "x\0y",
    "\0",
    "name\n",
    "name\r\n",
    "a b",
    "x" * 65,
    "C:\\Windows\\win.ini",
    "ｘ",  # fullwidth: not ASCII
    "-rf",
    ".hidden",
    "%2e%2e%2fx",
]
HOSTILE_REPO_IDS = [
    "../x",
    "/etc/passwd",
    "acme/../../etc",
    "acme/..",
    "acme/x\0",
    "acme/x\n",
    "acme/",
    "/x",
    "acme/a/b",
]


@pytest.fixture(scope="module")
def hub() -> Iterator[HubServer]:
    with local_hub() as server:
        yield server


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bad-requests")


@pytest.fixture(scope="module")
def server(root: Path, tiny_llama: ResolvedModel, hub: HubServer) -> Iterator[RunningServer]:
    running = tiny_server(
        root / "home",
        tiny_llama,
        max_upload_bytes=UPLOAD_LIMIT,
        max_new_tokens_limit=LONG,
        hub_endpoint=hub.endpoint,
    )
    yield running
    running.close()


@pytest.fixture(scope="module")
def api(server: RunningServer) -> Iterator[Api]:
    channel, inference, adapters, admin = stubs(f"127.0.0.1:{server.port}")
    keys = create_tenants(admin, ("alice", "mallory"))
    yield inference, adapters, admin, keys
    channel.close()


@pytest.fixture(scope="module")
def adapter_files(server: RunningServer, root: Path) -> dict[str, bytes]:
    linears = base_linear_shapes(server.state.engine.model)
    return read_folder(write_random_adapter(root / "good", linears, rank=8, seed=5, scale=0.5))


@pytest.fixture(scope="module")
def stored(api: Api, adapter_files: dict[str, bytes], hub: HubServer) -> str:
    """Mallory's one real adapter (and a Hub repo holding the same files)."""
    _, adapters, _, keys = api
    answer = call(
        adapters.UploadAdapter, iter(upload_requests("real", adapter_files)), keys["mallory"]
    )
    assert answer.code == OK, answer.details
    hub.commit("acme/good", adapter_files)
    return "real"


def _upload(api: Api, messages: list[pb.UploadAdapterRequest], tenant: str = "mallory") -> Answer:
    _, adapters, _, keys = api
    return call(adapters.UploadAdapter, iter(messages), keys[tenant])


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=repr)
def test_hostile_names_are_refused_everywhere(
    name: str,
    api: Api,
    server: RunningServer,
    root: Path,
    stored: str,
    adapter_files: dict[str, bytes],
) -> None:
    inference, adapters, admin, keys = api
    home = server.state.settings.home
    outside, rows = files_outside(root, skip=[home]), registry_rows(home)
    key = keys["mallory"]
    answers = {
        "generate": call(inference.Generate, generate_request("hi", adapter=name), key),
        "get": call(adapters.GetAdapter, pb.AdapterRef(name=name), key),
        "delete": call(adapters.DeleteAdapter, pb.AdapterRef(name=name), key),
        "load": call(adapters.LoadAdapter, pb.AdapterRef(name=name), key),
        "unload": call(adapters.UnloadAdapter, pb.AdapterRef(name=name), key),
    }
    for what, answer in answers.items():
        assert answer.code in (INVALID, NOT_FOUND), (what, answer)
    upload = _upload(api, upload_requests(name, adapter_files))
    assert (upload.code, upload.field) == (INVALID, "name"), upload
    pull = call(adapters.PullAdapter, pb.PullAdapterRequest(name=name, repo_id="acme/good"), key)
    assert (pull.code, pull.field) == (INVALID, "name"), pull
    tenant = call(admin.CreateTenant, pb.CreateTenantRequest(name=name), ADMIN_KEY)
    assert (tenant.code, tenant.field) == (INVALID, "name"), tenant
    # Nothing written anywhere outside the data dir, nothing new inside it.
    assert files_outside(root, skip=[home]) == outside
    assert registry_rows(home) == rows
    assert_consistent(home)
    assert call(adapters.GetAdapter, pb.AdapterRef(name=stored), key).code == OK


@pytest.mark.parametrize("repo_id", HOSTILE_REPO_IDS, ids=repr)
def test_hostile_repo_ids_are_invalid_not_unavailable(
    repo_id: str, api: Api, server: RunningServer, stored: str
) -> None:
    """A malformed repo id is the caller's mistake: INVALID_ARGUMENT, never UNAVAILABLE
    (which clients retry) and never a request that leaves the server for the Hub."""
    _, adapters, _, keys = api
    rows = registry_rows(server.state.settings.home)
    answer = call(
        adapters.PullAdapter, pb.PullAdapterRequest(name="pulled", repo_id=repo_id), keys["mallory"]
    )
    assert (answer.code, answer.field) == (INVALID, "repo_id"), answer
    assert registry_rows(server.state.settings.home) == rows
    assert_consistent(server.state.settings.home)


def test_upload_over_the_size_limit(
    api: Api, server: RunningServer, adapter_files: dict[str, bytes]
) -> None:
    home = server.state.settings.home
    rows = registry_rows(home)
    padded = {**adapter_files, "README.md": b"#" * UPLOAD_LIMIT}
    declared = _upload(api, upload_requests("too-big", padded))
    assert declared.code == grpc.StatusCode.RESOURCE_EXHAUSTED, declared
    assert declared.field == "files" and str(UPLOAD_LIMIT) in declared.details
    # A header that lies small, then more bytes than it declared: cut off at the excess.
    messages = upload_requests("lies", adapter_files)
    messages.append(
        pb.UploadAdapterRequest(
            chunk=pb.FileChunk(path="adapter_config.json", data=b"x" * UPLOAD_LIMIT)
        )
    )
    lied = _upload(api, messages)
    assert (lied.code, lied.field) == (INVALID, "chunk.data"), lied
    assert "larger than declared" in lied.details
    # An absurd declared size is refused before anything is read.
    huge = upload_requests("absurd", adapter_files)
    huge[0].header.files.append(pb.FileEntry(path="README.md", size=2**63, sha256="0" * 64))
    assert _upload(api, huge[:1]).code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert registry_rows(home) == rows
    assert_consistent(home)


def test_upload_protocol_violations(
    api: Api, server: RunningServer, adapter_files: dict[str, bytes]
) -> None:
    home = server.state.settings.home
    rows = registry_rows(home)
    good = upload_requests("protocol", adapter_files)
    header, chunks = good[0], good[1:]
    short = upload_requests("protocol", adapter_files)
    short.pop()  # the last chunk never comes
    duplicated = pb.UploadAdapterRequest()
    duplicated.CopyFrom(header)
    duplicated.header.files.append(duplicated.header.files[0])
    bad_sha = pb.UploadAdapterRequest()
    bad_sha.CopyFrom(header)
    bad_sha.header.files[0].sha256 = "abc"
    escaping = pb.UploadAdapterRequest()
    escaping.CopyFrom(header)
    escaping.header.files[0].path = "../adapter_config.json"
    cases = {
        "header-less": (chunks, "header"),
        "empty stream": ([], "header"),
        "second header": ([header, chunks[0], header, *chunks[1:]], "header"),
        "file listed twice": ([duplicated, *chunks], "files[2].path"),
        "sha256 not hex": ([bad_sha, *chunks], "files[0].sha256"),
        "path leaving the folder": ([escaping, *chunks], "files[0].path"),
        "fewer bytes than declared": (short, "files"),
    }
    for case, (messages, field) in cases.items():
        answer = _upload(api, list(messages))
        assert (answer.code, answer.field) == (INVALID, field), (case, answer)
    assert registry_rows(home) == rows
    assert_consistent(home)


@pytest.mark.parametrize(
    "path",
    [
        "README.md",
        "adapter_model.bin",
        "../../escape-{}.txt",
        "/tmp/escape-{}.txt",
        "",
        "adapter_config.json/..",
    ],
)
def test_chunks_for_undeclared_files(
    path: str, api: Api, server: RunningServer, root: Path, adapter_files: dict[str, bytes]
) -> None:
    home = server.state.settings.home
    path = path.format(uuid.uuid4().hex)
    outside, rows = files_outside(root, skip=[home]), registry_rows(home)
    messages = upload_requests("undeclared", adapter_files)
    messages.insert(2, pb.UploadAdapterRequest(chunk=pb.FileChunk(path=path, data=b"payload")))
    answer = _upload(api, messages)
    assert (answer.code, answer.field) == (INVALID, "chunk.path"), answer
    assert files_outside(root, skip=[home]) == outside
    assert not any(p.name.startswith("escape-") for p in Path("/tmp").iterdir())
    assert registry_rows(home) == rows
    assert_consistent(home)


def test_declared_files_must_be_the_allowed_ones(api: Api, adapter_files: dict[str, bytes]) -> None:
    for path in ("adapter_model.bin", "config.json", "adapters/../x", "", "README.md\0"):
        messages = upload_requests("odd-file", {**adapter_files, path: b"{}"})
        answer = _upload(api, messages)
        assert answer.code == INVALID and answer.field == "files[2].path", (path, answer)


EDGE_SAMPLING = {
    "temperature 1e-40 (overflows when dividing)": pb.SamplingParameters(temperature=1e-40, seed=1),
    "repetition_penalty 1e-38": pb.SamplingParameters(
        temperature=1.0, repetition_penalty=1e-38, seed=2
    ),
    "temperature 3e38": pb.SamplingParameters(temperature=3e38, seed=3),
    "top_p 1e-30": pb.SamplingParameters(temperature=1.0, top_p=1e-30, seed=4),
    "top_k 2**32-1": pb.SamplingParameters(temperature=1.0, top_k=2**32 - 1, seed=5),
    "repetition_penalty 3e38": pb.SamplingParameters(
        temperature=0.5, repetition_penalty=3e38, seed=6
    ),
}


def test_edge_sampling_values_fail_nobody(api: Api, server: RunningServer) -> None:
    """Sampling values at float32's edges are accepted and give tokens; above all they never
    fail the engine step, which would end every other tenant's request in the batch."""
    inference, _, _, keys = api
    request = generate_request("Alice writes a long letter", new_tokens=LONG)
    alone = token_ids(call(inference.Generate, request, keys["alice"]))
    stream = inference.GenerateStream(
        request, metadata=(("authorization", f"Bearer {keys['alice']}"),), timeout=120
    )
    first = next(stream)
    overlapped = 0
    for case, sampling in EDGE_SAMPLING.items():
        edge = pb.GenerateRequest(prompt="Mallory", max_new_tokens=4, sampling=sampling)
        answer = call(inference.Generate, edge, keys["mallory"])
        assert answer.code == OK, (case, answer)
        assert len(answer.response.token_ids) >= 1
        overlapped += server.state.engine.stats().running >= 1  # Alice's request still going
    rest = list(stream)
    assert overlapped >= 1, "the bystander finished before the edge requests ran"
    assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert [*first.token_ids, *(t for m in rest for t in m.token_ids)] == alone
