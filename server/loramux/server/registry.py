"""The adapter registry: which tenant owns which adapter, and where its files are.

A database (`loramux.server.db`: the SQLite file in the data dir by default, or a
PostgreSQL shared by replicas) holds tenants, hashed API keys, adapter names, their
immutable versions, aliases and evaluation results (versions.py says what `name@v3` and
`name@alias` mean, listing.py how pages are read); adapter
files live content-addressed under ``adapters/<digest>/`` in the data dir, which replicas
may share (a shared volume). An adapter becomes visible in one order only: files written
to a private temporary folder and fsynced, checked, renamed into place atomically, and
then the version's row inserted in one transaction. A crash at any point leaves either no
trace (temp folders are swept at start) or a complete version.

Replicas sharing the folder change a digest's folder and the rows naming it only while
holding the database's lock for that digest, so one replica never removes a folder that
another is about to reference, and two writing the same digest store it once.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import secrets
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from loramux.core.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from loramux.server.db import Database, Row, open_database
from loramux.server.listing import MAX_PAGE_SIZE, AdapterQuery, PageTokens
from loramux.server.versions import (
    DEFAULT_ALIAS,
    LATEST,
    MAX_REF_CHARS,
    Split,
    VersionMetadata,
    check_alias,
    parse_ref,
    version_number,
)

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
    # Rate budgets (rates.py); 0: the server's --tenant-requests/tokens-per-minute
    requests_per_minute: int = 0
    tokens_per_minute: int = 0


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
    """One stored version of an adapter name (versions are immutable; see versions.py)."""

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
    version: int = 1
    description: str = ""
    tags: tuple[str, ...] = ()
    base_model: str = ""

    @property
    def ref(self) -> str:
        return f"{self.owner}/{self.name}@v{self.version}"

    @property
    def engine_id(self) -> str:
        """The engine's key: owner-scoped so two tenants' identical files stay separate."""
        return f"{self.owner}/{self.name}@{self.digest[:16]}"


class StagedBytes:
    """One upload's or pull's hold on its tenant's byte quota (see `Registry.staged_bytes`)."""

    def __init__(self, registry: Registry, tenant: str, quota: Quota) -> None:
        self._registry, self._tenant, self._quota = registry, tenant, quota
        self.held = 0
        self._first = True

    def cover(self, nbytes: int) -> None:
        """Hold at least `nbytes` in all; RESOURCE_EXHAUSTED if that breaks the quota."""
        if nbytes <= self.held and not self._first:
            return
        more = max(nbytes - self.held, 0)
        self._registry._hold(self._tenant, more, self._quota)
        self._first = False
        self.held += more

    def release(self) -> None:
        if self.held:
            self._registry._unhold(self._tenant, self.held)
        self.held = 0


@dataclass(frozen=True)
class _VersionRow:
    owner: str
    name: str
    digest: str
    source: str
    repo_id: str | None
    revision: str | None
    sha256: str
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    size: int
    created_at: int
    metadata: VersionMetadata


def _record(r: Row) -> AdapterRecord:
    return AdapterRecord(
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
        version=int(r["version"]),
        description=r["description"],
        tags=tuple(json.loads(r["tags"])),
        base_model=r["base_model"],
    )


