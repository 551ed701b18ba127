"""Who is calling, and how much they may use.

Keys arrive as `authorization: Bearer <key>` metadata, are hashed, and map to a tenant
through the registry (bootstrap admin keys from the settings or a keys file are compared
by hash too). The server refuses to start without an admin key, so nobody can reach it
anonymously by accident; development mode (every caller an admin, no key) exists only
when asked for with `--dev`, never because the last key was revoked.
"""

from __future__ import annotations

import enum
import hmac
import stat
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from loramux.core.config import Settings
from loramux.core.errors import (
    Cancelled,
    FailedPrecondition,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)
from loramux.server.registry import Quota, Registry, TenantRecord, hash_key

DEV_TENANT = "default"
ADMIN_TENANT = "admin"
MAX_KEYS_FILE_BYTES = 1 << 20

NO_ADMIN_KEY = (
    "no admin API key is configured, and this server does not serve anonymous callers. "
    "Create a key file readable only by you, then start with it:\n"
    "  (umask 077; python3 -c \"import secrets; print('lmx_' + secrets.token_urlsafe(32))\" "
    "> admin-keys)\n"
    "  loramux serve --admin-keys-file admin-keys     (or LORAMUX_ADMIN_KEYS_FILE=admin-keys)\n"
    "Or give keys in LORAMUX_ADMIN_KEYS (comma separated). For a local development server "
    "without keys, where every caller is an admin, start with --dev (binds 127.0.0.1)."
)


def read_admin_keys_file(path: Path) -> list[str]:
    """Admin keys from `path`: one per line; blank lines and lines starting '#' are skipped.

    Keys in a file do not show in `ps` or the process environment. A file that other users
    may read (or write) is refused, as ssh refuses such a private key: chmod 600 (or 640/440
    for a group such as a container's secret mount).
    """
    field = "admin_keys_file"
    try:
        info = path.stat()
    except OSError as exc:
        raise FailedPrecondition(field, f"cannot read {path}: {exc.strerror}") from exc
    if not stat.S_ISREG(info.st_mode):
        raise FailedPrecondition(field, f"{path} is not a regular file")
    if info.st_mode & (stat.S_IROTH | stat.S_IWOTH):
        raise FailedPrecondition(
            field,
            f"{path} is readable or writable by every user (mode {stat.S_IMODE(info.st_mode):o}); "
            f"run `chmod 600 {path}`",
        )
    if info.st_size > MAX_KEYS_FILE_BYTES:
        raise FailedPrecondition(field, f"{path} is over {MAX_KEYS_FILE_BYTES} bytes")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise FailedPrecondition(field, f"cannot read {path} as UTF-8 text: {exc}") from exc
    keys = [line.strip() for line in text.splitlines()]
    keys = [k for k in keys if k and not k.startswith("#")]
    for number, key in enumerate(keys, 1):
        if any(c.isspace() for c in key):
            raise FailedPrecondition(field, f"{path}: key {number} contains whitespace")
    if not keys:
        raise FailedPrecondition(field, f"{path} holds no key (one key per line)")
    return keys


def bootstrap_admin_keys(settings: Settings) -> list[str]:
    """Every bootstrap admin key: `--admin-keys` / LORAMUX_ADMIN_KEYS and the keys file."""
    keys = [k for k in settings.admin_keys if k]
    if settings.admin_keys_file is not None:
        keys += read_admin_keys_file(settings.admin_keys_file)
    return keys


@dataclass(frozen=True)
class Principal:
    tenant: str
    admin: bool
    quota: Quota


class Authenticator:
    """Maps a call's key to its tenant; decided once at start, from the settings alone.

    `dev` (only from `--dev`): every caller is tenant `default` with admin rights, no key
    needed. The tenant row `default` itself is NOT an admin, so a key later created for it
    (to keep using its adapters once keys are required) grants a tenant's rights only.
    Without `dev`, starting needs an admin key: a bootstrap key or an admin tenant's key in
    the registry; otherwise FailedPrecondition with NO_ADMIN_KEY.
    """

    def __init__(self, registry: Registry, admin_keys: list[str], *, dev: bool = False) -> None:
        self.registry = registry
        self._admin_hashes = [hash_key(k) for k in admin_keys if k]
        self.dev_mode = dev
        if dev:  # Settings.validate refuses --dev together with admin keys
            registry.ensure_tenant(DEV_TENANT, admin=False)
            return
        if not self._admin_hashes and not registry.has_admin_keys():
            raise FailedPrecondition("admin_keys", NO_ADMIN_KEY)
        if self._admin_hashes:
            registry.ensure_tenant(ADMIN_TENANT, admin=True)

    def authenticate(self, metadata: Mapping[str, str]) -> Principal:
        if self.dev_mode:
            dev = self.registry.tenant(DEV_TENANT)
            return Principal(tenant=dev.name, admin=True, quota=dev.quota)
        header = metadata.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthenticated("authorization", "send metadata `authorization: Bearer <key>`")
        key = key.strip()
        digest = hash_key(key)
        if any(hmac.compare_digest(digest, h) for h in self._admin_hashes):
            return self._principal(self.registry.tenant(ADMIN_TENANT))
        tenant = self.registry.tenant_for_key(key)
        if tenant is None:
            raise Unauthenticated("authorization", "unknown or revoked API key")
        return self._principal(tenant)

    @staticmethod
    def _principal(tenant: TenantRecord) -> Principal:
        return Principal(tenant=tenant.name, admin=tenant.admin, quota=tenant.quota)

    @staticmethod
    def require_admin(principal: Principal) -> None:
        if not principal.admin:
            raise PermissionDenied(None, "this call needs an admin key")


