"""Issue 14, point 4: the registry on SQLite and on a real PostgreSQL, as replicas use it.

Two `Registry` objects on one database and one folder are two replicas' registries (the
replica tests in test_fleet.py run real server processes). Checked: versioned migrations
on both backends, quotas held across replicas by the transaction that inserts, and a
folder shared by replicas that store, deduplicate and delete the same digest.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from api_helpers import free_port
from fleet_helpers import Postgres, find_postgres_bin

from loramux.core.config import load_settings
from loramux.core.errors import FailedPrecondition, ResourceExhausted, Unavailable
from loramux.server.db.migrations import LATEST, MIGRATIONS
from loramux.server.registry import Quota, Registry

QUOTA = Quota(max_concurrent=4, max_queued=4, max_adapters=100, max_bytes=10**9)
needs_postgres = pytest.mark.skipif(
    find_postgres_bin("initdb") is None, reason="PostgreSQL is not installed (make test does)"
)


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    if find_postgres_bin("initdb") is None:
        pytest.skip("PostgreSQL is not installed (make test installs it)")
    server = Postgres().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(postgres: Postgres) -> str:
    """A fresh database on the shared cluster for each test."""
    import uuid

    import psycopg

    name = f"t{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres.url, autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    return postgres.url.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest) -> str:
    if request.param == "sqlite":
        return "sqlite"
    return str(request.getfixturevalue("pg_url"))


def stage(registry: Registry, payload: bytes) -> Path:
    """A staging folder holding an adapter's two files (the registry does not parse them)."""
    folder = registry.staging_dir()
    (folder / "adapter_config.json").write_bytes(b'{"r": 4}')
    (folder / "adapter_model.safetensors").write_bytes(payload)
    return folder


def store(registry: Registry, owner: str, name: str, payload: bytes, quota: Quota | None = None):
    return registry.commit(
        owner,
        name,
        stage(registry, payload),
        source="upload",
        rank=4,
        alpha=8.0,
        use_rslora=False,
        target_modules=("q_proj",),
        quota=quota,
    )


def two_replicas(tmp_path: Path, database: str) -> tuple[list[Registry], Path, Path]:
    """Two replicas' registries: on SQLite one data dir; on PostgreSQL a data dir each and
    one shared --adapter-dir. Also the adapter folder and the staging folder they share."""
    if database == "sqlite":
        replicas = [Registry(tmp_path, QUOTA, database) for _ in range(2)]
        return replicas, tmp_path / "adapters", tmp_path / "tmp"
    shared = tmp_path / "shared"
    replicas = [Registry(tmp_path / f"home{i}", QUOTA, database, shared) for i in range(2)]
    return replicas, shared, shared / ".staging"


def staged_marker(staging: Path) -> list[str]:
    """The staging folder's name when it lives inside the adapter folder."""
    return [staging.name] if staging.name.startswith(".") else []


def applied(registry: Registry) -> list[int]:
    return [
        int(r["version"])
        for r in registry._rows("SELECT version FROM schema_migrations ORDER BY version", ())
    ]


def test_migrations_apply_once_on_both_backends(tmp_path: Path, database: str) -> None:
    first = Registry(tmp_path, QUOTA, database)
    try:
        assert applied(first) == [m.version for m in MIGRATIONS]
        assert first.version() == 0  # nothing changed yet
        first.ensure_tenant("alice")
        store(first, "alice", "one", b"x" * 10)
    finally:
        first.close()
    again = Registry(tmp_path, QUOTA, database)  # a restart: nothing to migrate, data kept
    try:
        assert applied(again) == [m.version for m in MIGRATIONS]
        assert [r.name for r in again.all_adapters()] == ["one"]
        assert again.version() == 2  # the tenant and the adapter
    finally:
        again.close()


