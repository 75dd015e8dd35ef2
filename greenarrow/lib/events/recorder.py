"""The event recorder: moves events from log folders into the events table.

It follows two kinds of folder (both greenarrow.lib.core.rotating_log layouts):

* `log/delivery/<queue>/`, the processed delivery logs queue-send writes:
  each line becomes a delivery_attempt event (greenarrow.lib.events.
  delivery_attempt) -- only while that type is recorded (settings.recorded_types);
* `log/events/<source>/`, spools other producers write before they answer:
  each line is one complete event (JSON object from types.make_event),
  stored as it is. A spool's rotated file is deleted once all of it is in
  the database (spool writers never prune).

Per folder, the rows of a batch and the new read position (event_sources)
are committed in one transaction, so a crash at any point neither loses nor
doubles an event: after a restart it reads again from the committed
position, and a line read twice has the same event_unique_id anyway.

The recorder only reads files: queue-send never waits for it or for
PostgreSQL. While the database is down it retries the connection and
reads nothing; when it is back, it catches up from the saved positions.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg

from greenarrow.lib.config import conf as conf_file
from greenarrow.lib.core.paths import QUEUES, Root
from greenarrow.lib.events import schema, settings, store
from greenarrow.lib.events.database import conninfo as database_conninfo
from greenarrow.lib.events.delivery_attempt import EVENT_TYPE as DELIVERY_ATTEMPT
from greenarrow.lib.events.delivery_attempt import event_of_line
from greenarrow.lib.events.log_follower import FolderReader, Position
from greenarrow.lib.events.types import EventError

log = logging.getLogger("greenarrow.events.recorder")

POLL_SECONDS = 0.25  # how long an idle pass sleeps
RECONNECT_SECONDS = (0.5, 1.0, 2.0, 5.0)  # waits between connection attempts
DOWN_LOG_SECONDS = 60.0  # how often "still down" is logged
SPOOL_FOLDER = "events"


def delivery_source(queue: str) -> str:
    return f"delivery/{queue}"


def spool_source(name: str) -> str:
    return f"{SPOOL_FOLDER}/{name}"


def spool_root(root: Root) -> Path:
    """`log/events/`: one spool folder per producer (formats.md)."""
    return root.log / SPOOL_FOLDER


@dataclass
class Source:
    """One followed folder: `delivery/<queue>` or `events/<name>`."""

    name: str
    directory: Path
    is_spool: bool
    reader: FolderReader


def inode_to_db(inode: int) -> int:
    """An inode as a signed 64-bit `bigint` (overlayfs sets the top bit)."""
    return inode - (1 << 64) if inode >= 1 << 63 else inode


def position_from_db(row: tuple) -> Position:
    file_name, inode, head, offset = row
    return Position(file_name, inode + (1 << 64) if inode < 0 else inode, head, offset)


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _insert(conn: psycopg.Connection, source: str, rows: list[store.EventRow]) -> None:
    """Insert a batch; if PostgreSQL refuses a value, insert row by row and skip
    (loudly) the rows it refuses, so one bad line never stops the recorder."""
    try:
        with conn.transaction():  # a savepoint
            store.insert_rows(conn, rows)
        return
    except psycopg.DataError:
        pass
    for row in rows:
        try:
            with conn.transaction():
                store.insert_rows(conn, [row])
        except psycopg.DataError as exc:
            log.error("%s: skipped event %s that PostgreSQL refused: %s", source,
                      row.event_unique_id, str(exc).strip())


class PositionMoved(Exception):
    """The stored position is not the one this batch was read from."""


class Recorder:
    """Follows the log folders of an install root into the events table."""

    def __init__(self, root: Root,
                 conninfo: Callable[[Root], str | None] = database_conninfo,
                 max_bytes: int = 1 << 20) -> None:
        self.root = root
        self.conninfo = conninfo
        self.max_bytes = max_bytes
        self.server_id = ""
        self.recorded: frozenset[str] = frozenset()
        self.positions: dict[str, Position] = {}
        self.lines_recorded = 0
        self._sources: dict[str, Source] = {}

    # -- configuration

    def configure(self) -> None:
        """Read greenarrow.conf: server_id and the recorded types (ConfError if bad)."""
        tree = conf_file.load_root(self.root)
        self.server_id = settings.server_id(self.root, tree)
        self.recorded = settings.recorded_types(tree)

    def sources(self) -> list[Source]:
        """The folders to follow now: delivery logs if recorded, and every spool."""
        wanted: list[tuple[str, Path, bool]] = []
        if DELIVERY_ATTEMPT in self.recorded:
            wanted += [(delivery_source(q), self.root.delivery_log(q), False) for q in QUEUES]
        try:
            spools = sorted(os.listdir(spool_root(self.root)))
        except FileNotFoundError:
            spools = []
        for name in spools:
            if (spool_root(self.root) / name).is_dir():
                wanted.append((spool_source(name), spool_root(self.root) / name, True))
        found = []
        for name, directory, is_spool in wanted:
            source = self._sources.get(name)
            if source is None:
                source = Source(name, directory, is_spool, FolderReader(directory, self.max_bytes))
                self._sources[name] = source
            found.append(source)
        return found

    # -- database

    def connect(self) -> psycopg.Connection | None:
        """A connection with the schema up to date and positions loaded; None if unconfigured."""
        info = self.conninfo(self.root)
        if info is None:
            return None
        conn = psycopg.connect(info, connect_timeout=10,
                               application_name="greenarrow event-recorder")
        try:
            schema.migrate(conn)
            self.load_positions(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def load_positions(self, conn: psycopg.Connection) -> None:
        with conn.transaction():
            rows = conn.execute(
                "SELECT source, file_name, inode, head_sha256, byte_offset FROM event_sources"
            ).fetchall()
        self.positions = {row[0]: position_from_db(row[1:]) for row in rows}

    # -- one pass

    def poll(self, conn: psycopg.Connection) -> int:
        """Read and commit one batch from every followed folder; lines consumed."""
        consumed = 0
        for source in self.sources():
            consumed += self.poll_source(conn, source)
        return consumed

    def poll_source(self, conn: psycopg.Connection, source: Source) -> int:
        before = self.positions.get(source.name)
        chunk = source.reader.read(before)
        if chunk.lost:
            log.error("%s: EVENTS LOST: %s", source.name, chunk.lost)
        if chunk.lines or chunk.position != before:
            rows = self._rows(source, chunk.lines, chunk.line_offsets)
            try:
                self._commit(conn, source.name, before, chunk.position, rows, len(chunk.lines))
            except PositionMoved:
                log.warning("%s: read position changed under us (another recorder?); "
                            "reloading it", source.name)
                self.load_positions(conn)
                return 0
            self.positions[source.name] = chunk.position
            self.lines_recorded += len(chunk.lines)
        if source.is_spool:
            for path in chunk.finished:
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass
        return len(chunk.lines)

    def _rows(self, source: Source, lines: list[bytes],
              offsets: list[tuple[str, int]]) -> list[store.EventRow]:
        rows = []
        for raw, (file_name, offset) in zip(lines, offsets, strict=True):
            if raw.strip() == b"":
                continue
            try:
                if source.is_spool:
                    text = raw.decode("utf-8").strip()
                    event = json.loads(text, parse_constant=_no_constant)
                    if not isinstance(event, dict):
                        raise EventError("not a JSON object")
                    store.event_json(event).encode("utf-8")  # a lone surrogate: refused
                    rows.append(store.row_of(event, text))
                else:
                    rows.append(store.row_of(event_of_line(raw, self.server_id)))
            except (ValueError, EventError) as exc:  # JSON and UTF-8 errors are ValueErrors
                log.warning("%s/%s byte %d: skipped a line that is not %s: %s",
                            source.directory, file_name, offset,
                            "an event" if source.is_spool else "a delivery log line", exc)
        return rows

    def _commit(self, conn: psycopg.Connection, name: str, before: Position | None,
                after: Position | None, rows: list[store.EventRow], lines: int) -> None:
        assert after is not None
        with conn.transaction():
            stored = conn.execute(
                "SELECT file_name, inode, head_sha256, byte_offset FROM event_sources "
                "WHERE source = %s FOR UPDATE", (name,)).fetchone()
            if (position_from_db(stored) if stored else None) != before:
                raise PositionMoved(name)
            _insert(conn, name, rows)
            conn.execute(
                "INSERT INTO event_sources AS s (source, file_name, inode, head_sha256, "
                "byte_offset, lines) VALUES (%s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (source) DO UPDATE SET file_name = excluded.file_name, "
                "inode = excluded.inode, head_sha256 = excluded.head_sha256, "
                "byte_offset = excluded.byte_offset, lines = s.lines + excluded.lines, "
                "updated_at = now()",
                (name, after.file_name, inode_to_db(after.inode), after.head_sha256,
                 after.byte_offset, lines),
            )

    # -- the service

    def run(self, stop: threading.Event, reload: threading.Event) -> None:
        """Record until `stop` is set; re-read greenarrow.conf when `reload` is set."""
        conn: psycopg.Connection | None = None
        failures = 0
        down_since: float | None = None
        last_down_log = 0.0
        idle_logged = False
        try:
            while not stop.is_set():
                if reload.is_set():
                    reload.clear()
                    try:
                        self.configure()
                        log.info("configuration re-read: server_id %s, recording %s",
                                 self.server_id, ", ".join(sorted(self.recorded)) or "nothing")
                    except conf_file.ConfError as exc:
                        log.error("configuration not re-read, keeping the previous one: %s", exc)
                if not self.sources():
                    if conn is not None:
                        conn.close()
                        conn = None
                    stop.wait(POLL_SECONDS * 4)
                    continue
                try:
                    if conn is None:
                        conn = self.connect()
                        if conn is None:
                            if not idle_logged:
                                log.warning("no events database configured; not recording")
                                idle_logged = True
                            stop.wait(5.0)
                            continue
                        if down_since is not None:
                            log.info("events database is back after %.0fs; catching up",
                                     time.monotonic() - down_since)
                        down_since, failures, idle_logged = None, 0, False
                    consumed = self.poll(conn)
                except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                    if conn is not None:
                        conn.close()
                        conn = None
                    now = time.monotonic()
                    if down_since is None:
                        down_since = now
                        last_down_log = now
                        log.warning("events database unavailable, retrying (delivery is "
                                    "not affected): %s", str(exc).strip())
                    elif now - last_down_log >= DOWN_LOG_SECONDS:
                        last_down_log = now
                        log.warning("events database still unavailable after %.0fs: %s",
                                    now - down_since, str(exc).strip())
                    stop.wait(RECONNECT_SECONDS[min(failures, len(RECONNECT_SECONDS) - 1)])
                    failures += 1
                    continue
                if consumed == 0:
                    stop.wait(POLL_SECONDS)
        finally:
            if conn is not None:
                conn.close()
