"""The processed delivery log: one TAB-separated line per delivery attempt.

GreenArrow documents the "Delivery Event Processed Logfile Format" only up to
its fifth column; docs/formats.md section 5 fixes the rest: the
`delivery_attempt` event fields from `timestamp` through `throttleid`, then
`email` ... `instanceid`. `FIELDS` below is the single source of truth for that
order; everything that writes or reads the log goes through this module.

Layout of one queue's log folder (`$HVMAIL_ROOT/log/delivery/<queue>/`):

* `current` -- the file `queue-send <queue>` appends to;
* `@<timestamp_ns>.s` -- rotated files. The name is the wall-clock time of the
  rotation in nanoseconds, zero-padded to 20 digits, so names sort oldest first
  and the name is an upper bound for every timestamp inside the file (records
  carry the time of the attempt, which is never after the time they are
  written). Readers use that to skip old files without opening them.

Values are kept as strings when parsed (`parse_line`), so
`format_line(parse_line(line)) == line` for every well-formed line and a report
can print lines exactly as stored.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from greenarrow.lib.core.remote_link import LOGGED_STATUSES
from greenarrow.lib.core.rotating_log import CURRENT, RotatingLog, rotated_files

FIELDS: tuple[str, ...] = (
    "timestamp",
    "channel",
    "status",
    "is_retry",
    "msguid",
    "sender",
    "mtaid",
    "mtaid_id",
    "mtaid_name",
    "injected_time",
    "message",
    "outmtaid",
    "outmtaid_ip",
    "outmtaid_hostname",
    "outmtaid_name",
    "sendsliceid",
    "throttleid",
    "email",
    "listid",
    "sendid",
    "click_tracking_id",
    "mx_hostname",
    "mx_ip",
    "bounce_code",
    "mailclass",
    "instanceid",
)

STATUSES: tuple[str, ...] = LOGGED_STATUSES


# A record is written by queue-send shortly after its attempt; this bounds the
# delay generously (SMTP timeouts add up to well under an hour). Readers rely
# on it to stop before files that were started long after the requested end.
MAX_WRITE_DELAY = 6 * 3600.0

_NFIELDS = len(FIELDS)
# TAB, CR and LF would break the one-line-per-attempt, TAB-separated framing.
_NEUTRALISE = str.maketrans({"\t": " ", "\r": " ", "\n": " "})


def format_line(record: Mapping[str, Any]) -> str:
    """The log line for one attempt, ending with a newline.

    Missing keys (or None) give empty columns, so callers only fill in what
    they know; TAB, CR and LF inside a value become spaces because the format
    has no escaping. A numeric timestamp is written with milliseconds.
    """
    return "\t".join([_column(name, record.get(name)) for name in FIELDS]) + "\n"


def _column(name: str, value: Any) -> str:
    """One column's text: numbers and booleans in the log's canonical form."""
    if type(value) is str:  # most columns: checked, not copied, when clean
        if "\t" in value or "\n" in value or "\r" in value:
            return value.translate(_NEUTRALISE)
        return value
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if name == "timestamp" and isinstance(value, int | float):
        return f"{value:.3f}"
    return str(value).translate(_NEUTRALISE)


def parse_line(line: str) -> dict[str, str]:
    """The record of one log line, every value a string exactly as stored.

    Extra trailing columns (a newer version appending fields) are ignored so
    old readers keep working. A short line or a timestamp that is not a number
    raises ValueError, since such a line was torn or is not from this log.
    """
    if line.endswith("\n"):
        line = line[:-1]
    columns = line.split("\t")
    if len(columns) < _NFIELDS:
        missing = ", ".join(FIELDS[len(columns) :])
        raise ValueError(
            f"delivery log line has {len(columns)} columns, expected {_NFIELDS} "
            f"(missing: {missing})"
        )
    try:
        float(columns[0])
    except ValueError:
        raise ValueError(f"delivery log line has a bad timestamp {columns[0]!r}") from None
    return dict(zip(FIELDS, columns, strict=False))


class DeliveryLogWriter(RotatingLog):
    """Appends attempt records to one queue's log folder, rotating by size.

    The caller (queue-send of one queue) is the only writer of the folder.
    """

    def write(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Append a batch of records with one write, rotating first if needed."""
        self.write_bytes(
            "".join([format_line(record) for record in records]).encode("utf-8", "replace")
        )


def iter_entries(
    directory: Path, start: float | None = None, end: float | None = None
) -> Iterator[tuple[bytes, dict[str, str]]]:
    """Each (raw line as stored, parsed record) with start <= timestamp <= end.

    Files are read oldest first, line by line, so memory stays flat however
    long the log is. Rotated files that end before `start` are not opened;
    reading stops at the first file begun more than MAX_WRITE_DELAY after
    `end`. Lines that do not parse (torn or foreign) are skipped, as is an
    unterminated last line of `current` (queue-send is writing it).

    `current` is opened before the rotated files are listed, so a rotation
    during the read neither loses nor repeats records.
    """
    directory = Path(directory)
    try:
        current: Any = open(directory / CURRENT, "rb")
    except FileNotFoundError:
        current = None
    try:
        current_id = None
        if current is not None:
            stat = os.fstat(current.fileno())
            current_id = (stat.st_dev, stat.st_ino)
        previous_end: float | None = None
        for end_ns, path in rotated_files(directory):
            file_end = end_ns / 1e9
            if (
                previous_end is not None
                and end is not None
                and previous_end > end + MAX_WRITE_DELAY
            ):
                return
            previous_end = file_end
            if start is not None and file_end < start:
                continue
            try:
                handle = open(path, "rb")
            except FileNotFoundError:
                continue  # pruned while we were reading older files
            with handle:
                stat = os.fstat(handle.fileno())
                if (stat.st_dev, stat.st_ino) == current_id:
                    continue  # the `current` we hold, rotated meanwhile: read it last
                yield from _read(handle, start, end, partial_tail=True)
        if current is not None:
            if (
                previous_end is not None
                and end is not None
                and previous_end > end + MAX_WRITE_DELAY
            ):
                return
            yield from _read(current, start, end, partial_tail=False)
    finally:
        if current is not None:
            current.close()


def _read(
    handle: Any, start: float | None, end: float | None, partial_tail: bool
) -> Iterator[tuple[bytes, dict[str, str]]]:
    for raw in handle:
        if not raw.endswith(b"\n") and not partial_tail:
            return
        tab = raw.find(b"\t")
        try:
            stamp = float(raw[:tab] if tab >= 0 else raw)
        except ValueError:
            continue
        if (start is not None and stamp < start) or (end is not None and stamp > end):
            continue
        try:
            record = parse_line(raw.decode("utf-8", "replace"))
        except ValueError:
            continue
        yield raw, record


def iter_records(
    directory: Path, start: float | None = None, end: float | None = None
) -> Iterator[dict[str, str]]:
    """Each record of a queue's log with start <= timestamp <= end, oldest file first.

    See `iter_entries` for how files are chosen; this drops the raw line.
    """
    for _, record in iter_entries(directory, start, end):
        yield record
