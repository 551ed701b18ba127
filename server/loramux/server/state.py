"""What every transport's handlers share: settings, engine, registry, keys, gate, rates,
metrics.

The gRPC servicers and the OpenAI-compatible HTTP front both hold one `ServerState`, so a
tenant's quota, its concurrency slots and the drain switch are the same whichever way a
request arrives.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from loramux.core.config import Settings
from loramux.core.errors import Unavailable
from loramux.server.adapters import AdapterSpec
from loramux.server.engine import Engine
from loramux.server.metrics import Metrics
from loramux.server.rates import RateLimiter
from loramux.server.registry import AdapterRecord, Registry
from loramux.server.tenants import Authenticator, ConcurrencyGate


@dataclass
class ServerState:
    """What the handlers share, and the count of calls in flight (for draining)."""

    settings: Settings
    engine: Engine
    registry: Registry
    auth: Authenticator
    gate: ConcurrencyGate
    metrics: Metrics
    rates: RateLimiter = field(default_factory=RateLimiter)  # defaults: no limit
    draining: bool = False
    inflight: int = 0
    _idle: threading.Condition = field(default_factory=threading.Condition, repr=False)

    @contextmanager
    def tracked(self) -> Iterator[None]:
        """Count one LoRAMux call while it runs; refuse new ones once draining started."""
        with self._idle:
            if self.draining:
                raise Unavailable(None, "the server is draining; retry on another replica")
            self.inflight += 1
        try:
            yield
        finally:
            with self._idle:
                self.inflight -= 1
                self._idle.notify_all()

    def start_draining(self) -> None:
        with self._idle:
            self.draining = True

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no call is in flight; False when `timeout` passed first."""
        with self._idle:
            return self._idle.wait_for(lambda: self.inflight == 0, timeout)


def spec_from_record(record: AdapterRecord) -> AdapterSpec:
    return AdapterSpec(
        rank=record.rank,
        alpha=record.alpha,
        use_rslora=record.use_rslora,
        target_modules=record.target_modules,
        size_bytes=record.size_bytes,
        base_model_name_or_path=None,
        scaling=0.0,
        modules=0,
    )


def register_record(state: ServerState, record: AdapterRecord) -> None:
    """Make a stored adapter known to the engine (files were checked when stored)."""
    state.engine.adapters.register(
        record.engine_id, state.registry.path_of(record), spec=spec_from_record(record)
    )
