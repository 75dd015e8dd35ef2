"""The logic of `hvmail_report`: time ranges, filters and streaming summaries.

Kept apart from the click front end (`greenarrow.bin.hvmail_report`) so it can
be tested and reused without a command line. Everything works in one pass
over the processed delivery log: memory grows only with the number of
distinct SendIDs, never with the number of attempts.
"""

from __future__ import annotations

import fnmatch
import heapq
import re
import time
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from greenarrow.lib.core.delivery_log import STATUSES, iter_entries
from greenarrow.lib.core.paths import QUEUES, Root
from greenarrow.lib.core.remote_link import (
    CONNMAXOUT,
    DEFERRAL,
    FAILURE,
    FAILURE_TOOLONG,
    SUCCESS,
)

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}
_PERIOD_RE = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_RELATIVE_RE = re.compile(r"^([+-])(\d+(?:\.\d+)?)([smhdw])$")
_EPOCH_RE = re.compile(r"^\d+(?:\.\d+)?$")
_LOCAL_FORMATS = (
    "%Y-%m-%d",
    "%Y-%m-%d %H:%M",
    "%Y-%m-%d %H:%M:%S",
    "%Y-%m-%dT%H:%M",
    "%Y-%m-%dT%H:%M:%S",
)

TIME_HELP = (
    "epoch seconds, YYYY-MM-DD, 'YYYY-MM-DD HH:MM[:SS]' (local time), "
    "or relative to now like -2h (units s, m, h, d, w)"
)
PERIOD_HELP = "a number with a unit: 90s, 30m, 2h, 1d, 1w"

# The per-SendID table's columns, in the order GreenArrow's reports show them.
STATUS_COLUMNS = (SUCCESS, FAILURE, DEFERRAL, CONNMAXOUT, FAILURE_TOOLONG)


