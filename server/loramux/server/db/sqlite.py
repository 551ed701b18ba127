"""The embedded default: one SQLite file, WAL mode, every write durable before it returns.

Processes sharing the file (replicas on one host with one data dir) serialise writes
through SQLite's own file lock (`BEGIN IMMEDIATE`) and a folder-and-rows change through an
`flock` on a file next to it. There is no notification between processes: a replica
learns of another's change by polling the change counter.
"""

from __future__ import annotations

import fcntl
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from loramux.server.db import Database, Row

BUSY_TIMEOUT_SECONDS = 30.0  # another process's write transaction: wait, do not fail


class _SqliteTransaction:
    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection

    def execute(self, sql: str, args: Sequence[object] = ()) -> int:
        return self._connection.execute(sql, tuple(args)).rowcount

    def fetch(self, sql: str, args: Sequence[object] = ()) -> list[Row]:
        cursor = self._connection.execute(sql, tuple(args))
        cursor.row_factory = sqlite3.Row
        return list(cursor.fetchall())


class SqliteDatabase(Database):
    kind = "sqlite"
    integrity_errors = (sqlite3.IntegrityError,)

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._connection = sqlite3.connect(
            self.path,
            check_same_thread=False,
            isolation_level=None,
            timeout=BUSY_TIMEOUT_SECONDS,
        )
        self._set_wal()
        self._connection.execute("PRAGMA synchronous=FULL")
        self._lock_file = self.path.with_name(self.path.name + ".lock")

    def _set_wal(self) -> None:
        """Switch to WAL, retrying while another replica holds the file.

        The switch needs the database to itself and SQLite answers "database is locked" at
        once instead of waiting in its busy handler, so two replicas starting together on
        one file (tests/test_fleet.py) failed now and then; retry until the busy timeout.
        """
        deadline = time.monotonic() + BUSY_TIMEOUT_SECONDS
        while True:
            try:
                self._connection.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                self._closed.wait(0.05)  # back off before the next try

    def describe(self) -> str:
        return f"sqlite ({self.path})"

    def rows(self, sql: str, args: Sequence[object] = ()) -> list[Row]:
        with self._lock:
            return _SqliteTransaction(self._connection).fetch(sql, args)

    @contextmanager
    def transaction(self, *, bump: bool = True) -> Iterator[_SqliteTransaction]:
        with self._lock:
            self._connection.execute("BEGIN IMMEDIATE")
            try:
                tx = _SqliteTransaction(self._connection)
                if bump:
                    tx.execute("UPDATE registry_state SET version = version + 1 WHERE id = 1")
                yield tx
            except BaseException:
                self._connection.execute("ROLLBACK")
                raise
            self._connection.execute("COMMIT")

    def schema_transaction(self) -> AbstractContextManager[_SqliteTransaction]:
        return self.transaction(bump=False)  # BEGIN IMMEDIATE is SQLite's one writer lock

    @contextmanager
    def digest_lock(self, digest: str) -> Iterator[None]:
        """One lock for every digest: changes of folders are rare and fast."""
        with self._lock_file.open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def wait_for_change(self, timeout: float) -> None:
        self._closed.wait(timeout)

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            self._connection.close()
