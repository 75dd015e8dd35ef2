"""What `greenarrow events status` shows: per destination, the events waiting for
their first attempt, those in retry, the age of the oldest and the last error;
then the recorder's folders (how far behind it is) and the table's totals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import psycopg

from greenarrow.lib.config import conf as conf_file
from greenarrow.lib.core.paths import Root
from greenarrow.lib.events import destinations
from greenarrow.lib.events.log_follower import Position, bytes_behind
from greenarrow.lib.events.recorder import SPOOL_FOLDER


@dataclass
class DestinationStatus:
    name: str
    waiting: int  # events after its cursor that it takes: not tried yet
    retrying: int  # rows in event_retries
    oldest_age: float | None  # seconds since the oldest of both was made
    last_error: str | None
    last_error_at: datetime | None
    next_retry_in: float | None = None  # seconds until its earliest retry is due


@dataclass
class SourceStatus:
    source: str
    file_name: str
    byte_offset: int
    lines: int
    updated_at: datetime
    bytes_behind: int | None  # None: the folder is not on this machine's disk


@dataclass
class EventsStatus:
    total: int
    by_type: dict[str, int]
    destinations: list[DestinationStatus]
    sources: list[SourceStatus]
    # Declared in greenarrow.conf but not yet in event_destinations (the processor
    # has not started since they were added).
    not_started: list[str] = field(default_factory=list)


_DESTINATIONS = """
SELECT d.name,
       (SELECT count(*) FROM events e WHERE e.id > d.cursor
          AND (d.event_types IS NULL OR e.event_type = ANY (d.event_types))),
       (SELECT count(*) FROM event_retries r WHERE r.destination = d.name),
       extract(epoch FROM now() - LEAST(
          (SELECT min(e.event_time) FROM events e WHERE e.id > d.cursor
             AND (d.event_types IS NULL OR e.event_type = ANY (d.event_types))),
          (SELECT min(e.event_time) FROM event_retries r JOIN events e ON e.id = r.event_id
             WHERE r.destination = d.name)))::float8,
       d.last_error, d.last_error_at,
       extract(epoch FROM (SELECT min(r.due) FROM event_retries r
          WHERE r.destination = d.name) - now())::float8
FROM event_destinations d ORDER BY d.name
"""


def read_status(conn: psycopg.Connection, root: Root) -> EventsStatus:
    """The status of the events database `conn` (schema applied) and of `root`'s folders."""
    by_type = dict(conn.execute(
        "SELECT event_type, count(*) FROM events GROUP BY event_type ORDER BY event_type"
    ).fetchall())
    destinations = [DestinationStatus(*row) for row in conn.execute(_DESTINATIONS)]
    sources = []
    for row in conn.execute(
        "SELECT source, file_name, inode, head_sha256, byte_offset, lines, updated_at "
        "FROM event_sources ORDER BY source"
    ):
        source, file_name, inode, head, offset, lines, updated = row
        folder = root.log / source
        behind = None
        if source.startswith(("delivery/", f"{SPOOL_FOLDER}/")) and folder.is_dir():
            behind = bytes_behind(folder, Position(file_name, inode, head, offset))
        sources.append(SourceStatus(source, file_name, offset, lines, updated, behind))
    return EventsStatus(sum(by_type.values()), by_type, destinations, sources,
                        _not_started(root, {d.name for d in destinations}))


def _not_started(root: Root, known: set[str]) -> list[str]:
    try:
        declared = destinations.load(conf_file.load_root(root), root)
    except conf_file.ConfError:
        return []  # greenarrow_config check reports it
    return [d.name for d in declared if d.name not in known]


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(seconds, 0.0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _next(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return "due" if seconds <= 0 else "in " + _age(seconds)


def format_status(status: EventsStatus) -> str:
    """The status as the table the command prints."""
    lines = []
    if status.destinations:
        header = ("Destination Name", "Event Count (First Attempt)", "Event Count (Retries)",
                  "Oldest", "Next Retry", "Last Error")
        rows = [(d.name, str(d.waiting), str(d.retrying), _age(d.oldest_age),
                 _next(d.next_retry_in), (d.last_error or "-").replace("\n", " ")[:120])
                for d in status.destinations]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]
        for row in [header, *rows]:
            lines.append("  ".join(cell.ljust(width) for cell, width in zip(row[:5], widths, strict=True))
                         + "  " + row[5])
    elif not status.not_started:
        lines.append("No event delivery destinations: events wait in the events table "
                     "until one is declared.")
    for name in status.not_started:
        lines.append(f"{name}: declared in greenarrow.conf, not started yet (is "
                     f"event-processor running? greenarrow_config reload)")
    lines.append("")
    types = ", ".join(f"{name} {n}" for name, n in status.by_type.items())
    lines.append(f"Events stored: {status.total}" + (f" ({types})" if types else ""))
    if status.sources:
        lines.append("")
        header = ("Recorder source", "Lines recorded", "Bytes not yet read", "Position",
                  "Updated")
        rows = [(s.source, str(s.lines), "?" if s.bytes_behind is None else str(s.bytes_behind),
                 f"{s.file_name}:{s.byte_offset}", s.updated_at.strftime("%Y-%m-%d %H:%M:%S %Z"))
                for s in status.sources]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]
        for row in [header, *rows]:
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines) + "\n"
