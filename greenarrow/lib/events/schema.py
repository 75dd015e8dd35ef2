"""The events database schema: numbered SQL migrations in greenarrow/sql/.

Every service that uses the database calls `migrate(conn)` when it starts.
Files are named `NNN_<what>.sql` and applied in number order, each in its own
transaction together with its row in `schema_migrations`, so a crash leaves
a migration either wholly applied or not at all. A session advisory lock
keeps two services starting together from applying the same file twice.
A migration, once released, is never edited: a change is a new file.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import resources

import psycopg

log = logging.getLogger("greenarrow.events.schema")

# pg_advisory_lock key of migrations (any constant that no other lock uses).
MIGRATION_LOCK = 0x6761_6576_6D69_6772  # "gaevmigr"
_NAME = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """The migrations shipped with the package, oldest first."""
    found = []
    for entry in resources.files("greenarrow").joinpath("sql").iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), entry.name, entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"greenarrow/sql has two migrations with one number: {versions}")
    return found


def migrate(conn: psycopg.Connection) -> list[str]:
    """Apply the migrations `conn`'s database lacks; the names of those applied.

    `conn` must not be inside a transaction; it is left outside one.
    """
    applied: list[str] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
    try:
        with conn.transaction():
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
        for migration in migrations():
            if migration.version in done:
                continue
            with conn.transaction():
                conn.execute(migration.sql)
                conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                    (migration.version, migration.name),
                )
            log.info("applied database migration %s", migration.name)
            applied.append(migration.name)
    finally:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))
    return applied
