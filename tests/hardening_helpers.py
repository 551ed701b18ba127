"""Shared pieces of the hardening tests (issue 7): a fast server, raw gRPC calls, disk checks.

The hardening tests talk to the server the way an attacker or a broken client would: raw
protobuf messages through the generated stubs (so nothing in the Python client can tidy a
bad request up), then look at the data dir itself to prove what was, and was not, written.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from loramux.core.config import Settings
from loramux.core.models import ResolvedModel
from loramux.server.app import RunningServer, start_server
from loramux.server.registry import REQUIRED_FILES
from loramux.v1 import loramux_pb2 as pb
from loramux.v1 import loramux_pb2_grpc as pb_grpc

ADMIN_KEY = "hardening-admin-key"
FIELD_METADATA = "loramux-error-field"


def tiny_server(home: Path, tiny: ResolvedModel, **overrides: Any) -> RunningServer:
    """An in-process server on 127.0.0.1 over the tiny random Llama (starts in seconds)."""
    home.mkdir(parents=True, exist_ok=True)
    settings: dict[str, Any] = {
        "port": 0,
        "metrics_port": 0,
        "admin_keys": [ADMIN_KEY],
        "lora_kernel": "eager",
        "max_new_tokens_limit": 64,
    }
    settings.update(overrides)
    return start_server(Settings(home=home, base_model=str(tiny.path), **settings))


@dataclass(frozen=True)
class Answer:
    """How a call ended: a status code, its details and the field the server named."""

    code: grpc.StatusCode
    details: str = ""
    field: str | None = None
    response: Any = None


def call(method: Callable[..., Any], request: Any, key: str | None, timeout: float = 30) -> Answer:
    """Run one unary (or client-streaming) call; never raises for a status."""
    metadata = (("authorization", f"Bearer {key}"),) if key else ()
    try:
        response = method(request, metadata=metadata, timeout=timeout)
    except grpc.RpcError as error:
        field = dict(error.trailing_metadata() or ()).get(FIELD_METADATA)
        return Answer(error.code(), error.details() or "", field)
    return Answer(grpc.StatusCode.OK, response=response)


def stream_call(
    method: Callable[..., Any], request: Any, key: str | None, timeout: float = 30
) -> Answer:
    """Run a server-streaming call to its end; the answer carries every message received."""
    metadata = (("authorization", f"Bearer {key}"),) if key else ()
    messages: list[Any] = []
    try:
        for message in method(request, metadata=metadata, timeout=timeout):
            messages.append(message)
    except grpc.RpcError as error:
        field = dict(error.trailing_metadata() or ()).get(FIELD_METADATA)
        return Answer(error.code(), error.details() or "", field, messages)
    return Answer(grpc.StatusCode.OK, response=messages)


def stubs(address: str) -> tuple[grpc.Channel, Any, Any, Any]:
    """(channel, inference, adapters, admin) stubs on one channel."""
    channel = grpc.insecure_channel(
        address,
        options=[
            ("grpc.max_receive_message_length", 16 << 20),
            ("grpc.max_send_message_length", 16 << 20),
        ],
    )
    return (
        channel,
        pb_grpc.InferenceServiceStub(channel),
        pb_grpc.AdapterServiceStub(channel),
        pb_grpc.AdminServiceStub(channel),
    )


def create_tenants(admin: Any, names: Iterable[str]) -> dict[str, str]:
    """Create each tenant with one API key (as the admin); tenant -> key."""
    keys = {}
    for tenant in names:
        call(admin.CreateTenant, pb.CreateTenantRequest(name=tenant), ADMIN_KEY)
        keys[tenant] = call(
            admin.CreateKey, pb.CreateKeyRequest(tenant=tenant), ADMIN_KEY
        ).response.key
    return keys


def entry(path: str, data: bytes) -> pb.FileEntry:
    return pb.FileEntry(path=path, size=len(data), sha256=hashlib.sha256(data).hexdigest())


def upload_requests(
    name: str, files: dict[str, bytes], *, chunk: int = 1 << 16
) -> list[pb.UploadAdapterRequest]:
    """A well-formed upload of `files` (path -> bytes): header with sizes and sha256, chunks."""
    messages = [
        pb.UploadAdapterRequest(
            header=pb.UploadHeader(name=name, files=[entry(p, d) for p, d in files.items()])
        )
    ]
    for path, data in files.items():
        for start in range(0, len(data), chunk):
            piece = pb.FileChunk(path=path, data=data[start : start + chunk])
            messages.append(pb.UploadAdapterRequest(chunk=piece))
    return messages


def read_folder(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def registry_rows(home: Path) -> list[tuple[str, str, str]]:
    """(owner, name, digest) of every stored version, read straight from the SQLite file."""
    db = sqlite3.connect(f"file:{home / 'registry.sqlite3'}?mode=ro", uri=True)
    try:
        return sorted(db.execute("SELECT owner, name, digest FROM adapter_versions").fetchall())
    finally:
        db.close()


def disk_state(home: Path) -> tuple[list[str], list[str]]:
    """(adapter folders, leftovers in tmp) under a data dir."""
    folders = sorted(p.name for p in (home / "adapters").iterdir())
    leftovers = sorted(str(p.relative_to(home)) for p in (home / "tmp").rglob("*"))
    return folders, leftovers


def assert_consistent(home: Path) -> None:
    """Every row has its complete folder, every folder has a row, nothing is left in tmp."""
    rows = registry_rows(home)
    folders, leftovers = disk_state(home)
    assert leftovers == [], leftovers
    assert sorted({digest for _, _, digest in rows}) == folders
    for _, _, digest in rows:
        for name in REQUIRED_FILES:
            assert (home / "adapters" / digest / name).is_file(), (digest, name)


def files_outside(root: Path, skip: Sequence[Path] = ()) -> set[str]:
    """Every path under `root` except those inside `skip` (to prove nothing was written there)."""
    skipped = [s.resolve() for s in skip]
    found = set()
    for path in root.rglob("*"):
        resolved = path.resolve()
        if any(resolved == s or s in resolved.parents for s in skipped):
            continue
        found.add(str(path.relative_to(root)))
    return found


def generate_request(prompt: str, adapter: str = "", new_tokens: int = 6) -> pb.GenerateRequest:
    """A greedy request of exactly `new_tokens` tokens (EOS ignored): comparable run to run."""
    return pb.GenerateRequest(
        adapter=adapter, prompt=prompt, max_new_tokens=new_tokens, ignore_eos=True
    )


def token_ids(answer: Answer) -> list[int]:
    assert answer.code == grpc.StatusCode.OK, (answer.code, answer.details)
    return list(answer.response.token_ids)


def codes(answers: Iterable[Answer]) -> list[str]:
    return [a.code.name for a in answers]