class Front(enum.StrEnum):
    """The transport a call came in by (both served from an event loop)."""

    GRPC = "grpc"
    HTTP = "http"


class CallHold:
    """One call counted against its tenant (and its front) until `release()`.

    Not a context manager only: an HTTP stream is counted from its admission on the event
    loop until its response has been sent, which ends on another path than the one that
    began it. `release()` may be called more than once; only the first counts.
    """

    def __init__(self, gate: ConcurrencyGate, tenant: str, front: Front) -> None:
        self._gate, self.tenant, self.front = gate, tenant, front
        self._released = False

    def release(self) -> None:
        with self._gate._calls_lock:
            if self._released:
                return
            self._released = True
            calls = self._gate._calls
            calls[self.tenant] -= 1
            if not calls[self.tenant]:
                del calls[self.tenant]


class ConcurrencyGate:
    """Per-tenant limit on requests generating at once, with a bounded wait line; and the
    per-tenant count of calls in flight (`hold`).

    Waiters hold no thread: each waits as a callback (`enter`, `retry`, aio.py), and leaves
    the line as soon as its caller goes away (`wake()`, then `retry` with `gone`), so a
    cancelled call never holds a place in the line nor, later, a slot nobody reads from.
    """

    def __init__(self, max_calls: int = 0) -> None:
        self._lock = threading.Lock()
        self._running: dict[str, int] = {}
        self._waiting: dict[str, int] = {}
        self.max_calls = max_calls  # per tenant, any method, both fronts together; 0: no limit
        self._calls_lock = threading.Lock()
        self._calls: dict[str, int] = {}
        # Waiters without a thread (`enter`), per tenant: called when a slot frees.
        self._wakers: dict[str, set[Callable[[], None]]] = {}

    def hold(self, tenant: str, front: Front) -> CallHold:
        """Count one call of `tenant`; refuse it past `max_calls`.

        One count per tenant, whichever transport carried the call. Both fronts serve
        calls from an event loop: a call holds a thread (of --grpc-workers or
        --http-workers) only while it does blocking work (authentication, admission, a
        unary body, an upload), never while it waits for a slot, for tokens or for a slow
        reader. Capping each tenant below gRPC's pool leaves threads for every other
        tenant's blocking work however one tenant floods, over either front or both; the
        health services need none. A call over the limit is refused at once, before it
        waits for anything.
        """
        with self._calls_lock:
            held = self._calls.get(tenant, 0)
            if self.max_calls and held >= self.max_calls:
                raise ResourceExhausted(
                    None,
                    f"tenant {tenant!r} has {held} calls in flight over gRPC and HTTP, the most "
                    "one tenant may have (--tenant-max-calls); retry when some have finished",
                )
            self._calls[tenant] = held + 1
        return CallHold(self, tenant, front)

    @contextmanager
    def call(self, tenant: str, front: Front = Front.GRPC) -> Iterator[None]:
        """`hold` for the length of a block (a gRPC call: its handler's task)."""
        held = self.hold(tenant, front)
        try:
            yield
        finally:
            held.release()

    def calls(self) -> dict[str, int]:
        """Calls in flight per tenant (those counted by `call`)."""
        with self._calls_lock:
            return dict(self._calls)

    def _has_room(self, principal: Principal) -> bool:
        return self._running.get(principal.tenant, 0) < principal.quota.max_concurrent

    def _join_line(self, principal: Principal) -> None:
        """Count one more waiter of the tenant, or refuse it when its wait line is full."""
        quota, tenant = principal.quota, principal.tenant
        if self._waiting.get(tenant, 0) >= quota.max_queued:
            raise ResourceExhausted(
                None,
                f"tenant {tenant!r} has {quota.max_concurrent} requests running and "
                f"{quota.max_queued} queued (its quota)",
            )
        self._waiting[tenant] = self._waiting.get(tenant, 0) + 1

    def enter(self, principal: Principal, waker: Callable[[], None]) -> bool:
        """Take a free slot (True, release with `leave`), or join the tenant's wait line
        (False: `waker` is then called, from any thread, whenever a slot of the tenant may
        have freed or a waiter may have gone; call `retry`), or refuse with
        ResourceExhausted when the line is full."""
        with self._lock:
            if self._has_room(principal):
                self._running[principal.tenant] = self._running.get(principal.tenant, 0) + 1
                return True
            self._join_line(principal)
            self._wakers.setdefault(principal.tenant, set()).add(waker)
            return False

    def retry(self, principal: Principal, waker: Callable[[], None], gone: bool) -> bool:
        """A waiter of `enter` checks again: True when it took a free slot (it left the
        line); with `gone` (its caller went away) it leaves the line, raising Cancelled."""
        tenant = principal.tenant
        with self._lock:
            if not gone and not self._has_room(principal):
                return False
            self._waiting[tenant] -= 1
            wakers = self._wakers[tenant]
            wakers.discard(waker)
            if not wakers:
                del self._wakers[tenant]
            if gone:
                raise Cancelled(None, "the caller went away while queued")
            self._running[tenant] = self._running.get(tenant, 0) + 1
            return True

    def leave(self, tenant: str) -> None:
        """Free a slot taken by `enter` or `retry`; wakes the tenant's waiters."""
        with self._lock:
            self._running[tenant] -= 1
            wakers = list(self._wakers.get(tenant, ()))
        for waker in wakers:
            waker()

    def wake(self) -> None:
        """Make every waiter re-check whether its caller went away."""
        with self._lock:
            wakers = [w for line in self._wakers.values() for w in line]
        for waker in wakers:
            waker()

    def in_flight(self) -> dict[str, int]:
        with self._lock:
            return dict(self._running)

    def waiting(self) -> dict[str, int]:
        with self._lock:
            return {t: n for t, n in self._waiting.items() if n}