def _usage(fetch: Callable[[str, tuple[object, ...]], list[Row]], tenant: str) -> tuple[int, int]:
    """(versions, bytes) a tenant stores; a digest stored by several versions counts once."""
    count = fetch("SELECT COUNT(*) AS n FROM adapter_versions WHERE owner=?", (tenant,))
    size = fetch(
        "SELECT COALESCE(SUM(size_bytes), 0) AS b FROM (SELECT DISTINCT digest, size_bytes "
        "FROM adapter_versions WHERE owner=?) d",
        (tenant,),
    )
    return int(count[0]["n"]), int(size[0]["b"])


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
        self._tokens: PageTokens | None = None
        self._rng = random.SystemRandom()  # weighted aliases' picks without a caller's key
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
        for owner, name in sorted({(r.owner, r.name) for r in broken}):
            lost = [r for r in broken if (r.owner, r.name) == (owner, name)]
            served = {v for split in self.aliases(owner, name).values() for v in split.versions}
            if served & {r.version for r in lost}:
                # An alias sends traffic to files that are gone: the name cannot be served
                # as its owner set it, so it goes whole rather than silently elsewhere.
                self.delete(lost[0])
            else:
                for record in lost:
                    self.delete_version(record)

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
                "INSERT INTO tenants (name, admin, max_concurrent, max_queued, max_adapters, "
                "max_bytes, created_at, requests_per_minute, tokens_per_minute) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (
                    name,
                    int(admin),
                    quota.max_concurrent,
                    quota.max_queued,
                    quota.max_adapters,
                    quota.max_bytes,
                    int(time.time()),
                    quota.requests_per_minute,
                    quota.tokens_per_minute,
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
                row["max_concurrent"],
                row["max_queued"],
                row["max_adapters"],
                row["max_bytes"],
                row["requests_per_minute"],
                row["tokens_per_minute"],
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
    _SELECT = (
        "SELECT v.*, n.public FROM adapter_versions v "
        "JOIN adapter_names n ON n.owner = v.owner AND n.name = v.name"
    )

    def _adapters(self, where: str, args: tuple[object, ...]) -> list[AdapterRecord]:
        return [_record(r) for r in self._rows(f"{self._SELECT} {where}", args)]

    def path_of(self, record: AdapterRecord) -> Path:
        return self.files_dir / record.digest

    def all_adapters(self) -> list[AdapterRecord]:
        """Every stored version of every name."""
        return self._adapters("ORDER BY v.owner, v.name, v.version", ())

    def _name_row(self, owner: str, name: str) -> Row | None:
        rows = self._rows(
            "SELECT public, next_version FROM adapter_names WHERE owner=? AND name=?",
            (owner, name),
        )
        return rows[0] if rows else None

    def find(
        self,
        tenant: str,
        ref: str,
        *,
        for_write: bool = False,
        key: str | None = None,
        admin: bool = False,
        field: str = "adapter",
    ) -> AdapterRecord:
        """Resolve `[owner/]name[@version|@alias]` to one version.

        Own adapters, and others' public ones unless `for_write` (an `admin` may reach any).
        Another tenant's private adapter is NOT_FOUND, exactly as one that does not exist;
        an unknown version or alias is NOT_FOUND naming it. A weighted alias picks its
        version by `key` (sticky) or at random (see versions.py).
        """
        if not ref:
            raise InvalidArgument("name", "give an adapter name (or owner/name)")
        parsed = parse_ref(ref, NAME_PATTERN)
        if parsed is None:
            raise NotFound(field, f"no adapter {ref[:MAX_REF_CHARS]!r}")
        owner = parsed.owner or tenant
        row = self._name_row(owner, parsed.name)
        if row is None or not (owner == tenant or admin or (bool(row["public"]) and not for_write)):
            raise NotFound(field, f"no adapter {ref!r}")
        version = self._select_version(owner, parsed.name, parsed.selector, key, field)
        found = self._adapters(
            "WHERE v.owner=? AND v.name=? AND v.version=?", (owner, parsed.name, version)
        )
        if not found:
            raise NotFound(field, f"{owner}/{parsed.name} has no version v{version}")
        return found[0]

    def _select_version(
        self, owner: str, name: str, selector: str | None, key: str | None, field: str
    ) -> int:
        selector = selector or DEFAULT_ALIAS
        number = version_number(selector)
        if number is not None:
            return number
        if selector == LATEST:
            row = self._rows(
                "SELECT MAX(version) AS v FROM adapter_versions WHERE owner=? AND name=?",
                (owner, name),
            )
            return int(row[0]["v"] or 0)
        rows = self._rows(
            "SELECT targets FROM adapter_aliases WHERE owner=? AND name=? AND alias=?",
            (owner, name, selector),
        )
        if not rows:
            raise NotFound(field, f"{owner}/{name} has no alias {selector!r}")
        split = Split.loads(rows[0]["targets"])
        return split.pick(f"{owner}/{name}@{selector}", key, self._rng)

    def versions(self, owner: str, name: str) -> list[AdapterRecord]:
        """Every version of one name, oldest first."""
        return self._adapters("WHERE v.owner=? AND v.name=? ORDER BY v.version", (owner, name))

    def usage(self, tenant: str) -> tuple[int, int]:
        """(versions stored, bytes stored): files shared by versions are counted once."""
        return _usage(self._rows, tenant)

    @contextmanager
    def staged_bytes(self, tenant: str, nbytes: int, quota: Quota) -> Iterator[StagedBytes]:
        """Hold `nbytes` of the tenant's byte quota while an upload or pull is staged.

        Bytes on their way in count with the stored ones, so uploads and pulls running at
        once cannot together stage more than the quota on disk; the first over it is
        RESOURCE_EXHAUSTED before any byte moves. A pull whose size the Hub did not list
        holds 0 at first and grows its hold as the bytes arrive (`StagedBytes.cover`). The
        publishing transaction still checks the stored bytes (the fleet-wide figure).
        Counted per process: replicas sharing a registry each hold their own tenant's
        staging to the quota.
        """
        held = StagedBytes(self, tenant, quota)
        try:
            held.cover(nbytes)
            yield held
        finally:
            held.release()

    def _hold(self, tenant: str, nbytes: int, quota: Quota) -> None:
        """Add `nbytes` to the tenant's staged bytes, or RESOURCE_EXHAUSTED over its quota."""
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
            if nbytes:
                self._staged[tenant] = pending + nbytes

    def _unhold(self, tenant: str, nbytes: int) -> None:
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
        metadata: VersionMetadata | None = None,
    ) -> AdapterRecord:
        """Publish a checked staging folder as the name's next version: fsync, rename into
        place, then insert the row (the first version also creates the name and its
        `default` alias).

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
        row = _VersionRow(
            owner, name, digest, source, repo_id, revision, files["adapter_model.safetensors"],
            rank, alpha, use_rslora, target_modules, size, int(time.time()),
            metadata or VersionMetadata(),
        )  # fmt: skip
        with self._db.digest_lock(digest):
            if target.exists():
                shutil.rmtree(staged)  # identical files already stored (deduplicated)
            else:
                os.rename(staged, target)
                fsync_dir(self.files_dir)
            try:
                version = self._insert(row, quota)
            except BaseException:
                self._drop_unreferenced(digest)
                raise
        return self.find(owner, f"{name}@v{version}")

    def _insert(self, row: _VersionRow, quota: Quota | None) -> int:
        """The row that makes a version visible, in one transaction with the quota check."""
        with self._db.transaction() as tx:  # every replica's writes, one at a time
            if quota is not None:
                count, used = _usage(tx.fetch, row.owner)
                shared = tx.fetch(
                    "SELECT 1 FROM adapter_versions WHERE owner=? AND digest=? LIMIT 1",
                    (row.owner, row.digest),
                )
                check_quota(quota, count, used, 0 if shared else row.size)
            names = tx.fetch(
                "SELECT next_version FROM adapter_names WHERE owner=? AND name=?",
                (row.owner, row.name),
            )
            if names:
                version = int(names[0]["next_version"])
                tx.execute(
                    "UPDATE adapter_names SET next_version=? WHERE owner=? AND name=?",
                    (version + 1, row.owner, row.name),
                )
            else:
                version = 1
                tx.execute(
                    "INSERT INTO adapter_names (owner, name, public, created_at, next_version) "
                    "VALUES (?, ?, 0, ?, 2)",
                    (row.owner, row.name, row.created_at),
                )
                tx.execute(
                    "INSERT INTO adapter_aliases VALUES (?, ?, ?, ?, NULL, ?)",
                    (row.owner, row.name, DEFAULT_ALIAS, Split.of(1).dumps(), row.created_at),
                )
            meta = row.metadata
            tx.execute(
                "INSERT INTO adapter_versions (owner, name, version, digest, source, repo_id, "
                "revision, sha256, rank, alpha, use_rslora, target_modules, size_bytes, "
                "created_at, description, tags, base_model) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    row.owner, row.name, version, row.digest, row.source, row.repo_id,
                    row.revision, row.sha256, row.rank, row.alpha, int(row.use_rslora),
                    json.dumps(list(row.target_modules)), row.size, row.created_at,
                    meta.description, json.dumps(list(meta.tags)), meta.base_model,
                ),
            )  # fmt: skip
        return version

    def delete(self, record: AdapterRecord) -> None:
        """Delete a name with every version, alias and evaluation result of it."""
        key = (record.owner, record.name)
        digests = {r.digest for r in self.versions(*key)}
        with self._db.transaction() as tx:
            for table in ("adapter_versions", "adapter_aliases", "adapter_evals"):
                tx.execute(f"DELETE FROM {table} WHERE owner=? AND name=?", key)
            tx.execute("DELETE FROM adapter_names WHERE owner=? AND name=?", key)
        for digest in sorted(digests):  # one at a time: SQLite has one lock for all
            with self._db.digest_lock(digest):
                self._drop_unreferenced(digest)

    def delete_version(self, record: AdapterRecord) -> None:
        """Delete one version; refused while an alias points at it (the message names it)."""
        key = (record.owner, record.name)
        with self._db.transaction() as tx:
            for alias in tx.fetch(
                "SELECT alias, targets FROM adapter_aliases WHERE owner=? AND name=? "
                "ORDER BY alias",
                key,
            ):
                if record.version in Split.loads(alias["targets"]).versions:
                    raise FailedPrecondition(
                        "version",
                        f"alias {alias['alias']!r} points at {record.name}@v{record.version}: "
                        "move or delete the alias first",
                    )
            tx.execute(
                "DELETE FROM adapter_evals WHERE owner=? AND name=? AND version=?",
                (*key, record.version),
            )
            if not tx.execute(
                "DELETE FROM adapter_versions WHERE owner=? AND name=? AND version=?",
                (*key, record.version),
            ):
                raise NotFound("version", f"{record.name} has no version v{record.version}")
        with self._db.digest_lock(record.digest):
            self._drop_unreferenced(record.digest)

    def set_public(self, owner: str, name: str, public: bool) -> AdapterRecord:
        with self._db.transaction() as tx:
            changed = tx.execute(
                "UPDATE adapter_names SET public=? WHERE owner=? AND name=?",
                (int(public), owner, name),
            )
        if not changed:
            raise NotFound("adapter", f"no adapter {owner}/{name}")
        return self.find(owner, name)

    # ---- aliases ----
    def aliases(self, owner: str, name: str) -> dict[str, Split]:
        return {
            r["alias"]: Split.loads(r["targets"])
            for r in self._rows(
                "SELECT alias, targets FROM adapter_aliases WHERE owner=? AND name=? "
                "ORDER BY alias",
                (owner, name),
            )
        }

    def set_alias(
        self, owner: str, name: str, alias: str, split: Split, field: str = "targets"
    ) -> Split | None:
        """Point `alias` at `split` in one transaction; the targets it had (None: new).

        Every version named must exist (NOT_FOUND naming the entry); the alias's former
        targets are kept, so `rollback_alias` restores them in one call.
        """
        check_alias(alias)
        with self._db.transaction() as tx:
            have = {
                int(r["version"])
                for r in tx.fetch(
                    "SELECT version FROM adapter_versions WHERE owner=? AND name=?",
                    (owner, name),
                )
            }
            if not have:
                raise NotFound("adapter", f"no adapter {owner}/{name}")
            for i, version in enumerate(split.versions):
                if version not in have:
                    raise NotFound(f"{field}[{i}].version", f"{name} has no version v{version}")
            old = tx.fetch(
                "SELECT targets FROM adapter_aliases WHERE owner=? AND name=? AND alias=?",
                (owner, name, alias),
            )
            previous = old[0]["targets"] if old else None
            now = int(time.time())
            if old:
                tx.execute(
                    "UPDATE adapter_aliases SET targets=?, previous=?, updated_at=? "
                    "WHERE owner=? AND name=? AND alias=?",
                    (split.dumps(), previous, now, owner, name, alias),
                )
            else:
                tx.execute(
                    "INSERT INTO adapter_aliases VALUES (?, ?, ?, ?, NULL, ?)",
                    (owner, name, alias, split.dumps(), now),
                )
        return Split.loads(previous) if previous else None

    def rollback_alias(self, owner: str, name: str, alias: str) -> Split:
        """Point `alias` back at the targets it had before its last move; those targets."""
        rows = self._rows(
            "SELECT previous FROM adapter_aliases WHERE owner=? AND name=? AND alias=?",
            (owner, name, alias),
        )
        if not rows:
            raise NotFound("alias", f"{name} has no alias {alias!r}")
        if not rows[0]["previous"]:
            raise FailedPrecondition("alias", f"alias {alias!r} has never been moved")
        split = Split.loads(rows[0]["previous"])
        self.set_alias(owner, name, alias, split, field="previous")
        return split

    def delete_alias(self, owner: str, name: str, alias: str) -> None:
        if alias == DEFAULT_ALIAS:
            raise FailedPrecondition(
                "alias", "the default alias is what the bare name serves: move it instead"
            )
        with self._db.transaction() as tx:
            if not tx.execute(
                "DELETE FROM adapter_aliases WHERE owner=? AND name=? AND alias=?",
                (owner, name, alias),
            ):
                raise NotFound("alias", f"{name} has no alias {alias!r}")

    # ---- listing (see listing.py) ----
    def page_tokens(self) -> PageTokens:
        """Page tokens signed with the registry's secret, made once and shared by replicas."""
        if self._tokens is None:
            with self._db.transaction(bump=False) as tx:
                tx.execute(
                    "INSERT INTO registry_secret (id, secret) VALUES (1, ?) ON CONFLICT DO NOTHING",
                    (secrets.token_hex(32),),
                )
                rows = tx.fetch("SELECT secret FROM registry_secret WHERE id = 1")
            self._tokens = PageTokens(bytes.fromhex(rows[0]["secret"]))
        return self._tokens

    def list_names(
        self, query: AdapterQuery, size: int, after: tuple[str, str] | None
    ) -> list[tuple[str, str]]:
        """Up to `size` (owner, name) visible to `query.tenant`, after `after`, in order.

        Two index ranges, each at most `size` rows: the tenant's own names (primary key)
        and public ones (the (public, owner, name) index); merged, deduplicated, cut.
        """
        start = after or ("", "")
        found: set[tuple[str, str]] = set()
        extra, args = "", []
        if query.name_prefix:
            extra += " AND substr(n.name, 1, ?) = ?"
            args += [len(query.name_prefix), query.name_prefix]
        if query.source:
            extra += (
                " AND EXISTS (SELECT 1 FROM adapter_versions v WHERE v.owner = n.owner "
                "AND v.name = n.name AND v.source = ?)"
            )
            args.append(query.source)
        own = query.owner in ("", query.tenant) and query.tenant >= start[0]
        if own:
            public = "" if query.public is None else f" AND n.public = {int(query.public)}"
            after_name = start[1] if query.tenant == start[0] else ""
            found.update(
                (r["owner"], r["name"])
                for r in self._rows(
                    "SELECT n.owner, n.name FROM adapter_names n WHERE n.owner = ? "
                    f"AND n.name > ?{public}{extra} ORDER BY n.name LIMIT ?",
                    (query.tenant, after_name, *args, size),
                )
            )
        if query.public is not False:
            by_owner = " AND n.owner = ?" if query.owner else ""
            found.update(
                (r["owner"], r["name"])
                for r in self._rows(
                    "SELECT n.owner, n.name FROM adapter_names n WHERE n.public = 1 "
                    f"AND (n.owner, n.name) > (?, ?){by_owner}{extra} "
                    "ORDER BY n.owner, n.name LIMIT ?",
                    (
                        start[0],
                        start[1],
                        *([query.owner] if query.owner else []),
                        *args,
                        size,
                    ),
                )
            )
        return sorted(found)[:size]

    def visible_adapters(self, tenant: str) -> list[AdapterRecord]:
        """Every name `tenant` may use (own and public) at its default version, in order."""
        names: list[tuple[str, str]] = []
        while page := self.list_names(
            AdapterQuery(tenant), MAX_PAGE_SIZE, names[-1] if names else None
        ):
            names += page
        return self.served_versions(names)

    def served_versions(self, names: list[tuple[str, str]]) -> list[AdapterRecord]:
        """Each name at the version its default alias serves most (the first on a tie), in
        the order given: two queries for the whole page."""
        if not names:
            return []
        # The page as a VALUES table joined to the rows: each name one primary-key probe.
        # (`(owner, name) IN (VALUES ...)` made SQLite scan every alias: 344 ms a page at
        # 100,000 adapters, against 12 ms so.)
        pairs = ", ".join("(?, ?)" for _ in names)
        rows = self._rows(
            f"WITH page(owner, name) AS (VALUES {pairs}) SELECT a.owner, a.name, a.targets "
            "FROM page JOIN adapter_aliases a ON a.owner = page.owner AND a.name = page.name "
            "AND a.alias = ?",
            (*(part for pair in names for part in pair), DEFAULT_ALIAS),
        )
        chosen = [
            (r["owner"], r["name"], max(Split.loads(r["targets"]).targets, key=lambda t: t[1])[0])
            for r in rows
        ]
        if not chosen:
            return []  # deleted since the page was read
        triples = ", ".join("(?, ?, ?)" for _ in chosen)
        records = [
            _record(r)
            for r in self._rows(
                f"WITH page(owner, name, version) AS (VALUES {triples}) "
                "SELECT v.*, n.public FROM page JOIN adapter_versions v ON v.owner = page.owner "
                "AND v.name = page.name AND v.version = page.version "
                "JOIN adapter_names n ON n.owner = v.owner AND n.name = v.name",
                tuple(part for triple in chosen for part in triple),
            )
        ]
        order = {pair: i for i, pair in enumerate(names)}
        return sorted(records, key=lambda r: order[(r.owner, r.name)])

    def list_versions(self, owner: str, name: str, size: int, after: int) -> list[AdapterRecord]:
        return self._adapters(
            "WHERE v.owner=? AND v.name=? AND v.version > ? ORDER BY v.version LIMIT ?",
            (owner, name, after, size),
        )

    # ---- evaluations ----
    def add_evaluations(self, record: AdapterRecord, results: list[tuple[str, float]]) -> None:
        now = int(time.time())
        key = (record.owner, record.name, record.version)
        with self._db.transaction() as tx:
            for metric, value in results:
                tx.execute(
                    "DELETE FROM adapter_evals WHERE owner=? AND name=? AND version=? AND metric=?",
                    (*key, metric),
                )
                tx.execute(
                    "INSERT INTO adapter_evals VALUES (?, ?, ?, ?, ?, ?)",
                    (*key, metric, value, now),
                )

    def evaluations(self, record: AdapterRecord) -> list[tuple[str, float]]:
        return [
            (r["metric"], float(r["value"]))
            for r in self._rows(
                "SELECT metric, value FROM adapter_evals WHERE owner=? AND name=? "
                "AND version=? ORDER BY metric",
                (record.owner, record.name, record.version),
            )
        ]

    def _drop_unreferenced(self, digest: str) -> None:
        """Remove a digest's folder once no row names it (caller holds its digest lock)."""
        if not self._rows("SELECT 1 FROM adapter_versions WHERE digest=? LIMIT 1", (digest,)):
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
