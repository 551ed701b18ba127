"""Issue 28: adapter versions, aliases and weighted rollouts, paging, in-place upgrade.

The registry on SQLite and on a real PostgreSQL (the fixtures of test_registry_backends),
real files in a real data dir. The server-level targets are in test_versions_server.py.
"""

from __future__ import annotations

import math
import sqlite3
import time
from collections import Counter
from pathlib import Path

import pytest
from test_registry_backends import QUOTA, database, pg_url, postgres  # noqa: F401 (fixtures)

from loramux.core.errors import FailedPrecondition, InvalidArgument, NotFound
from loramux.server.db.migrations import MIGRATIONS
from loramux.server.listing import AdapterQuery
from loramux.server.registry import AdapterRecord, Registry
from loramux.server.versions import Split


def store(registry: Registry, owner: str, name: str, payload: bytes) -> AdapterRecord:
    staged = registry.staging_dir()
    (staged / "adapter_config.json").write_text('{"r": 4}')
    (staged / "adapter_model.safetensors").write_bytes(payload)
    return registry.commit(
        owner, name, staged, source="upload", rank=4, alpha=8.0, use_rslora=False,
        target_modules=("q_proj",), quota=QUOTA,
    )  # fmt: skip


@pytest.fixture
def registry(tmp_path: Path, database: str) -> Registry:  # noqa: F811
    opened = Registry(tmp_path, QUOTA, database)
    for tenant in ("acme", "globex"):
        opened.ensure_tenant(tenant)
    yield opened  # type: ignore[misc]
    opened.close()


def binomial_bounds(n: int, p: float, sigmas: float = 5.0) -> tuple[float, float]:
    """n*p -/+ 5 standard deviations: a correct split falls outside with p < 1e-6."""
    sd = math.sqrt(n * p * (1 - p))
    return n * p - sigmas * sd, n * p + sigmas * sd


def test_storing_again_adds_versions_and_stores_identical_files_once(registry: Registry) -> None:
    first = store(registry, "acme", "x", b"weights a")
    second = store(registry, "acme", "x", b"weights b")
    third = store(registry, "acme", "x", b"weights a")
    assert [first.version, second.version, third.version] == [1, 2, 3]
    assert third.digest == first.digest != second.digest
    assert sorted(p.name for p in registry.files_dir.iterdir()) == sorted(
        {first.digest, second.digest}
    )
    # The quota counts a tenant's bytes once per digest: v3 costs nothing more.
    assert registry.usage("acme") == (3, first.size_bytes + second.size_bytes)
    assert registry.find("acme", "x").version == 1  # the default alias stays on v1
    assert registry.find("acme", "x@v2").version == 2
    assert registry.find("acme", "x@latest").version == 3
    assert registry.find("globex", "acme/x@v2", admin=True).version == 2
    for ref, named in (("x@v9", "v9"), ("x@prod", "'prod'")):
        with pytest.raises(NotFound) as info:
            registry.find("acme", ref)
        assert named in info.value.message
    # Another tenant's private adapter: NOT_FOUND by every form of reference.
    for ref in ("acme/x", "acme/x@v1", "acme/x@default", "acme/x@latest"):
        with pytest.raises(NotFound):
            registry.find("globex", ref)


def test_a_weighted_alias_splits_within_binomial_bounds_and_a_key_sticks(
    registry: Registry,
) -> None:
    for payload in (b"one", b"two"):
        store(registry, "acme", "x", payload)
    registry.set_alias("acme", "x", "prod", Split.parse([("v1", 90), ("v2", 10)]))
    picks = Counter(registry.find("acme", "x@prod").version for _ in range(2000))
    low, high = binomial_bounds(2000, 0.10)
    assert low <= picks[2] <= high, picks
    assert picks[1] + picks[2] == 2000
    # With a key: every request of one key on one version; the keys split 90/10 too.
    by_key = {
        key: {registry.find("acme", "x@prod", key=key).version for _ in range(3)}
        for key in (f"conversation-{i}" for i in range(2000))
    }
    assert all(len(versions) == 1 for versions in by_key.values())
    keyed = Counter(next(iter(v)) for v in by_key.values())
    assert low <= keyed[2] <= high, keyed


