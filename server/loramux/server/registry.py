"""The adapter registry: which tenant owns which adapter, and where its files are.

SQLite under the data dir holds tenants, hashed API keys and adapter rows; adapter
files live content-addressed under ``adapters/<digest>/``. An adapter becomes visible
in one order only: files written to a private temporary folder and fsynced, checked,
renamed into place atomically, and then the row inserted in one transaction. A crash at
any point leaves either no trace (temp folders are swept at start) or a complete adapter.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from loramux.core.errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
LEGACY_DEV_TENANT = "default"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}\Z")  # \Z: "$" accepts a final "\n"
ALLOWED_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md")
REQUIRED_FILES = ("adapter_config.json", "adapter_model.safetensors")

SCHEMA = """
CREATE TABLE IF NOT EXISTS tenants (
    name TEXT PRIMARY KEY,
    admin INTEGER NOT NULL DEFAULT 0,
    max_concurrent INTEGER NOT NULL,
    max_queued INTEGER NOT NULL,
    max_adapters INTEGER NOT NULL,
    max_bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL REFERENCES tenants(name),
    key_hash TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS adapters (
    owner TEXT NOT NULL,
    name TEXT NOT NULL,
    digest TEXT NOT NULL,
    source TEXT NOT NULL,
    repo_id TEXT,
    revision TEXT,
    sha256 TEXT NOT NULL,
    rank INTEGER NOT NULL,
    alpha REAL NOT NULL,
    use_rslora INTEGER NOT NULL,
    target_modules TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    public INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (owner, name)
);
"""


def check_name(name: str, field: str = "name") -> str:
    """Adapter and tenant names: safe as path parts and metric labels."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise InvalidArgument(field, "must be 1-64 of [A-Za-z0-9._-], not starting with '.' or '-'")
    return name


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Quota:
    max_concurrent: int
    max_queued: int
    max_adapters: int
    max_bytes: int


def check_quota(quota: Quota, count: int, used: int, add_bytes: int) -> None:
    """RESOURCE_EXHAUSTED when one more adapter of `add_bytes` would break the quota."""
    if count + 1 > quota.max_adapters:
        raise ResourceExhausted(None, f"tenant quota: at most {quota.max_adapters} adapters")
    if used + add_bytes > quota.max_bytes:
        raise ResourceExhausted(
            None,
            f"tenant quota: at most {quota.max_bytes} adapter bytes "
            f"({used} stored, {add_bytes} more asked)",
        )


@dataclass(frozen=True)
class TenantRecord:
    name: str
    admin: bool
    quota: Quota


@dataclass(frozen=True)
class AdapterRecord:
    owner: str
    name: str
    digest: str  # the adapter's id: sha256 over its files' names and hashes
    source: str  # "upload" | "hub"
    repo_id: str | None
    revision: str | None
    sha256: str  # of adapter_model.safetensors
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    size_bytes: int
    public: bool
    created_at: int

    @property
    def engine_id(self) -> str:
        """The engine's key: owner-scoped so two tenants' identical files stay separate."""
        return f"{self.owner}/{self.name}@{self.digest[:16]}"


def manifest_digest(files: dict[str, str]) -> str:
    """One hash for an adapter: its file names and their sha256, sorted."""
    lines = "".join(f"{name}\0{sha}\n" for name, sha in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Registry:
    def __init__(self, home: Path, default_quota: Quota) -> None:
        self.home = Path(home)
        self.default_quota = default_quota
        self.files_dir = self.home / "adapters"
        self.tmp_dir = self.home / "tmp"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # Serialises changes to the content-addressed folders: publishing a digest must not
        # race with dropping the same digest when another tenant deletes identical files.
        self._files_lock = threading.Lock()
        self._db = sqlite3.connect(
            self.home / "registry.sqlite3", check_same_thread=False, isolation_level=None
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._migrate()
        self.recover()

    def _migrate(self) -> None:
        """Bring an older registry up to SCHEMA_VERSION (SQLite's user_version).

        1: development mode used to create tenant `default` as an admin, so a key later made
        for it (as the docs advised, to keep its adapters) was an admin key. It is a plain
        tenant now; an operator who wants an admin creates one.
        """
        with self._tx() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version < 1:
                demoted = db.execute(
                    "UPDATE tenants SET admin=0 WHERE name=? AND admin=1", (LEGACY_DEV_TENANT,)
                ).rowcount
                if demoted:
                    log.warning(
                        "registry: tenant %r was an admin (made by an older development "
                        "mode); it is a plain tenant now",
                        LEGACY_DEV_TENANT,
                    )
            if version < SCHEMA_VERSION:
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    # ---- start-up consistency ----
    def recover(self) -> None:
        """Drop leftovers of interrupted uploads and pulls; keep every complete adapter."""
        for leftover in self.tmp_dir.iterdir():
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink()
        records = self._adapters("SELECT * FROM adapters", ())
        referenced = {r.digest for r in records}
        for folder in self.files_dir.iterdir():
            if folder.name not in referenced:
                shutil.rmtree(folder, ignore_errors=True)
        broken = [
            r for r in records if not all((self.path_of(r) / f).is_file() for f in REQUIRED_FILES)
        ]
        with self._tx() as db:
            for record in broken:
                db.execute(
                    "DELETE FROM adapters WHERE owner=? AND name=?", (record.owner, record.name)
                )

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _rows(self, sql: str, args: tuple[object, ...]) -> list[sqlite3.Row]:
        with self._lock:
            cursor = self._db.execute(sql, args)
            cursor.row_factory = sqlite3.Row
            return list(cursor.fetchall())

    # ---- tenants and keys ----
    def ensure_tenant(
        self, name: str, *, admin: bool = False, quota: Quota | None = None
    ) -> TenantRecord:
        check_name(name, "tenant")
        quota = quota or self.default_quota
        with self._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO tenants VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    name,
                    int(admin),
                    quota.max_concurrent,
                    quota.max_queued,
                    quota.max_adapters,
                    quota.max_bytes,
                    int(time.time()),
                ),
            )
        return self.tenant(name)

    def create_tenant(self, name: str, *, admin: bool, quota: Quota) -> TenantRecord:
        check_name(name, "name")
        if self._rows("SELECT name FROM tenants WHERE name=?", (name,)):
            raise AlreadyExists("name", f"tenant {name!r} exists")
        return self.ensure_tenant(name, admin=admin, quota=quota)

    def tenant(self, name: str) -> TenantRecord:
        rows = self._rows("SELECT * FROM tenants WHERE name=?", (name,))
        if not rows:
            raise NotFound("tenant", f"no tenant {name!r}")
        row = rows[0]
        return TenantRecord(
            name=row["name"],
            admin=bool(row["admin"]),
            quota=Quota(
                row["max_concurrent"], row["max_queued"], row["max_adapters"], row["max_bytes"]
            ),
        )

    def tenants(self) -> list[TenantRecord]:
        return [
            self.tenant(r["name"]) for r in self._rows("SELECT name FROM tenants ORDER BY name", ())
        ]

    def create_key(self, tenant: str) -> tuple[str, str]:
        """A new random key for `tenant`: (key_id, key). Only the hash is stored."""
        self.tenant(tenant)
        key_id = uuid.uuid4().hex[:12]
        key = f"lmx_{secrets.token_urlsafe(32)}"
        with self._tx() as db:
            db.execute(
                "INSERT INTO api_keys VALUES (?, ?, ?, ?, 0)",
                (key_id, tenant, hash_key(key), int(time.time())),
            )
        return key_id, key

    def revoke_key(self, key_id: str) -> None:
        with self._tx() as db:
            if db.execute("UPDATE api_keys SET revoked=1 WHERE key_id=?", (key_id,)).rowcount == 0:
                raise NotFound("key_id", "no such key")

    def tenant_for_key(self, key: str) -> TenantRecord | None:
        rows = self._rows(
            "SELECT tenant FROM api_keys WHERE key_hash=? AND revoked=0", (hash_key(key),)
        )
        return self.tenant(rows[0]["tenant"]) if rows else None

    def has_admin_keys(self) -> bool:
        """Whether some admin tenant holds a key that is not revoked."""
        return bool(
            self._rows(
                "SELECT 1 FROM api_keys k JOIN tenants t ON t.name = k.tenant "
                "WHERE k.revoked=0 AND t.admin=1 LIMIT 1",
                (),
            )
        )

    # ---- adapters ----
    def _adapters(self, sql: str, args: tuple[object, ...]) -> list[AdapterRecord]:
        return [
            AdapterRecord(
                owner=r["owner"],
                name=r["name"],
                digest=r["digest"],
                source=r["source"],
                repo_id=r["repo_id"],
                revision=r["revision"],
                sha256=r["sha256"],
                rank=r["rank"],
                alpha=r["alpha"],
                use_rslora=bool(r["use_rslora"]),
                target_modules=tuple(json.loads(r["target_modules"])),
                size_bytes=r["size_bytes"],
                public=bool(r["public"]),
                created_at=r["created_at"],
            )
            for r in self._rows(sql, args)
        ]

    def path_of(self, record: AdapterRecord) -> Path:
        return self.files_dir / record.digest

    def all_adapters(self) -> list[AdapterRecord]:
        return self._adapters("SELECT * FROM adapters ORDER BY owner, name", ())

    def visible_adapters(self, tenant: str) -> list[AdapterRecord]:
        return self._adapters(
            "SELECT * FROM adapters WHERE owner=? OR public=1 ORDER BY owner, name", (tenant,)
        )

    def find(self, tenant: str, ref: str, *, for_write: bool = False) -> AdapterRecord:
        """Resolve `name` (own) or `owner/name` (own or public). Others' private ones: NotFound."""
        if not ref:
            raise InvalidArgument("name", "give an adapter name (or owner/name)")
        owner, _, name = ref.rpartition("/") if "/" in ref else (tenant, "", ref)
        found = self._adapters("SELECT * FROM adapters WHERE owner=? AND name=?", (owner, name))
        if found and (found[0].owner == tenant or (found[0].public and not for_write)):
            return found[0]
        raise NotFound("adapter", f"no adapter {ref!r}")

    def usage(self, tenant: str) -> tuple[int, int]:
        rows = self._rows(
            "SELECT COUNT(*) AS n, COALESCE(SUM(size_bytes), 0) AS b FROM adapters WHERE owner=?",
            (tenant,),
        )
        return int(rows[0]["n"]), int(rows[0]["b"])

    def staging_dir(self) -> Path:
        """A private folder for an upload or pull in progress (swept at start if abandoned)."""
        path = self.tmp_dir / uuid.uuid4().hex
        path.mkdir()
        return path

    def commit(
        self,
        owner: str,
        name: str,
        staged: Path,
        *,
        source: str,
        rank: int,
        alpha: float,
        use_rslora: bool,
        target_modules: tuple[str, ...],
        repo_id: str | None = None,
        revision: str | None = None,
        quota: Quota | None = None,
    ) -> AdapterRecord:
        """Publish a checked staging folder: fsync, rename into place, then insert the row.

        `quota` is checked again inside the inserting transaction, so two uploads racing
        past the early check cannot together exceed it.
        """
        files = {p.name: sha256_file(p) for p in staged.iterdir() if p.is_file()}
        for path in staged.iterdir():
            with path.open("rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(staged)
        digest = manifest_digest(files)
        size = sum(p.stat().st_size for p in staged.iterdir() if p.is_file())
        target = self.files_dir / digest
        now = int(time.time())
        with self._files_lock:
            if target.exists():
                shutil.rmtree(staged)  # identical files already stored (deduplicated)
            else:
                os.rename(staged, target)
                fsync_dir(self.files_dir)
            try:
                self._insert(
                    owner, name, digest, source, repo_id, revision, files, rank, alpha,
                    use_rslora, target_modules, size, now, quota,
                )  # fmt: skip
            except BaseException:
                self._drop_unreferenced(digest)
                raise
        return self.find(owner, name)

    def _insert(
        self,
        owner: str,
        name: str,
        digest: str,
        source: str,
        repo_id: str | None,
        revision: str | None,
        files: dict[str, str],
        rank: int,
        alpha: float,
        use_rslora: bool,
        target_modules: tuple[str, ...],
        size: int,
        now: int,
        quota: Quota | None,
    ) -> None:
        """The row that makes an adapter visible, in one transaction with the quota check."""
        try:
            with self._tx() as db:
                if quota is not None:
                    count, used = db.execute(
                        "SELECT COUNT(*), COALESCE(SUM(size_bytes), 0) FROM adapters WHERE owner=?",
                        (owner,),
                    ).fetchone()
                    check_quota(quota, count, used, size)
                db.execute(
                    "INSERT INTO adapters VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?)",
                    (
                        owner,
                        name,
                        digest,
                        source,
                        repo_id,
                        revision,
                        files["adapter_model.safetensors"],
                        rank,
                        alpha,
                        int(use_rslora),
                        json.dumps(list(target_modules)),
                        size,
                        now,
                    ),
                )
        except sqlite3.IntegrityError as exc:
            raise AlreadyExists("name", f"adapter {name!r} exists") from exc

    def delete(self, record: AdapterRecord) -> None:
        with self._files_lock:
            with self._tx() as db:
                db.execute(
                    "DELETE FROM adapters WHERE owner=? AND name=?", (record.owner, record.name)
                )
            self._drop_unreferenced(record.digest)

    def set_public(self, owner: str, name: str, public: bool) -> AdapterRecord:
        with self._tx() as db:
            changed = db.execute(
                "UPDATE adapters SET public=? WHERE owner=? AND name=?", (int(public), owner, name)
            ).rowcount
        if not changed:
            raise NotFound("adapter", f"no adapter {owner}/{name}")
        return self.find(owner, name)

    def _drop_unreferenced(self, digest: str) -> None:
        """Remove a digest's folder once no row names it (caller holds `_files_lock`)."""
        if not self._rows("SELECT 1 FROM adapters WHERE digest=? LIMIT 1", (digest,)):
            shutil.rmtree(self.files_dir / digest, ignore_errors=True)

    def close(self) -> None:
        with self._lock:
            self._db.close()
