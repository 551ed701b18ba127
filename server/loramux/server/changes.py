"""Acting on registry changes that other replicas made.

Lookups (keys, adapters, public flags, quotas) read the database on every call, so an
upload, publish or key revocation on one replica holds on every other at once. What a
replica keeps for itself is its engine's adapter table: device slots and CPU copies of
adapters it served. The watcher makes those follow the registry: when the change counter
moves (woken by PostgreSQL's NOTIFY, or at the latest after one poll interval), every
adapter the engine knows that no registry row names any more (deleted, or replaced under
its name by other files) is unregistered, which evicts it from its device slot as soon as
no running request holds it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable

from loramux.core.errors import NotFound
from loramux.server.adapter_store import AdapterStore
from loramux.server.registry import Registry

log = logging.getLogger(__name__)


class RegistryWatcher:
    """A thread that calls `on_change()` after each change of the registry's counter."""

    def __init__(
        self, registry: Registry, on_change: Callable[[], object], poll_seconds: float
    ) -> None:
        self._registry = registry
        self._on_change = on_change
        self._poll_seconds = poll_seconds
        self._stop = threading.Event()
        self._seen: int | None = None
        self._thread = threading.Thread(target=self._run, name="registry-watcher", daemon=True)

    def start(self) -> RegistryWatcher:
        self._seen = self._registry.version()
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._registry.wait_for_change(self._poll_seconds)
                if self._stop.is_set():
                    return
                version = self._registry.version()
                if version != self._seen:
                    self._on_change()
                    self._seen = version
            except Exception:  # the database is down or restarting: try again next interval
                log.warning("registry watcher: cannot read the registry", exc_info=True)
                self._stop.wait(self._poll_seconds)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def forget_removed_adapters(registry: Registry, store: AdapterStore) -> list[str]:
    """Unregister every adapter the engine knows that no registry row names; their ids.

    The engine's ids are read before the rows: an adapter stored (and registered) after
    that read is not in the list, and one registered before it was committed before, so
    its row is among those read next. A fresh upload is never dropped.
    """
    known = list(store.stats())
    live = {record.engine_id for record in registry.all_adapters()}
    gone = [adapter_id for adapter_id in known if adapter_id not in live]
    for adapter_id in gone:
        with contextlib.suppress(NotFound):  # unregistered meanwhile, through this replica
            store.unregister(adapter_id)
    if gone:
        log.info("registry: %d adapters removed by other replicas: %s", len(gone), gone)
    return gone