def test_alias_moves_are_checked_atomic_and_roll_back_in_one_call(registry: Registry) -> None:
    for payload in (b"one", b"two", b"three"):
        store(registry, "acme", "x", payload)
    registry.set_alias("acme", "x", "prod", Split.of(1))
    before = registry.aliases("acme", "x")
    bad: list[tuple[list[tuple[str, int]], type[Exception], str]] = [
        ([("v1", 90), ("v2", 9)], InvalidArgument, "targets"),
        ([("v1", 90), ("v9", 10)], NotFound, "targets[1].version"),
        ([("prod", 100)], InvalidArgument, "targets[0].version"),  # no chains, no cycles
        ([("v1", 50), ("v1", 50)], InvalidArgument, "targets[1].version"),
        ([], InvalidArgument, "targets"),
    ]
    for targets, error, field in bad:
        with pytest.raises(error) as info:
            registry.set_alias("acme", "x", "prod", Split.parse(targets))
        assert info.value.field == field, targets  # type: ignore[attr-defined]
        assert registry.aliases("acme", "x") == before  # nothing changed
    for alias in ("v2", "v0", "v007", "latest", "-x", ""):
        with pytest.raises(InvalidArgument) as info:
            registry.set_alias("acme", "x", alias, Split.of(1))
        assert info.value.field == "alias"
    assert registry.set_alias("acme", "x", "prod", Split.parse([("v2", 50), ("v3", 50)])) == (
        Split.of(1)
    )
    assert registry.rollback_alias("acme", "x", "prod") == Split.of(1)
    assert registry.find("acme", "x@prod").version == 1


def test_a_version_an_alias_points_at_is_not_deleted_and_shared_files_stay(
    registry: Registry,
) -> None:
    first = store(registry, "acme", "x", b"same")
    second = store(registry, "acme", "x", b"other")
    third = store(registry, "acme", "x", b"same")  # shares v1's folder
    registry.set_alias("acme", "x", "canary", Split.of(2))
    with pytest.raises(FailedPrecondition) as info:
        registry.delete_version(second)
    assert "'canary'" in info.value.message and info.value.field == "version"
    with pytest.raises(FailedPrecondition) as info:
        registry.delete_version(first)
    assert "'default'" in info.value.message
    registry.delete_version(third)
    assert registry.path_of(first).is_dir()  # v1 still names it
    registry.set_alias("acme", "x", "canary", Split.of(1))
    registry.delete_version(second)
    assert not registry.path_of(second).exists()
    assert [r.version for r in registry.versions("acme", "x")] == [1]
    registry.delete(first)
    assert not registry.path_of(first).exists()
    assert registry.usage("acme") == (0, 0)


def test_listing_pages_in_a_stable_order_with_tokens_bound_to_their_query(
    registry: Registry,
) -> None:
    registry.ensure_tenant("initech")
    for i in range(25):
        store(registry, "acme", f"a{i:02d}", f"acme {i}".encode())
    for i in range(6):
        store(registry, "globex", f"g{i}", f"globex {i}".encode())
        store(registry, "initech", f"i{i}", f"initech {i}".encode())
        if i % 2 == 0:
            registry.set_public("globex", f"g{i}", True)
            registry.set_public("initech", f"i{i}", True)
    expected = sorted(
        [("acme", f"a{i:02d}") for i in range(25)]
        + [("globex", f"g{i}") for i in (0, 2, 4)]
        + [("initech", f"i{i}") for i in (0, 2, 4)]
    )
    query = AdapterQuery("acme")
    seen: list[tuple[str, str]] = []
    after = None
    while page := registry.list_names(query, 7, after):
        assert len(page) <= 7
        seen += page
        after = page[-1]
    assert seen == expected
    served = registry.served_versions(seen)
    assert [(r.owner, r.name, r.version) for r in served] == [(*n, 1) for n in expected]
    only_public = registry.list_names(AdapterQuery("acme", public=True), 100, None)
    assert only_public == [n for n in expected if n[0] != "acme"]
    assert registry.list_names(AdapterQuery("acme", owner="globex"), 100, None) == [
        ("globex", "g0"), ("globex", "g2"), ("globex", "g4"),
    ]  # fmt: skip
    assert registry.list_names(AdapterQuery("acme", name_prefix="a1"), 100, None) == [
        ("acme", f"a{i}") for i in range(10, 20)
    ]
    tokens = registry.page_tokens()
    token = tokens.make(query.fingerprint(), ["acme", "a06"])
    assert tokens.read(token, query.fingerprint()) == ["acme", "a06"]
    other = AdapterQuery("acme", name_prefix="a").fingerprint()
    with pytest.raises(InvalidArgument) as info:
        tokens.read(token, other)
    assert info.value.field == "page_token" and "another query" in info.value.message
    with pytest.raises(InvalidArgument) as info:
        tokens.read(token, AdapterQuery("globex").fingerprint())  # another caller's
    tampered = token[:-3] + ("AAA" if token[-3:] != "AAA" else "BBB")
    for bad in (tampered, "not-a-token", "x" * 5000):
        with pytest.raises(InvalidArgument) as info:
            tokens.read(bad, query.fingerprint())
        assert info.value.field == "page_token"


