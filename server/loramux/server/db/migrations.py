"""Versioned schema migrations: one list for every backend, applied in order at start.

Each migration is a numbered tuple of statements in the SQL both SQLite and PostgreSQL
accept (BIGINT and DOUBLE PRECISION are SQLite integer and real columns; booleans are 0/1
integers). `schema_migrations` records which have run. A replica takes the schema lock
first, so two replicas starting together migrate once; a database migrated by a newer
LoRAMux is refused rather than misread.

Migration 1 uses IF NOT EXISTS so a data dir from before migrations (same tables, no
`schema_migrations`) is adopted as it is.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from loramux.core.errors import FailedPrecondition
from loramux.server.db import Database

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "tenants, API keys and adapters",
        (
            """CREATE TABLE IF NOT EXISTS tenants (
                name TEXT PRIMARY KEY,
                admin INTEGER NOT NULL DEFAULT 0,
                max_concurrent BIGINT NOT NULL,
                max_queued BIGINT NOT NULL,
                max_adapters BIGINT NOT NULL,
                max_bytes BIGINT NOT NULL,
                created_at BIGINT NOT NULL
            )""",
            """CREATE TABLE IF NOT EXISTS api_keys (
                key_id TEXT PRIMARY KEY,
                tenant TEXT NOT NULL REFERENCES tenants(name),
                key_hash TEXT NOT NULL UNIQUE,
                created_at BIGINT NOT NULL,
                revoked INTEGER NOT NULL DEFAULT 0
            )""",
            """CREATE TABLE IF NOT EXISTS adapters (
                owner TEXT NOT NULL,
                name TEXT NOT NULL,
                digest TEXT NOT NULL,
                source TEXT NOT NULL,
                repo_id TEXT,
                revision TEXT,
                sha256 TEXT NOT NULL,
                rank BIGINT NOT NULL,
                alpha DOUBLE PRECISION NOT NULL,
                use_rslora INTEGER NOT NULL,
                target_modules TEXT NOT NULL,
                size_bytes BIGINT NOT NULL,
                public INTEGER NOT NULL DEFAULT 0,
                created_at BIGINT NOT NULL,
                PRIMARY KEY (owner, name)
            )""",
        ),
    ),
    Migration(
        2,
        "change counter watched by every replica; index for digest lookups",
        (
            """CREATE TABLE registry_state (
                id INTEGER PRIMARY KEY CHECK (id = 1),
                version BIGINT NOT NULL
            )""",
            "INSERT INTO registry_state (id, version) VALUES (1, 0)",
            "CREATE INDEX adapters_digest ON adapters (digest)",
        ),
    ),
    Migration(
        3,
        "tenant default is no admin (the implicit development mode of older versions made it "
        "one, so a key made for it to keep its adapters was an admin key)",
        ("UPDATE tenants SET admin = 0 WHERE name = 'default'",),
    ),
    Migration(
        4,
        "adapter versions and aliases: every adapter becomes v1 of its name, the name's "
        "'default' alias pointing at it; evaluation results per version",
        (
            """CREATE TABLE adapter_names (
                owner TEXT NOT NULL,
                name TEXT NOT NULL,
                public INTEGER NOT NULL DEFAULT 0,
                created_at BIGINT NOT NULL,
                next_version BIGINT NOT NULL,
                PRIMARY KEY (owner, name)
            )""",
            """CREATE TABLE adapter_versions (
                owner TEXT NOT NULL,
                name TEXT NOT NULL,
                version BIGINT NOT NULL,
                digest TEXT NOT NULL,
                source TEXT NOT NULL,
                repo_id TEXT,
                revision TEXT,
                sha256 TEXT NOT NULL,
                rank BIGINT NOT NULL,
                alpha DOUBLE PRECISION NOT NULL,
                use_rslora INTEGER NOT NULL,
                target_modules TEXT NOT NULL,
                size_bytes BIGINT NOT NULL,
                created_at BIGINT NOT NULL,
                description TEXT NOT NULL DEFAULT '',
                tags TEXT NOT NULL DEFAULT '[]',
                base_model TEXT NOT NULL DEFAULT '',
                PRIMARY KEY (owner, name, version)
            )""",
            """CREATE TABLE adapter_aliases (
                owner TEXT NOT NULL,
                name TEXT NOT NULL,
                alias TEXT NOT NULL,
                targets TEXT NOT NULL,
                previous TEXT,
                updated_at BIGINT NOT NULL,
                PRIMARY KEY (owner, name, alias)
            )""",
            """CREATE TABLE adapter_evals (
                owner TEXT NOT NULL,
                name TEXT NOT NULL,
                version BIGINT NOT NULL,
                metric TEXT NOT NULL,
                value DOUBLE PRECISION NOT NULL,
                created_at BIGINT NOT NULL,
                PRIMARY KEY (owner, name, version, metric)
            )""",
            "INSERT INTO adapter_names (owner, name, public, created_at, next_version) "
            "SELECT owner, name, public, created_at, 2 FROM adapters",
            "INSERT INTO adapter_versions (version, owner, name, digest, source, repo_id, "
            "revision, sha256, rank, alpha, use_rslora, target_modules, size_bytes, created_at) "
            "SELECT 1, owner, name, digest, source, repo_id, revision, sha256, rank, alpha, "
            "use_rslora, target_modules, size_bytes, created_at FROM adapters",
            "INSERT INTO adapter_aliases (owner, name, alias, targets, previous, updated_at) "
            "SELECT owner, name, 'default', '[[1, 100]]', NULL, created_at FROM adapters",
            "DROP TABLE adapters",
            "CREATE INDEX adapter_versions_digest ON adapter_versions (digest)",
            # Listing pages of public adapters in (owner, name) order without a scan.
            "CREATE INDEX adapter_names_public ON adapter_names (public, owner, name)",
            """CREATE TABLE registry_secret (
                id INTEGER PRIMARY KEY CHECK (id = 1),
                secret TEXT NOT NULL
            )""",
        ),
    ),
    Migration(
        5,
        "per-tenant rate budgets: requests and generated tokens per minute (0: the server's)",
        (
            "ALTER TABLE tenants ADD COLUMN requests_per_minute BIGINT NOT NULL DEFAULT 0",
            "ALTER TABLE tenants ADD COLUMN tokens_per_minute BIGINT NOT NULL DEFAULT 0",
        ),
    ),
)
LATEST = MIGRATIONS[-1].version


def migrate(database: Database) -> int:
    """Bring the schema to `LATEST`; the version it had before."""
    with database.schema_transaction() as tx:
        tx.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                version INTEGER PRIMARY KEY,
                description TEXT NOT NULL,
                applied_at BIGINT NOT NULL
            )"""
        )
        row = tx.fetch("SELECT COALESCE(MAX(version), 0) AS v FROM schema_migrations")[0]
        current = int(row["v"])
        if current > LATEST:
            raise FailedPrecondition(
                "registry",
                f"the registry's schema is at version {current}, newer than this LoRAMux "
                f"knows ({LATEST}); upgrade LoRAMux",
            )
        for migration in MIGRATIONS:
            if migration.version <= current:
                continue
            for statement in migration.statements:
                tx.execute(statement)
            tx.execute(
                "INSERT INTO schema_migrations (version, description, applied_at) VALUES (?, ?, ?)",
                (migration.version, migration.description, int(time.time())),
            )
            log.info(
                "registry (%s): migrated to schema %d: %s",
                database.kind,
                migration.version,
                migration.description,
            )
    return current
