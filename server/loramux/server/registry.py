"""The adapter registry: which tenant owns which adapter, and where its files are.

A database (`loramux.server.db`: the SQLite file in the data dir by default, or a
PostgreSQL shared by replicas) holds tenants, hashed API keys and adapter rows; adapter
files live content-addressed under ``adapters/<digest>/`` in the data dir, which replicas
may share (a shared volume). An adapter becomes visible in one order only: files written
to a private temporary folder and fsynced, checked, renamed into place atomically, and
then the row inserted in one transaction. A crash at any point leaves either no trace
(temp folders are swept at start) or a complete adapter.

Replicas sharing the folder change a digest's folder and the rows naming it only while
holding the database's lock for that digest, so one replica never removes a folder that
another is about to reference, and two writing the same digest store it once.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from loramux.core.errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted
from loramux.server.db import Database, Row, open_database

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}\Z")  # \Z: "$" accepts a final "\n"
ALLOWED_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md")
REQUIRED_FILES = ("adapter_config.json", "adapter_model.safetensors")

# A staging folder of another replica (or host) is swept only when it is this old: the
# longest upload or pull there is (512 MiB over a slow link) takes far less.
STALE_STAGING_SECONDS = 24 * 3600
DIGEST_PATTERN = re.compile(r"^[0-9a-f]{64}\Z")
STAGING = ".staging"  # uploads in progress, inside an --adapter-dir (never a digest)


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
    def __init__(
        self,
        home: Path,
        default_quota: Quota,
        database: str = "sqlite",
        adapter_dir: Path | None = None,
    ) -> None:
        """`database`: "sqlite" (a file in `home`) or a postgresql:// URL (see db/).

        `adapter_dir`: where adapter folders live, with uploads in progress in its `.staging`
        (one file system, so publishing is a rename); replicas share it on a shared
        volume. By default `home/adapters`, with uploads in progress in `home/tmp`.
        """
        self.home = Path(home)
        self.default_quota = default_quota
        if adapter_dir is None:
            self.files_dir, self.tmp_dir = self.home / "adapters", self.home / "tmp"
        else:
            self.files_dir, self.tmp_dir = Path(adapter_dir), Path(adapter_dir) / STAGING
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self._db: Database = open_database(database, self.home)
        self._staging_lock = threading.Lock()
        self._staged: dict[str, int] = {}  # tenant -> bytes of its uploads/pulls in progress
        self.recover()

    def describe(self) -> str:
        return self._db.describe()

    # ---- start-up consistency ----
    def recover(self) -> None:
        """Drop leftovers of interrupted uploads and pulls; keep every complete adapter.

        Other replicas may share the folder: their staging folders are left alone while
        their process lives (or, on another host, for a day), and a folder no row names is
        removed only under its digest lock, so never while another replica publishes it.
        """
        for leftover in self.tmp_dir.iterdir():
            if not self._abandoned(leftover):
                continue
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
        referenced = {r.digest for r in self.all_adapters()}
        for folder in self.files_dir.iterdir():
            # Only digests: a shared volume's root may hold other things (lost+found).
            if folder.name not in referenced and DIGEST_PATTERN.match(folder.name):
                with self._db.digest_lock(folder.name):
                    self._drop_unreferenced(folder.name)
        broken = [
            r
            for r in self.all_adapters()
            if not all((self.path_of(r) / f).is_file() for f in REQUIRED_FILES)
        ]
        if broken:
            with self._db.transaction() as tx:
                for record in broken:
                    tx.execute(
                        "DELETE FROM adapters WHERE owner=? AND name=? AND digest=?",
                        (record.owner, record.name, record.digest),
                    )

    @staticmethod
    def _abandoned(leftover: Path) -> bool:
        """A staging entry that no live upload or pull of any replica still writes."""
        host, _, rest = leftover.name.rpartition("~")
        pid = int(rest.split("-", 1)[0]) if rest.split("-", 1)[0].isdigit() else None
        if host == socket.gethostname() and pid is not None:
            return pid == os.getpid() or not _process_alive(pid)
        try:
            age = time.time() - leftover.stat().st_mtime
        except FileNotFoundError:
            return False
        return not host or age > STALE_STAGING_SECONDS

    def _rows(self, sql: str, args: tuple[object, ...]) -> list[Row]:
        return self._db.rows(sql, args)

    def version(self) -> int:
        """The change counter: goes up with every change any replica commits."""
        return int(self._rows("SELECT version FROM registry_state WHERE id = 1", ())[0]["version"])

    def wait_for_change(self, timeout: float) -> None:
        self._db.wait_for_change(timeout)

    # ---- tenants and keys ----
    def ensure_tenant(
        self, name: str, *, admin: bool = False, quota: Quota | None = None
    ) -> TenantRecord:
        check_name(name, "tenant")
        quota = quota or self.default_quota
        if self._rows("SELECT name FROM tenants WHERE name=?", (name,)):
            return self.tenant(name)
        with self._db.transaction() as tx:
            tx.execute(
                "INSERT INTO tenants VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
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
        with self._db.transaction() as tx:
            tx.execute(
                "INSERT INTO api_keys VALUES (?, ?, ?, ?, 0)",
                (key_id, tenant, hash_key(key), int(time.time())),
            )
        return key_id, key

    def revoke_key(self, key_id: str) -> None:
        with self._db.transaction() as tx:
            if tx.execute("UPDATE api_keys SET revoked=1 WHERE key_id=?", (key_id,)) == 0:
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
                "WHERE k.revoked = 0 AND t.admin = 1 LIMIT 1",
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

    @contextmanager
    def staged_bytes(self, tenant: str, nbytes: int, quota: Quota) -> Iterator[None]:
        """Hold `nbytes` of the tenant's byte quota while an upload or pull is staged.

        Bytes on their way in count with the stored ones, so uploads and pulls running at
        once cannot together stage more than the quota on disk; the first over it is
        RESOURCE_EXHAUSTED before any byte moves. The publishing transaction still checks
        the stored bytes (the fleet-wide figure). Counted per process: replicas sharing a
        registry each hold their own tenant's staging to the quota.
        """
        with self._staging_lock:
            count, used = self.usage(tenant)
            pending = self._staged.get(tenant, 0)
            if used + pending + nbytes > quota.max_bytes:
                raise ResourceExhausted(
                    None,
                    f"tenant quota: at most {quota.max_bytes} adapter bytes ({used} stored, "
                    f"{pending} being uploaded or pulled, {nbytes} more asked)",
                )
            check_quota(quota, count, used + pending, nbytes)
            self._staged[tenant] = pending + nbytes
        try:
            yield
        finally:
            with self._staging_lock:
                self._staged[tenant] -= nbytes
                if not self._staged[tenant]:
                    del self._staged[tenant]

    def staging_dir(self) -> Path:
        """A private folder for an upload or pull in progress (swept at start if abandoned)."""
        path = self.tmp_dir / f"{socket.gethostname()}~{os.getpid()}-{uuid.uuid4().hex}"
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
        with self._db.digest_lock(digest):
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
            with self._db.transaction() as tx:  # every replica's writes, one at a time
                if quota is not None:
                    row = tx.fetch(
                        "SELECT COUNT(*) AS n, COALESCE(SUM(size_bytes), 0) AS b "
                        "FROM adapters WHERE owner=?",
                        (owner,),
                    )[0]
                    check_quota(quota, int(row["n"]), int(row["b"]), size)
                tx.execute(
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
        except self._db.integrity_errors as exc:
            raise AlreadyExists("name", f"adapter {name!r} exists") from exc

    def delete(self, record: AdapterRecord) -> None:
        with self._db.digest_lock(record.digest):
            with self._db.transaction() as tx:
                tx.execute(
                    "DELETE FROM adapters WHERE owner=? AND name=? AND digest=?",
                    (record.owner, record.name, record.digest),
                )
            self._drop_unreferenced(record.digest)

    def set_public(self, owner: str, name: str, public: bool) -> AdapterRecord:
        with self._db.transaction() as tx:
            changed = tx.execute(
                "UPDATE adapters SET public=? WHERE owner=? AND name=?", (int(public), owner, name)
            )
        if not changed:
            raise NotFound("adapter", f"no adapter {owner}/{name}")
        return self.find(owner, name)

    def _drop_unreferenced(self, digest: str) -> None:
        """Remove a digest's folder once no row names it (caller holds its digest lock)."""
        if not self._rows("SELECT 1 FROM adapters WHERE digest=? LIMIT 1", (digest,)):
            shutil.rmtree(self.files_dir / digest, ignore_errors=True)

    def close(self) -> None:
        self._db.close()


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True
