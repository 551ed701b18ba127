"""Issue 11, point 5 (the parts on adapters a tenant does not own and on quotas):

* LoadAdapter/UnloadAdapter of a public adapter: its owner or an admin, else
  PERMISSION_DENIED (anyone else could evict it for all its users, or pin memory);
* bytes being uploaded or pulled count against the tenant's byte quota, so uploads
  running at once cannot stage more than the quota;
* the Hub's answer for a commit is checked to be a 40-hex commit id before it is used.

A real server on the tiny Llama, a real test Hub, raw gRPC stubs.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from api_helpers import eventually
from hardening_helpers import (
    ADMIN_KEY,
    Answer,
    call,
    create_tenants,
    generate_request,
    read_folder,
    registry_rows,
    stubs,
    tiny_server,
    upload_requests,
)
from hub_server import HubServer, local_hub

from loramux.core.models import ResolvedModel
from loramux.server.app import RunningServer
from loramux.server.lora import base_linear_shapes
from loramux.server.synthetic import write_random_adapter
from loramux.v1 import loramux_pb2 as pb

OK = grpc.StatusCode.OK


@pytest.fixture(scope="module")
def hub() -> Iterator[HubServer]:
    with local_hub() as server:
        yield server


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("quotas") / "home"


@pytest.fixture(scope="module")
def server(home: Path, tiny_llama: ResolvedModel, hub: HubServer) -> Iterator[RunningServer]:
    running = tiny_server(home, tiny_llama, hub_endpoint=hub.endpoint)
    yield running
    running.close()


@pytest.fixture(scope="module")
def api(server: RunningServer) -> Iterator[tuple[Any, Any, Any, dict[str, str]]]:
    channel, inference, adapters, admin = stubs(f"127.0.0.1:{server.port}")
    keys = create_tenants(admin, ("alice", "mallory"))
    yield inference, adapters, admin, keys
    channel.close()


@pytest.fixture(scope="module")
def files(server: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    linears = base_linear_shapes(server.state.engine.model)
    folder = tmp_path_factory.mktemp("adapter") / "a"
    return read_folder(write_random_adapter(folder, linears, rank=4, seed=7, scale=0.5))


def test_public_adapter_loads_and_unloads_only_by_owner_or_admin(
    api: tuple[Any, Any, Any, dict[str, str]], files: dict[str, bytes]
) -> None:
    inference, adapters, admin, keys = api
    uploaded = call(adapters.UploadAdapter, iter(upload_requests("shared", files)), keys["alice"])
    assert uploaded.code == OK, uploaded.details
    published = call(
        admin.SetAdapterPublic,
        pb.SetAdapterPublicRequest(owner="alice", name="shared", public=True),
        ADMIN_KEY,
    )
    assert published.code == OK, published.details
    ref = pb.AdapterRef(name="alice/shared")

    for method in (adapters.LoadAdapter, adapters.UnloadAdapter):
        refused = call(method, ref, keys["mallory"])
        assert refused.code == grpc.StatusCode.PERMISSION_DENIED, refused.details
        assert refused.field == "name"
    # Using it is what public means: mallory's requests still run on it.
    used = call(inference.Generate, generate_request("hello", "alice/shared"), keys["mallory"])
    assert used.code == OK, used.details
    # Its owner and an admin decide where it lives.
    for key, name in ((keys["alice"], "shared"), (ADMIN_KEY, "alice/shared")):
        for method in (adapters.LoadAdapter, adapters.UnloadAdapter):
            answer = call(method, pb.AdapterRef(name=name), key)
            assert answer.code == OK, answer.details


def _held_upload(
    name: str, files: dict[str, bytes], release: threading.Event
) -> Iterator[pb.UploadAdapterRequest]:
    """An upload that stops after its header and first chunk until `release` is set."""
    messages = upload_requests(name, files)
    yield from messages[:2]
    release.wait(120)
    yield from messages[2:]


def test_uploads_and_pulls_in_progress_count_against_the_byte_quota(
    api: tuple[Any, Any, Any, dict[str, str]],
    server: RunningServer,
    files: dict[str, bytes],
    hub: HubServer,
) -> None:
    _, adapters, admin, _ = api
    size = sum(len(data) for data in files.values())
    quota = pb.TenantQuota(max_bytes=size + size // 2)  # one adapter fits, never two
    created = call(
        admin.CreateTenant, pb.CreateTenantRequest(name="bounded", quota=quota), ADMIN_KEY
    )
    assert created.code == OK, created.details
    key = call(admin.CreateKey, pb.CreateKeyRequest(tenant="bounded"), ADMIN_KEY).response.key
    hub.commit("acme/same-size", files)
    staging = server.state.registry.tmp_dir

    release = threading.Event()
    first: list[Answer] = []
    uploader = threading.Thread(
        target=lambda: first.append(
            call(adapters.UploadAdapter, _held_upload("first", files, release), key, timeout=120)
        )
    )
    uploader.start()
    try:
        # The first upload is under way: its first bytes are on disk, in staging.
        assert eventually(lambda: any(p.is_file() for p in staging.rglob("*")))
        second = call(adapters.UploadAdapter, iter(upload_requests("second", files)), key)
        assert second.code == grpc.StatusCode.RESOURCE_EXHAUSTED, second.details
        assert "being uploaded" in second.details
        pulled = call(
            adapters.PullAdapter,
            pb.PullAdapterRequest(name="pulled", repo_id="acme/same-size"),
            key,
        )
        assert pulled.code == grpc.StatusCode.RESOURCE_EXHAUSTED, pulled.details
    finally:
        release.set()
        uploader.join(120)
    assert first and first[0].code == OK, first
    assert [row[1] for row in registry_rows(server.state.registry.home) if row[0] == "bounded"] == [
        "first"
    ]
    # Refused and finished uploads hold nothing: with "first" deleted, a pull fits again.
    deleted = call(adapters.DeleteAdapter, pb.AdapterRef(name="first"), key)
    assert deleted.code == OK, deleted.details
    pulled = call(
        adapters.PullAdapter, pb.PullAdapterRequest(name="pulled", repo_id="acme/same-size"), key
    )
    assert pulled.code == OK, pulled.details


@pytest.mark.parametrize("reported", ["main", "v1.0", "../../etc", "a" * 39, "A" * 40, "g" * 40])
def test_hub_commit_id_is_checked_before_use(
    api: tuple[Any, Any, Any, dict[str, str]],
    server: RunningServer,
    files: dict[str, bytes],
    hub: HubServer,
    reported: str,
) -> None:
    _, adapters, _, keys = api
    if not hub.has_repo("acme/pinned"):
        hub.commit("acme/pinned", files)
    request = pb.PullAdapterRequest(name="pinned", repo_id="acme/pinned")
    hub.reported_sha = reported
    try:
        refused = call(adapters.PullAdapter, request, keys["alice"])
    finally:
        hub.reported_sha = None
    assert refused.code == grpc.StatusCode.FAILED_PRECONDITION, refused.details
    assert refused.field == "revision"
    assert not any(row[1] == "pinned" for row in registry_rows(server.state.registry.home))
    # The same pull with the Hub's true answer is pinned to the commit.
    pulled = call(adapters.PullAdapter, request, keys["alice"])
    assert pulled.code == OK, pulled.details
    assert pulled.response.revision == hub.head("acme/pinned")
    deleted = call(adapters.DeleteAdapter, pb.AdapterRef(name="pinned"), keys["alice"])
    assert deleted.code == OK, deleted.details


def test_a_hub_that_lists_no_sizes_still_pulls(
    api: tuple[Any, Any, Any, dict[str, str]],
    server: RunningServer,
    files: dict[str, bytes],
    hub: HubServer,
) -> None:
    """Hub mirrors (and proxies) that list files without sizes: the pull works, the files
    stored are the Hub's, byte for byte. It failed with RESOURCE_EXHAUSTED "the Hub listed
    0 bytes ... but sent N" before the quota was counted as the bytes arrive."""
    _, adapters, _, keys = api
    hub.commit("acme/sizeless", files)
    hub.lists_sizes = False
    try:
        pulled = call(
            adapters.PullAdapter,
            pb.PullAdapterRequest(name="sizeless", repo_id="acme/sizeless"),
            keys["alice"],
        )
    finally:
        hub.lists_sizes = True
    assert pulled.code == OK, pulled.details
    assert pulled.response.size_bytes == sum(len(data) for data in files.values())
    digest = next(r[2] for r in registry_rows(server.state.registry.home) if r[1] == "sizeless")
    assert read_folder(server.state.registry.files_dir / digest) == files
    deleted = call(adapters.DeleteAdapter, pb.AdapterRef(name="sizeless"), keys["alice"])
    assert deleted.code == OK, deleted.details


