"""PostgreSQL (psycopg 3): one registry for a fleet of replicas.

Three kinds of connection, so no reader waits behind a writer of the same replica:
reads (autocommit; a few, since every call authenticates and resolves its adapter with
one or two of them), writes (one transaction at a time), and a listener that waits for
`NOTIFY loramux_registry`, sent by every write transaction and delivered at its commit,
so other replicas act on a change at once instead of at their next poll. Folder changes
take a session advisory lock on their own short-lived connection, so a replica that dies
holding one releases it with its connection. A broken connection is opened again on the
next use; while the database is unreachable calls fail with UNAVAILABLE.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import conninfo
from psycopg.rows import dict_row

from loramux.core.errors import Unavailable
from loramux.server.db import Database, Row, placeholders_to_format

CHANNEL = "loramux_registry"
LOCK_CLASS = 0x4C4D58  # "LMX": the first key of LoRAMux's two-key advisory locks
SCHEMA_LOCK = 0
CONNECT_TIMEOUT_SECONDS = 10
READERS = 4  # reads in flight at once per replica (each a round trip of well under 1 ms)


class _PostgresTransaction:
    def __init__(self, connection: psycopg.Connection[Any]) -> None:
        self._connection = connection

    def execute(self, sql: str, args: Sequence[object] = ()) -> int:
        return self._connection.execute(placeholders_to_format(sql), tuple(args)).rowcount

    def fetch(self, sql: str, args: Sequence[object] = ()) -> list[Row]:
        return list(self._connection.execute(placeholders_to_format(sql), tuple(args)).fetchall())


class _Connection:
    """One connection, opened again after it broke; used by one thread at a time."""

    def __init__(self, url: str) -> None:
        self._url = url
        self.lock = threading.Lock()
        self._connection: psycopg.Connection[Any] | None = None

    def get(self) -> psycopg.Connection[Any]:
        if self._connection is None or self._connection.closed or self._connection.broken:
            self._connection = connect(self._url)
        return self._connection

    def checked(self) -> psycopg.Connection[Any]:
        """`get()`, after a round trip: a connection the server dropped (a restart, a
        failover) shows as broken only when used, and a write must not be the first use."""
        connection = self.get()
        try:
            connection.execute("SELECT 1")
        except psycopg.OperationalError:
            connection.close()
            connection = self.get()
        return connection

    def close(self) -> None:
        with self.lock:
            if self._connection is not None:
                self._connection.close()


def connect(url: str) -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(
            url, autocommit=True, row_factory=dict_row, connect_timeout=CONNECT_TIMEOUT_SECONDS
        )
    except psycopg.OperationalError as exc:
        raise Unavailable("registry", "the registry database is unreachable") from exc


def digest_key(digest: str) -> int:
    """The second advisory-lock key of a digest (hex sha256): its first 28 bits."""
    return int(digest[:7], 16)


class PostgresDatabase(Database):
    kind = "postgres"
    integrity_errors = (psycopg.IntegrityError,)

    def __init__(self, url: str) -> None:
        self._url = url
        self._closed = threading.Event()
        self._readers: queue.LifoQueue[_Connection] = queue.LifoQueue()
        for _ in range(READERS):
            self._readers.put(_Connection(url))
        self._writer = _Connection(url)
        self._listener = _Connection(url)
        self._listening_on: object | None = None  # the connection that ran LISTEN
        first = self._readers.get()
        try:
            with first.lock:
                first.get()  # fail at start, not at the first call, when unreachable
        finally:
            self._readers.put(first)

    def describe(self) -> str:
        info = conninfo.conninfo_to_dict(self._url)
        where = f"{info.get('host', 'localhost')}:{info.get('port', 5432)}"
        return f"postgres ({info.get('user', '')}@{where}/{info.get('dbname', '')})"

    def rows(self, sql: str, args: Sequence[object] = ()) -> list[Row]:
        reader = self._readers.get()
        try:
            return self._read(reader, sql, args)
        finally:
            self._readers.put(reader)

    @staticmethod
    def _read(reader: _Connection, sql: str, args: Sequence[object]) -> list[Row]:
        with reader.lock:
            for attempt in (1, 2):
                try:
                    return _PostgresTransaction(reader.get()).fetch(sql, args)
                except psycopg.OperationalError as exc:
                    if attempt == 2:
                        raise Unavailable("registry", "the registry database failed") from exc
        raise AssertionError("unreachable")

    @contextmanager
    def transaction(self, *, bump: bool = True) -> Iterator[_PostgresTransaction]:
        with self._writer.lock:
            connection = self._writer.checked()
            try:
                with connection.transaction():
                    tx = _PostgresTransaction(connection)
                    if bump:
                        tx.execute("UPDATE registry_state SET version = version + 1 WHERE id = 1")
                        tx.execute(f"NOTIFY {CHANNEL}")
                    yield tx
            except psycopg.OperationalError as exc:
                raise Unavailable("registry", "the registry database failed") from exc

    @contextmanager
    def schema_transaction(self) -> Iterator[_PostgresTransaction]:
        with self.transaction(bump=False) as tx:
            tx.execute("SELECT pg_advisory_xact_lock(?, ?)", (LOCK_CLASS, SCHEMA_LOCK))
            yield tx

    @contextmanager
    def digest_lock(self, digest: str) -> Iterator[None]:
        with connect(self._url) as connection:
            connection.execute("SELECT pg_advisory_lock(%s, %s)", (LOCK_CLASS, digest_key(digest)))
            yield  # closing the connection releases the lock, also after an error

    def wait_for_change(self, timeout: float) -> None:
        if self._closed.is_set():
            return
        with self._listener.lock:
            try:
                connection = self._listener.get()
                if connection is not self._listening_on:
                    connection.execute(f"LISTEN {CHANNEL}")
                    self._listening_on = connection
                for _ in connection.notifies(timeout=timeout, stop_after=1):
                    pass
            except (psycopg.OperationalError, Unavailable):
                self._closed.wait(timeout)  # the next call connects and LISTENs again

    def close(self) -> None:
        self._closed.set()
        readers = []
        while not self._readers.empty():
            readers.append(self._readers.get_nowait())
        for connection in (*readers, self._writer, self._listener):
            connection.close()