def test_two_replicas_starting_together_migrate_once(tmp_path: Path, pg_url: str) -> None:
    barrier = threading.Barrier(4)

    def start(i: int) -> Registry:
        barrier.wait()
        return Registry(tmp_path / f"r{i}", QUOTA, pg_url)

    with ThreadPoolExecutor(4) as pool:
        registries = list(pool.map(start, range(4)))
    try:
        assert applied(registries[0]) == [m.version for m in MIGRATIONS]
    finally:
        for registry in registries:
            registry.close()


def test_a_data_dir_from_before_migrations_is_adopted(tmp_path: Path) -> None:
    """The schema LoRAMux created before migrations existed: tables kept, rows kept."""
    db = sqlite3.connect(tmp_path / "registry.sqlite3")
    for statement in MIGRATIONS[0].statements:
        db.execute(statement)
    db.execute("INSERT INTO tenants VALUES ('old', 0, 1, 1, 5, 1000, 0)")
    db.commit()
    db.close()
    registry = Registry(tmp_path, QUOTA)
    try:
        assert applied(registry) == [m.version for m in MIGRATIONS]
        assert registry.tenant("old").quota.max_adapters == 5
    finally:
        registry.close()


def test_a_newer_schema_is_refused(tmp_path: Path, database: str) -> None:
    Registry(tmp_path, QUOTA, database).close()
    registry = Registry(tmp_path, QUOTA, database)
    with registry._db.transaction(bump=False) as tx:
        tx.execute(
            "INSERT INTO schema_migrations (version, description, applied_at) VALUES (?, ?, ?)",
            (LATEST + 1, "from the future", 0),
        )
    registry.close()
    with pytest.raises(FailedPrecondition) as error:
        Registry(tmp_path, QUOTA, database)
    assert error.value.field == "registry"
    assert f"version {LATEST + 1}" in str(error.value)


def race(count: int, work: Callable[[int], object]) -> list[object]:
    """Run `work(i)` for every i at once (a barrier lines the threads up); results or errors."""
    barrier = threading.Barrier(count)

    def run(i: int) -> object:
        barrier.wait()
        try:
            return work(i)
        except Exception as exc:
            return exc

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(run, range(count)))


@needs_postgres
def test_quota_holds_across_replicas(tmp_path: Path, pg_url: str) -> None:
    """Eight uploads at once through two replicas; a quota of three adapters admits three."""
    replicas, folders, _ = two_replicas(tmp_path, pg_url)
    try:
        replicas[0].ensure_tenant("bob")
        quota = Quota(max_concurrent=1, max_queued=1, max_adapters=3, max_bytes=10**9)
        outcomes = race(
            8, lambda i: store(replicas[i % 2], "bob", f"a{i}", bytes([i]) * 100, quota)
        )
        refused = [o for o in outcomes if isinstance(o, ResourceExhausted)]
        assert len(refused) == 5, outcomes
        assert len(replicas[1].all_adapters()) == 3
        stored = {r.digest for r in replicas[0].all_adapters()}
        assert {p.name for p in folders.iterdir()} - {".staging"} == stored  # refused: no files
    finally:
        for registry in replicas:
            registry.close()


def test_one_folder_for_a_digest_two_replicas_store(tmp_path: Path, database: str) -> None:
    """Replicas store the same files at once, then delete them while others store them again:
    one folder per digest, and it exists exactly while a row names it."""
    replicas, folders, staging = two_replicas(tmp_path, database)
    try:
        replicas[0].ensure_tenant("carol")
        payload = b"same bytes" * 1000
        outcomes = race(6, lambda i: store(replicas[i % 2], "carol", f"n{i}", payload))
        assert not [o for o in outcomes if isinstance(o, Exception)], outcomes
        digests = {r.digest for r in replicas[1].all_adapters()}
        assert len(digests) == 1
        assert sorted(p.name for p in folders.iterdir()) == sorted(
            [*digests, *staged_marker(staging)]
        )

        def churn(i: int) -> object:
            registry = replicas[i % 2]
            if i < 6:
                registry.delete(registry.find("carol", f"n{i}"))
                return None
            return store(registry, "carol", f"m{i}", payload)

        outcomes = race(10, churn)
        assert not [o for o in outcomes if isinstance(o, Exception)], outcomes
        rows = replicas[0].all_adapters()
        assert sorted(r.name for r in rows) == [f"m{i}" for i in range(6, 10)]
        assert sorted(p.name for p in folders.iterdir()) == sorted(
            [*digests, *staged_marker(staging)]
        )
        for record in rows:
            replicas[1].delete(record)
        assert [p.name for p in folders.iterdir()] == staged_marker(staging)
        assert not any(staging.iterdir())
    finally:
        for registry in replicas:
            registry.close()