def parse_period(text: str) -> float:
    """Seconds in a PERIOD like `30m`; a unit is required so `90` is never guessed."""
    match = _PERIOD_RE.match(text.strip())
    if not match:
        raise ValueError(f"invalid period {text!r}: expected {PERIOD_HELP}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_time(text: str, now: float) -> float:
    """Epoch seconds for a TIME argument (see TIME_HELP); dates are local time."""
    value = text.strip()
    if _EPOCH_RE.match(value):
        return float(value)
    relative = _RELATIVE_RE.match(value)
    if relative:
        offset = float(relative.group(2)) * _UNITS[relative.group(3)]
        return now - offset if relative.group(1) == "-" else now + offset
    if value == "now":
        return now
    for fmt in _LOCAL_FORMATS:
        try:
            return datetime.strptime(value, fmt).timestamp()
        except ValueError:
            continue
    raise ValueError(f"invalid time {text!r}: expected {TIME_HELP}")


def resolve_range(
    start: str | None, end: str | None, last: str | None, now: float | None = None
) -> tuple[float | None, float | None]:
    """The (start, end) epoch bounds asked for; None means open on that side.

    `--last` means "from PERIOD ago to now" and cannot be mixed with an
    explicit start or end, as in GreenArrow's hvmail_report.
    """
    now = time.time() if now is None else now
    if last is not None:
        if start is not None or end is not None:
            raise ValueError("-l/--last cannot be combined with -s/--start or -e/--end")
        return now - parse_period(last), now
    start_at = parse_time(start, now) if start is not None else None
    end_at = parse_time(end, now) if end is not None else None
    if start_at is not None and end_at is not None and start_at > end_at:
        raise ValueError("the start time is after the end time")
    return start_at, end_at


def wildcard_regex(patterns: Iterable[str]) -> re.Pattern[str] | None:
    """One case-insensitive regex matching any of the shell patterns.

    Only `*` and `?` are wildcards: `[` is escaped because it is a legal
    address character, not a character class in hvmail_report's syntax.
    """
    parts = [fnmatch.translate(p.replace("[", "[[]")) for p in patterns]
    if not parts:
        return None
    return re.compile("|".join(f"(?:{part})" for part in parts), re.IGNORECASE)


class Filter:
    """The record filter: options AND together, repeats of one option OR together.

    Addresses take shell wildcards; SendID and ListID compare exactly but
    case-insensitively because GreenArrow treats them so. An empty option
    does not filter. Patterns are compiled once, not per record.
    """

    def __init__(
        self,
        senders: Iterable[str] = (),
        recipients: Iterable[str] = (),
        sendids: Iterable[str] = (),
        listids: Iterable[str] = (),
        statuses: Iterable[str] = (),
    ) -> None:
        self.statuses = frozenset(statuses)
        for status in self.statuses:
            if status not in STATUSES:
                raise ValueError(
                    f"unknown status {status!r}: expected one of {', '.join(STATUSES)}"
                )
        self.sender_re = wildcard_regex(senders)
        self.recipient_re = wildcard_regex(recipients)
        self.sendids = frozenset(s.lower() for s in sendids)
        self.listids = frozenset(s.lower() for s in listids)

    def __call__(self, record: dict[str, str]) -> bool:
        """True when the record passes every given option."""
        if self.statuses and record["status"] not in self.statuses:
            return False
        if self.sendids and record["sendid"].lower() not in self.sendids:
            return False
        if self.listids and record["listid"].lower() not in self.listids:
            return False
        if self.sender_re is not None and not self.sender_re.match(record["sender"]):
            return False
        if self.recipient_re is not None and not self.recipient_re.match(record["email"]):
            return False
        return True


def queue_names(queue: str) -> tuple[str, ...]:
    """The queues a `-q` value stands for (`all` is every queue)."""
    if queue == "all":
        return QUEUES
    if queue not in QUEUES:
        raise ValueError(f"unknown queue {queue!r}: expected one of {', '.join(QUEUES)}, all")
    return (queue,)


def iter_matching(
    root: Root,
    queues: Iterable[str],
    start: float | None,
    end: float | None,
    record_filter: Filter,
) -> Iterator[tuple[bytes, dict[str, str]]]:
    """(raw line, record) of each matching attempt across the queues' logs.

    Several queues are merged by timestamp (a streaming merge: one pending
    line per queue), so `-q all` output reads in time order like one log.
    """
    streams = [
        (
            entry
            for entry in iter_entries(Path(root.delivery_log(q)), start, end)
            if record_filter(entry[1])
        )
        for q in queues
    ]
    if len(streams) == 1:
        return streams[0]
    return heapq.merge(*streams, key=lambda entry: float(entry[1]["timestamp"]))


class Summary:
    """Counts of attempts by status and by SendID, built in one streaming pass.

    SendIDs group case-insensitively (GreenArrow treats them so); the first
    spelling seen is the one shown.
    """

    def __init__(self, start: float | None, end: float | None, queues: Iterable[str]) -> None:
        self.start = start
        self.end = end
        self.queues = tuple(queues)
        self.attempts = 0
        self.first: float | None = None
        self.last: float | None = None
        self.by_status: dict[str, int] = dict.fromkeys(STATUSES, 0)
        self._by_sendid: dict[str, tuple[str, dict[str, int]]] = {}

    def add(self, record: dict[str, str]) -> None:
        """Count one attempt."""
        self.attempts += 1
        stamp = float(record["timestamp"])
        if self.first is None or stamp < self.first:
            self.first = stamp
        if self.last is None or stamp > self.last:
            self.last = stamp
        status = record["status"]
        self.by_status[status] = self.by_status.get(status, 0) + 1
        sendid = record["sendid"]
        key = sendid.lower()
        entry = self._by_sendid.get(key)
        if entry is None:
            entry = self._by_sendid[key] = (sendid, dict.fromkeys(STATUSES, 0))
        counts = entry[1]
        counts[status] = counts.get(status, 0) + 1

    def by_sendid(self) -> dict[str, dict[str, int]]:
        """{sendid: {status: count}}, most attempts first (ties by SendID)."""
        rows = sorted(self._by_sendid.values(), key=lambda e: (-sum(e[1].values()), e[0]))
        return {sendid: dict(counts) for sendid, counts in rows}

    def to_json(self) -> dict[str, Any]:
        """The `--json` object.

        `start`/`end` are the requested bounds (null when open); `first` and
        `last` are the timestamps of the earliest and latest matching attempt.
        """
        return {
            "queues": list(self.queues),
            "start": self.start,
            "end": self.end,
            "first": self.first,
            "last": self.last,
            "attempts": self.attempts,
            "by_status": dict(self.by_status),
            "by_sendid": self.by_sendid(),
        }

    def render(self) -> str:
        """The human summary printed by default."""
        lines = [
            f"Queue(s): {', '.join(self.queues)}",
            f"Time range: {_when(self.start, 'start of log')} to {_when(self.end, 'end of log')}",
        ]
        if self.first is not None and self.last is not None:
            lines.append(f"Attempts found from {_when(self.first, '')} to {_when(self.last, '')}")
        lines.append(f"Total attempts: {self.attempts}")
        lines.append("")
        status_rows = [[status, str(count)] for status, count in self.by_status.items()]
        lines.extend(_table(["Status", "Attempts"], status_rows))
        lines.append("")
        header = ["SendID", "Attempts", *STATUS_COLUMNS]
        sendid_rows = [
            [sendid or "(none)", str(sum(counts.values()))]
            + [str(counts.get(status, 0)) for status in header[2:]]
            for sendid, counts in self.by_sendid().items()
        ]
        if sendid_rows:
            lines.extend(_table(header, sendid_rows))
        else:
            lines.append("No attempts by SendID.")
        return "\n".join(lines) + "\n"


def _when(stamp: float | None, open_text: str) -> str:
    if stamp is None:
        return open_text
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(stamp)).rstrip()


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Plain-text columns: the first left-aligned, the numbers right-aligned."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        return "  ".join(cells).rstrip()

    return [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(row) for row in rows]