def test_a_hub_that_lists_no_sizes_meets_the_byte_quota_as_bytes_arrive(
    api: tuple[Any, Any, Any, dict[str, str]],
    server: RunningServer,
    files: dict[str, bytes],
    hub: HubServer,
) -> None:
    """Without listed sizes nothing can be reserved up front: the bytes are counted against
    the tenant's byte quota as they arrive, and the pull stops at the first byte over it."""
    _, adapters, admin, _ = api
    weights = len(files["adapter_model.safetensors"])
    quota = pb.TenantQuota(max_bytes=weights // 2)  # the weights file alone breaks it
    created = call(admin.CreateTenant, pb.CreateTenantRequest(name="small", quota=quota), ADMIN_KEY)
    assert created.code == OK, created.details
    key = call(admin.CreateKey, pb.CreateKeyRequest(tenant="small"), ADMIN_KEY).response.key
    if not hub.has_repo("acme/sizeless-big"):
        hub.commit("acme/sizeless-big", files)
    hub.lists_sizes = False
    try:
        refused = call(
            adapters.PullAdapter,
            pb.PullAdapterRequest(name="big", repo_id="acme/sizeless-big"),
            key,
        )
    finally:
        hub.lists_sizes = True
    assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.details
    assert "tenant quota" in refused.details
    assert not any(row[0] == "small" for row in registry_rows(server.state.registry.home))
    assert not any(p.is_file() for p in server.state.registry.tmp_dir.rglob("*"))