def test_a_replica_starting_leaves_others_uploads_alone(tmp_path: Path, database: str) -> None:
    """Start-up sweeps leftovers of dead uploads, not the staging folder of a live replica."""
    (running, second), folders, staging = two_replicas(tmp_path, database)
    second.close()
    try:
        running.ensure_tenant("dave")
        staged = stage(running, b"half an upload")
        host = staged.name.split("~")[0]
        # As if another live process on this host (our parent) were writing it.
        in_progress = staged.rename(staged.with_name(f"{host}~{os.getppid()}-upload"))
        dead = staging / "0123abcd"  # from before staging folders named their writer
        dead.mkdir()
        crashed = staging / f"{host}~999999999-ab"  # no such process
        crashed.mkdir()
        elsewhere = staging / "other-host~1-cd"  # another host's: young, kept
        elsewhere.mkdir()
        unreferenced = folders / ("ab" * 32)  # a digest no row names: removed
        unreferenced.mkdir()
        not_ours = folders / "lost+found"  # a volume's own: not a digest, kept
        not_ours.mkdir()
        for started in two_replicas(tmp_path, database)[0]:  # replicas start (again)
            started.close()
        assert in_progress.is_dir() and elsewhere.is_dir() and not_ours.is_dir()
        assert not dead.exists() and not crashed.exists() and not unreferenced.exists()
        record = running.commit(
            "dave", "late", in_progress, source="upload", rank=4, alpha=8.0,
            use_rslora=False, target_modules=("q_proj",),
        )  # fmt: skip
        assert (folders / record.digest / "adapter_model.safetensors").is_file()
        elsewhere.rmdir()
        not_ours.rmdir()
    finally:
        running.close()


def test_propagation_benchmark_accounts_for_every_change() -> None:
    from bench.propagation import measure

    result = measure("sqlite", changes=3, poll_seconds=0.05)
    assert result["changes"] == 3 and result["backend"] == "sqlite"
    assert 0 < float(result["median_s"]) <= float(result["max_s"])  # type: ignore[arg-type]


def test_registry_setting_is_checked() -> None:
    with pytest.raises(ValueError, match="--registry must be sqlite or a postgresql:// URL"):
        load_settings(environ={"LORAMUX_REGISTRY": "mysql://db/loramux"})
    assert load_settings(environ={"LORAMUX_REGISTRY": "postgresql://u@h/d"}).registry


@needs_postgres
def test_an_unreachable_database_is_unavailable_and_recovers(tmp_path: Path) -> None:
    """Down at start: refused, naming the setting; down later: UNAVAILABLE for each call
    (never INTERNAL), and the same registry serves again once the database is back."""
    with pytest.raises(Unavailable) as error:
        Registry(tmp_path / "x", QUOTA, f"postgresql://loramux@127.0.0.1:{free_port()}/none")
    assert error.value.field == "registry"
    server = Postgres().start()
    try:
        registry = Registry(tmp_path, QUOTA, server.url)
        try:
            registry.ensure_tenant("erin")
            server.halt()
            with pytest.raises(Unavailable):
                registry.tenant("erin")
            with pytest.raises(Unavailable):
                registry.create_key("erin")
            server.run_server()
            assert registry.tenant("erin").name == "erin"
            assert registry.create_key("erin")[1].startswith("lmx_")
        finally:
            registry.close()
    finally:
        server.stop()
