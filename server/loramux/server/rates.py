"""Per-tenant rates: generation requests and generated tokens per window (a minute).

Gateways in front of LLM servers give each key a request and a token budget per minute;
LoRAMux knows its tenants, so it does the same itself, for both transports (the check is
in `GenerationCall`, which gRPC and HTTP share). Budgets: the tenant's own (set through the
admin API, `TenantQuota.requests_per_minute` / `tokens_per_minute`) or else the server's
defaults (`--tenant-requests-per-minute`, `--tenant-tokens-per-minute`); 0 is no limit.

Counted per replica, in memory: a tenant's requests spread over N replicas may make N
times its budget. Sharing the count through the registry would put a database write in
every request's path (and a PostgreSQL round trip per token budget update), for a limit
that a load balancer's even spread already divides well; docs/security.md says so.

A fixed window per tenant, opened by its first request: a request is refused while the
window already holds the budget's requests, or its generated tokens reached the token
budget (tokens are counted when a request finishes, so one long request may go over; the
next waits). The refusal carries the seconds until the window closes.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loramux.core.errors import RateLimited

if TYPE_CHECKING:
    from loramux.server.tenants import Principal


@dataclass
class _Window:
    started: float
    requests: int = 0
    tokens: int = 0


class RateLimiter:
    """Each tenant's requests and tokens in its current window; thread-safe."""

    def __init__(
        self,
        requests: int = 0,
        tokens: int = 0,
        window: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.requests = requests  # default budgets per window; 0: none
        self.tokens = tokens
        self.window = window
        self._clock = clock
        self._lock = threading.Lock()
        self._windows: dict[str, _Window] = {}

    def _current(self, tenant: str, now: float) -> _Window:
        window = self._windows.get(tenant)
        if window is None or now - window.started >= self.window:
            window = self._windows[tenant] = _Window(now)
        return window

    def admit(self, principal: Principal) -> None:
        """Count one generation request of the caller; RateLimited over a budget."""
        quota, tenant = principal.quota, principal.tenant
        requests = quota.requests_per_minute or self.requests
        tokens = quota.tokens_per_minute or self.tokens
        if not requests and not tokens:
            return
        with self._lock:
            now = self._clock()
            window = self._current(tenant, now)
            over = None
            if requests and window.requests >= requests:
                over = f"{window.requests} requests (--tenant-requests-per-minute {requests})"
            elif tokens and window.tokens >= tokens:
                over = f"{window.tokens} generated tokens (--tenant-tokens-per-minute {tokens})"
            if over is not None:
                wait = max(window.started + self.window - now, 0.0)
                raise RateLimited(
                    None,
                    f"tenant {tenant!r} made {over} in this window of {self.window:g} s; "
                    f"retry in {math.ceil(wait)} s",
                    retry_after=wait,
                )
            window.requests += 1

    def spend(self, tenant: str, tokens: int) -> None:
        """Add a finished request's generated tokens to the tenant's current window."""
        if not tokens:
            return
        with self._lock:
            if tenant in self._windows:
                self._current(tenant, self._clock()).tokens += tokens
