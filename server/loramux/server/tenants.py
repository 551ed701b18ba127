"""Who is calling, and how much they may use.

Keys arrive as `authorization: Bearer <key>` metadata, are hashed, and map to a tenant
through the registry (bootstrap admin keys from the settings are compared by hash too).
With no key configured anywhere at start, the server runs in an explicit single-tenant
development mode: every caller is the admin tenant `default`.
"""

from __future__ import annotations

import hmac
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from loramux.core.errors import (
    Cancelled,
    DeadlineExceeded,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)
from loramux.server.registry import Quota, Registry, TenantRecord, hash_key

DEV_TENANT = "default"
ADMIN_TENANT = "admin"


@dataclass(frozen=True)
class Principal:
    tenant: str
    admin: bool
    quota: Quota


class Authenticator:
    def __init__(self, registry: Registry, admin_keys: list[str]) -> None:
        self.registry = registry
        self._admin_hashes = [hash_key(k) for k in admin_keys if k]
        self.dev_mode = not self._admin_hashes and not registry.has_keys()
        if self._admin_hashes:
            registry.ensure_tenant(ADMIN_TENANT, admin=True)
        if self.dev_mode:
            registry.ensure_tenant(DEV_TENANT, admin=True)

    def authenticate(self, metadata: Mapping[str, str]) -> Principal:
        if self.dev_mode:
            return self._principal(self.registry.tenant(DEV_TENANT))
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


class ConcurrencyGate:
    """Per-tenant limit on requests generating at once, with a bounded wait line.

    A waiter leaves the line as soon as its deadline passes or its caller goes away
    (`abandoned` set, then `wake()`), so a cancelled call never holds a place in the line
    nor, later, a slot that nobody reads from.
    """

    def __init__(self, max_calls: int = 0) -> None:
        self._lock = threading.Condition()
        self._running: dict[str, int] = {}
        self._waiting: dict[str, int] = {}
        self.max_calls = max_calls  # per tenant, any method; 0: no limit
        self._calls_lock = threading.Lock()
        self._calls: dict[str, int] = {}

    @contextmanager
    def call(self, tenant: str) -> Iterator[None]:
        """Count one call of `tenant` while it holds a server thread; refuse past `max_calls`.

        With a thread-per-call server, every call (a generation waiting for a slot, a slow
        reader's stream, an upload) holds a worker thread until it ends. Capping each
        tenant below the worker pool leaves threads for every other tenant and for health
        checks however one tenant floods; the call over the cap is refused at once, before
        it waits for anything.
        """
        with self._calls_lock:
            held = self._calls.get(tenant, 0)
            if self.max_calls and held >= self.max_calls:
                raise ResourceExhausted(
                    None,
                    f"tenant {tenant!r} has {held} calls in flight, the most one tenant may "
                    "have (--tenant-max-calls); retry when some have finished",
                )
            self._calls[tenant] = held + 1
        try:
            yield
        finally:
            with self._calls_lock:
                self._calls[tenant] -= 1
                if not self._calls[tenant]:
                    del self._calls[tenant]

    def calls(self) -> dict[str, int]:
        """Calls in flight per tenant (those counted by `call`)."""
        with self._calls_lock:
            return dict(self._calls)

    @contextmanager
    def slot(
        self,
        principal: Principal,
        timeout: float | None,
        abandoned: threading.Event | None = None,
    ) -> Iterator[None]:
        quota, tenant = principal.quota, principal.tenant
        gone = abandoned or threading.Event()
        with self._lock:
            if self._running.get(tenant, 0) >= quota.max_concurrent:
                if self._waiting.get(tenant, 0) >= quota.max_queued:
                    raise ResourceExhausted(
                        None,
                        f"tenant {tenant!r} has {quota.max_concurrent} requests running and "
                        f"{quota.max_queued} queued (its quota)",
                    )
                self._waiting[tenant] = self._waiting.get(tenant, 0) + 1
                try:
                    free = self._lock.wait_for(
                        lambda: (
                            gone.is_set() or self._running.get(tenant, 0) < quota.max_concurrent
                        ),
                        timeout,
                    )
                finally:
                    self._waiting[tenant] -= 1
                if gone.is_set():
                    raise Cancelled(None, "the caller went away while queued")
                if not free:
                    raise DeadlineExceeded(
                        None, f"tenant {tenant!r}: no free slot before the deadline"
                    )
            self._running[tenant] = self._running.get(tenant, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                self._running[tenant] -= 1
                self._lock.notify_all()

    def wake(self) -> None:
        """Make waiters re-check their `abandoned` events."""
        with self._lock:
            self._lock.notify_all()

    def in_flight(self) -> dict[str, int]:
        with self._lock:
            return dict(self._running)

    def waiting(self) -> dict[str, int]:
        with self._lock:
            return {t: n for t, n in self._waiting.items() if n}