def _schema_3_with_one_adapter(tmp_path: Path, database: str) -> str:  # noqa: F811
    """A registry as LoRAMux left it before versions: one adapter row and its folder."""
    from loramux.server.db.postgres import PostgresDatabase
    from loramux.server.db.sqlite import SqliteDatabase

    db = (
        SqliteDatabase(tmp_path / "registry.sqlite3")
        if database == "sqlite"
        else PostgresDatabase(database)
    )
    digest = "d" * 64
    with db.schema_transaction() as tx:
        tx.execute(
            "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, "
            "description TEXT NOT NULL, applied_at BIGINT NOT NULL)"
        )
        for migration in MIGRATIONS[:3]:
            for statement in migration.statements:
                tx.execute(statement)
            tx.execute(
                "INSERT INTO schema_migrations VALUES (?, ?, 0)",
                (migration.version, migration.description),
            )
        tx.execute("INSERT INTO tenants VALUES ('acme', 0, 4, 4, 100, 1000000000, 0)")
        tx.execute(
            "INSERT INTO adapters VALUES (?, ?, ?, 'upload', NULL, NULL, ?, 4, 8.0, 0, ?, 11, "
            "1, ?)",
            ("acme", "old", digest, "e" * 64, '["q_proj"]', int(time.time())),
        )
    db.close()
    folder = tmp_path / "adapters" / digest
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text('{"r": 4}')
    (folder / "adapter_model.safetensors").write_bytes(b"old weight")
    return digest


def test_an_existing_registry_upgrades_in_place(tmp_path: Path, database: str) -> None:  # noqa: F811
    digest = _schema_3_with_one_adapter(tmp_path, database)
    registry = Registry(tmp_path, QUOTA, database)
    try:
        record = registry.find("acme", "old")
        assert (record.version, record.digest, record.public) == (1, digest, True)
        assert registry.aliases("acme", "old") == {"default": Split.of(1)}
        assert registry.find("acme", "old@v1") == record
        newer = store(registry, "acme", "old", b"new weight")
        assert newer.version == 2
        assert registry.find("acme", "old").version == 1
    finally:
        registry.close()
    if database == "sqlite":
        db = sqlite3.connect(tmp_path / "registry.sqlite3")
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        db.close()
        assert "adapters" not in tables


def test_the_listing_benchmark_walks_every_visible_adapter_once() -> None:
    from bench.listing import TENANTS, measure

    (result,) = measure(["sqlite"], [300], 50, 1)
    visible = [i for i in range(300) if i % 3 == 0 or i % TENANTS == 0]
    assert result["visible"] == len(visible)
    assert result["pages"] == math.ceil(len(visible) / 50)


def test_a_restart_drops_versions_whose_files_are_lost(tmp_path: Path) -> None:
    """A lost version no alias serves goes alone; one an alias serves takes its name along
    (its traffic must not move elsewhere silently)."""
    registry = Registry(tmp_path, QUOTA)
    registry.ensure_tenant("acme")
    store(registry, "acme", "x", b"kept")
    lost = store(registry, "acme", "x", b"lost, unserved")
    store(registry, "acme", "y", b"y one")
    served = store(registry, "acme", "y", b"lost, served")
    registry.set_alias("acme", "y", "canary", Split.of(2))
    registry.close()
    for record in (lost, served):
        for path in (tmp_path / "adapters" / record.digest).iterdir():
            path.unlink()
    reopened = Registry(tmp_path, QUOTA)
    try:
        assert [(r.name, r.version) for r in reopened.all_adapters()] == [("x", 1)]
    finally:
        reopened.close()
