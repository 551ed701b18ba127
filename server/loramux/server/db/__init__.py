"""The registry's database, one backend per kind chosen once at start.

`Database` is what the registry needs from a database and nothing more: reads, write
transactions that every replica sees in one order, a lock that makes a digest's folder and
its rows change together, and a way to learn that another replica changed something. Two
backends implement it:

* `sqlite` (the default): one file in the data dir. Replicas on one host that share the
  data dir share it (SQLite locks the file); replicas on different hosts cannot (file
  locks over network file systems are not reliable), so they need
* `postgres` (`--registry postgresql://...`): one database for a fleet of replicas, with
  LISTEN/NOTIFY so a change reaches every replica at once.

Every write transaction bumps one change counter (`registry_state.version`) first. That
row lock serialises writers across replicas (so a quota counted inside the transaction
holds across replicas), and a replica learns of others' changes by watching the counter.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

Row = Mapping[str, Any]
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


class Transaction(Protocol):
    """Statements inside one transaction; SQL uses `?` placeholders on every backend."""

    def execute(self, sql: str, args: Sequence[object] = ()) -> int:
        """Run a statement; the number of rows it changed."""
        ...

    def fetch(self, sql: str, args: Sequence[object] = ()) -> list[Row]: ...


class Database(ABC):
    """What the registry needs from a database (see the module docstring)."""

    kind: str
    integrity_errors: tuple[type[BaseException], ...]  # a UNIQUE or PRIMARY KEY violation

    @abstractmethod
    def rows(self, sql: str, args: Sequence[object] = ()) -> list[Row]:
        """A read outside any write transaction."""

    @abstractmethod
    def transaction(self, *, bump: bool = True) -> AbstractContextManager[Transaction]:
        """A write transaction; with `bump`, the change counter goes up first (see above)."""

    @abstractmethod
    def schema_transaction(self) -> AbstractContextManager[Transaction]:
        """A transaction that holds the schema lock: one replica migrates at a time."""

    @abstractmethod
    def digest_lock(self, digest: str) -> AbstractContextManager[None]:
        """Held while a content-addressed folder and the rows naming it change together."""

    @abstractmethod
    def wait_for_change(self, timeout: float) -> None:
        """Return when another connection may have committed a change, or after `timeout`."""

    @abstractmethod
    def close(self) -> None: ...

    def describe(self) -> str:
        """For logs: the backend and where it is, without credentials."""
        return self.kind


def open_database(url: str, home: Path) -> Database:
    """`sqlite` (a file in `home`) or a `postgresql://` URL; schema migrated to the latest."""
    from loramux.server.db.migrations import migrate

    database: Database
    if url.startswith(POSTGRES_SCHEMES):
        from loramux.server.db.postgres import PostgresDatabase

        database = PostgresDatabase(url)
    elif url == "sqlite":
        from loramux.server.db.sqlite import SqliteDatabase

        database = SqliteDatabase(Path(home) / "registry.sqlite3")
    else:
        raise ValueError(f"registry must be 'sqlite' or a postgresql:// URL, got {url!r}")
    try:
        migrate(database)
    except BaseException:
        database.close()
        raise
    return database


def placeholders_to_format(sql: str) -> str:
    """`?` placeholders as psycopg's `%s` (a literal `%` doubled)."""
    return sql.replace("%", "%%").replace("?", "%s")


__all__ = [
    "POSTGRES_SCHEMES",
    "Database",
    "Row",
    "Transaction",
    "open_database",
    "placeholders_to_format",
]
