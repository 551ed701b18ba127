"""Issue 4 (and the crash cases of issue 7): the registry, the contract, draining and
interrupted uploads, on real SQLite, real files and a real gRPC server with the tiny Llama.

These stay fast: the tiny random Llama stands in for the base model, since what is checked
here is the API's bookkeeping, not what the model says.
"""

from __future__ import annotations

import hashlib
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from api_helpers import ServerProcess, eventually, health_status, linear_shapes
from grpc_health.v1 import health_pb2

from loramux.client import AlreadyExists, LoramuxClient, NotFound, Unavailable
from loramux.client.client import upload_messages
from loramux.core import protogen
from loramux.core.config import Settings
from loramux.core.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from loramux.core.models import ResolvedModel
from loramux.server.app import RunningServer, start_server
from loramux.server.registry import Quota, Registry
from loramux.server.synthetic import write_random_adapter
from loramux.v1 import loramux_pb2 as pb

QUOTA = Quota(max_concurrent=4, max_queued=4, max_adapters=10, max_bytes=10**9)


# -- the contract ----------------------------------------------------------------------------


def test_generated_code_is_current() -> None:
    """`make proto --check` passes on the checked-in tree (it fails when proto/ changed)."""
    result = subprocess.run(
        [sys.executable, "-m", "loramux.core.protogen", "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert pb.DESCRIPTOR.package == "loramux.v1"


def _copy_of_generated_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    copy = tmp_path / "core"
    shutil.copytree(protogen.OUT_ROOT / protogen.PACKAGE_DIR, copy / protogen.PACKAGE_DIR)
    monkeypatch.setattr(protogen, "OUT_ROOT", copy)
    return copy / protogen.PACKAGE_DIR


def test_stale_generated_code_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A change of the API (here a message renamed inside the descriptor) and a leftover
    file are reported with the locked grpcio-tools and with any other."""
    generated = _copy_of_generated_code(tmp_path, monkeypatch)
    edited = generated / "loramux_pb2.py"
    text = edited.read_text()
    start = text.index("AddSerializedFile(b'")
    edited.write_text(text[:start] + text[start:].replace("Adapter", "Adaptor", 1))
    (generated / "leftover_pb2.py").write_text("")
    for locked in (protogen.installed_tools_version(), "0.0.1"):
        monkeypatch.setattr(protogen, "locked_tools_version", lambda locked=locked: locked)
        assert protogen.stale_files() == [
            "loramux/v1/leftover_pb2.py",
            "loramux/v1/loramux_pb2.py",
        ]


def test_the_locked_grpcio_tools_compares_text_another_compares_the_api(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An edit that leaves the API alone (a comment) is stale under the locked grpcio-tools;
    under another version only the descriptors are compared, since its own version lines
    differ anyway (`make test-latest`)."""
    generated = _copy_of_generated_code(tmp_path, monkeypatch)
    edited = generated / "loramux_pb2_grpc.py"
    edited.write_text(edited.read_text() + "\n# edited by hand\n")
    monkeypatch.setattr(protogen, "locked_tools_version", protogen.installed_tools_version)
    assert protogen.stale_files() == ["loramux/v1/loramux_pb2_grpc.py"]
    monkeypatch.setattr(protogen, "locked_tools_version", lambda: "0.0.1")
    assert protogen.stale_files() == []


# -- the registry on its own -----------------------------------------------------------------


def _stage(registry: Registry, weights: bytes) -> Path:
    staged = registry.staging_dir()
    (staged / "adapter_config.json").write_text('{"r": 4}')
    (staged / "adapter_model.safetensors").write_bytes(weights)
    return staged


def _commit(registry: Registry, owner: str, name: str, weights: bytes, **extra: object) -> object:
    return registry.commit(
        owner,
        name,
        _stage(registry, weights),
        source="upload",
        rank=4,
        alpha=8.0,
        use_rslora=False,
        target_modules=("q_proj",),
        **extra,  # type: ignore[arg-type]
    )


def test_restart_keeps_complete_adapters_and_sweeps_partials(tmp_path: Path) -> None:
    registry = Registry(tmp_path, QUOTA)
    registry.ensure_tenant("acme")
    kept = _commit(registry, "acme", "kept", b"weights one")
    lost = _commit(registry, "acme", "lost", b"weights two")
    # What crashes leave behind: an upload still in its staging folder, a folder renamed
    # into place whose row was never inserted, and a row whose files were lost.
    partial = registry.staging_dir()
    (partial / "adapter_model.safetensors").write_bytes(b"half of it")
    orphan = registry.files_dir / ("f" * 64)
    orphan.mkdir()
    (orphan / "adapter_model.safetensors").write_bytes(b"never committed")
    shutil.rmtree(registry.path_of(lost))  # type: ignore[arg-type]
    registry.close()

    reopened = Registry(tmp_path, QUOTA)
    try:
        assert [r.name for r in reopened.all_adapters()] == ["kept"]
        assert not any(reopened.tmp_dir.iterdir())
        assert not orphan.exists()
        weights = reopened.path_of(kept) / "adapter_model.safetensors"  # type: ignore[arg-type]
        assert hashlib.sha256(weights.read_bytes()).hexdigest() == kept.sha256  # type: ignore[attr-defined]
    finally:
        reopened.close()


def test_identical_files_are_stored_once_and_freed_with_the_last_row(tmp_path: Path) -> None:
    registry = Registry(tmp_path, QUOTA)
    try:
        for tenant in ("acme", "globex"):
            registry.ensure_tenant(tenant)
        first = _commit(registry, "acme", "same", b"shared bytes")
        second = _commit(registry, "globex", "same", b"shared bytes")
        assert first.digest == second.digest  # type: ignore[attr-defined]
        assert first.engine_id != second.engine_id  # type: ignore[attr-defined]
        folder = registry.path_of(first)  # type: ignore[arg-type]
        registry.delete(first)  # type: ignore[arg-type]
        assert folder.is_dir()
        registry.delete(second)  # type: ignore[arg-type]
        assert not folder.exists()
        _commit(registry, "acme", "dup", b"x")
        with pytest.raises(AlreadyExists):
            _commit(registry, "acme", "dup", b"y")  # its files must not stay behind
        assert [p.name for p in registry.files_dir.iterdir()] == [
            registry.find("acme", "dup").digest
        ]
    finally:
        registry.close()


def test_quota_is_checked_in_the_publishing_transaction(tmp_path: Path) -> None:
    """Eight uploads race for a one-adapter quota: exactly one is published.

    The uploads start together (a barrier) and each hashes and fsyncs its files before
    publishing, so a quota checked anywhere before the inserting transaction lets several
    through; the byte quota is raced the same way.
    """
    registry = Registry(tmp_path, QUOTA)
    try:
        registry.ensure_tenant("acme")
        registry.ensure_tenant("globex")
        one = Quota(max_concurrent=1, max_queued=1, max_adapters=1, max_bytes=10**6)
        bytes_only = Quota(max_concurrent=1, max_queued=1, max_adapters=50, max_bytes=250)
        racers = 8

        def race(owner: str, quota: Quota) -> list[BaseException | None]:
            weights = [f"{owner} weights {i} ".encode() * 10 for i in range(racers)]
            staged = [_stage(registry, w) for w in weights]
            barrier = threading.Barrier(racers)
            outcomes: list[BaseException | None] = [None] * racers

            def publish(i: int) -> None:
                barrier.wait()
                try:
                    registry.commit(
                        owner, f"racer{i}", staged[i], source="upload", rank=4, alpha=8.0,
                        use_rslora=False, target_modules=("q_proj",), quota=quota,
                    )  # fmt: skip
                except BaseException as exc:  # collected and checked below
                    outcomes[i] = exc

            threads = [threading.Thread(target=publish, args=(i,)) for i in range(racers)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            return outcomes

        outcomes = race("acme", one)
        assert sum(o is None for o in outcomes) == 1
        assert all(isinstance(o, ResourceExhausted) for o in outcomes if o is not None)
        # 8 uploads of ~160-170 bytes against 250 bytes: one fits, never two together.
        outcomes = race("globex", bytes_only)
        assert sum(o is None for o in outcomes) == 1
        assert all(isinstance(o, ResourceExhausted) for o in outcomes if o is not None)
        owners = sorted(r.owner for r in registry.all_adapters())
        assert owners == ["acme", "globex"]
        assert len(list(registry.files_dir.iterdir())) == 2  # refused uploads left no files
        assert not any(registry.tmp_dir.iterdir())
    finally:
        registry.close()


def test_keys_are_stored_only_hashed_and_names_are_checked(tmp_path: Path) -> None:
    registry = Registry(tmp_path, QUOTA)
    registry.ensure_tenant("acme")
    key_id, key = registry.create_key("acme")
    assert registry.tenant_for_key(key).name == "acme"  # type: ignore[union-attr]
    assert registry.tenant_for_key(key + "x") is None
    registry.revoke_key(key_id)
    assert registry.tenant_for_key(key) is None
    for bad in ("../escape", "/abs", "a\0b", ".hidden", "", "x" * 65, "a/b"):
        with pytest.raises(InvalidArgument):
            registry.ensure_tenant(bad)
    with pytest.raises(NotFound):
        registry.find("acme", "acme/../../etc")
    registry.close()
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("registry.sqlite3*"))
    assert key.encode() not in stored
    assert hashlib.sha256(key.encode()).hexdigest().encode() in stored


# -- a real server on the tiny Llama ---------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_adapter(tiny_llama: ResolvedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-adapter") / "adapter"
    return write_random_adapter(
        folder, linear_shapes(tiny_llama.path), rank=4, alpha=8, seed=3, scale=0.2
    )


def _tiny_server(tiny: ResolvedModel, home: Path) -> RunningServer:
    settings = Settings(
        home=home,
        base_model=str(tiny.path),
        device="cpu",
        port=0,
        metrics_port=0,
        lora_kernel="eager",
        grpc_workers=8,
        dev=True,
    )
    return start_server(settings)


@pytest.fixture
def tiny_server(tiny_llama: ResolvedModel, home: Path) -> Iterator[RunningServer]:
    running = _tiny_server(tiny_llama, home)
    yield running
    running.close()


def _held_upload(folder: Path, name: str, release: threading.Event) -> Iterator[object]:
    """Upload messages that stop after the first chunk until `release` is set."""
    messages = list(upload_messages(folder, name))
    yield from messages[:2]
    release.wait(120)
    yield from messages[2:]


def test_drain_lets_running_calls_finish_and_refuses_new_ones(
    tiny_server: RunningServer, tiny_adapter: Path
) -> None:
    address = f"127.0.0.1:{tiny_server.port}"
    release = threading.Event()
    outcome: dict[str, object] = {}
    with LoramuxClient(address, retries=0) as client:

        def upload() -> None:
            try:
                messages = _held_upload(tiny_adapter, "during-drain", release)
                outcome["info"] = client.adapters.UploadAdapter(messages, timeout=120)
            except grpc.RpcError as error:
                outcome["error"] = error

        uploader = threading.Thread(target=upload)
        uploader.start()
        assert eventually(lambda: tiny_server.state.inflight == 1)
        drainer = threading.Thread(target=tiny_server.drain, args=(120.0,))
        drainer.start()
        try:
            assert tiny_server.drain_started.wait(60)
            assert health_status(address) == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(Unavailable):
                client.list_adapters()
            assert drainer.is_alive()  # still waiting for the upload
        finally:
            release.set()
            uploader.join(120)
            drainer.join(120)
    assert "error" not in outcome, outcome
    assert outcome["info"].name == "during-drain"  # type: ignore[attr-defined]
    with pytest.raises(grpc.RpcError):
        health_status(address)
    registry = Registry(tiny_server.state.settings.home, QUOTA)
    try:
        assert [r.name for r in registry.all_adapters()] == ["during-drain"]
    finally:
        registry.close()


def test_cancelled_upload_leaves_nothing(tiny_server: RunningServer, tiny_adapter: Path) -> None:
    address = f"127.0.0.1:{tiny_server.port}"
    home = tiny_server.state.settings.home
    release = threading.Event()
    with LoramuxClient(address) as client:
        future = client.adapters.UploadAdapter.future(
            _held_upload(tiny_adapter, "abandoned", release), timeout=120
        )
        staged = home / "tmp"
        assert eventually(lambda: any(staged.glob("*/adapter_config.json")))
        future.cancel()
        assert eventually(lambda: tiny_server.state.inflight == 0)
        release.set()
        assert not any(staged.iterdir())
        assert not any((home / "adapters").iterdir())
        with pytest.raises(NotFound):
            client.get_adapter("abandoned")
        stored = client.upload_adapter(tiny_adapter, "abandoned")  # the name is free
        assert stored.rank == 4
        reply = client.generate("Hello", adapter="abandoned", max_new_tokens=3, ignore_eos=True)
        assert reply.completion_tokens == 3


def test_sigkill_during_upload_leaves_no_partial_adapter(
    tiny_llama: ResolvedModel, home: Path, tiny_adapter: Path
) -> None:
    args = (
        "--dev",
        "--base-model",
        str(tiny_llama.path),
        "--device",
        "cpu",
        "--lora-kernel",
        "eager",
    )
    server = ServerProcess(home, *args).start()
    release = threading.Event()
    try:
        with LoramuxClient(server.address, retries=0) as client:
            client.upload_adapter(tiny_adapter, "complete")
            future = client.adapters.UploadAdapter.future(
                _held_upload(tiny_adapter, "interrupted", release), timeout=120
            )
            assert eventually(lambda: any((home / "tmp").glob("*/adapter_config.json")))
            server.signal(signal.SIGKILL)
            assert server.wait() == -signal.SIGKILL
            release.set()
            with pytest.raises(grpc.RpcError):
                future.result(60)
        assert any((home / "tmp").iterdir())  # the interrupted upload's leftovers
        server.start()
        assert not any((home / "tmp").iterdir())  # swept at start
        with LoramuxClient(server.address) as client:
            assert [a.name for a in client.list_adapters()] == ["complete"]
            reply = client.generate("Hi", adapter="complete", max_new_tokens=2, ignore_eos=True)
            assert reply.completion_tokens == 2
            assert client.upload_adapter(tiny_adapter, "interrupted").name == "interrupted"
    finally:
        release.set()
        server.stop()


def test_taken_ports_are_reported_before_the_model_loads(
    tiny_server: RunningServer, tmp_path: Path
) -> None:
    # A base model that cannot resolve proves the ports are checked first.
    unresolvable = dict(
        home=tmp_path, base_model=str(tmp_path / "no-model"), device="cpu", dev=True
    )
    with pytest.raises(FailedPrecondition) as grpc_port:
        start_server(Settings(port=tiny_server.port, metrics_port=0, **unresolvable))
    assert grpc_port.value.field == "port"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        with pytest.raises(FailedPrecondition) as metrics_port:
            start_server(Settings(port=0, metrics_port=busy, **unresolvable))
    assert metrics_port.value.field == "metrics_port"
    with LoramuxClient(f"127.0.0.1:{tiny_server.port}") as client:  # the first server still serves
        assert client.model_info().base_model == str(tiny_server.state.engine.info.base_model)
