"""Repeat counting per (address, ListID): when a run of bounces makes an address bad.

State is the `bounce_runs` table (greenarrow/sql/002_bounce_runs.sql),
changed in the caller's transaction, the one that also inserts the events of
the bounce, so a crash never counts a bounce without its event or the reverse.

Hard (`h`) and soft (`s`) bounces are counted in separate runs; `o` (other:
auto-replies, delay warnings, challenges) is never counted. A run is the
bounces of one kind for an address and ListID with no gap longer than
`max_gap_days` between two of them. The run crosses its threshold when it
holds at least `count` bounces spanning at least `days` from the first to
the latest; bounce_bad_address is then emitted once for that run, with the
fields of its most recent bounce. A later bounce after a long gap starts a
new run, which may report the address again.
"""

from __future__ import annotations

import json
from typing import Any

import psycopg

from greenarrow.lib.feedback.processor_config import Thresholds

COUNTED_KINDS = ("h", "s")
DAY = 86400


def run_key(email: str, listid: str) -> tuple[str, str]:
    """How an address and ListID are compared: both lower-cased."""
    return email.strip().lower(), listid.strip().lower()


def count_bounce(conn: psycopg.Connection, email: str, listid: str, kind: str, when: int,
                 bounce: dict[str, Any], thresholds: Thresholds) -> dict[str, Any] | None:
    """Count one bounce of `kind` at `when` (seconds); `bounce` is its bounce_all fields.

    Returns the fields of the run's most recent bounce when this bounce makes
    the run cross its threshold (emit bounce_bad_address), else None.
    """
    if kind not in COUNTED_KINDS or not email:
        return None
    email, listid = run_key(email, listid)
    limit = thresholds.limit(kind)
    row = conn.execute(
        "SELECT first_at, last_at, bounces, reported, last_bounce::text FROM bounce_runs "
        "WHERE email = %s AND listid = %s AND kind = %s FOR UPDATE",
        (email, listid, kind)).fetchone()
    if row is None or when - row[1] > thresholds.max_gap_days * DAY:
        first_at, last_at, bounces, reported, last = when, when, 1, False, bounce
    else:
        first_at, last_at, bounces, reported = min(row[0], when), row[1], row[2] + 1, row[3]
        last = json.loads(row[4])
        if when >= last_at:
            last_at, last = when, bounce
    crossed = (not reported and bounces >= limit.count
               and last_at - first_at >= limit.days * DAY)
    conn.execute(
        "INSERT INTO bounce_runs AS r (email, listid, kind, first_at, last_at, bounces, "
        "reported, last_bounce) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
        "ON CONFLICT (email, listid, kind) DO UPDATE SET first_at = excluded.first_at, "
        "last_at = excluded.last_at, bounces = excluded.bounces, reported = excluded.reported, "
        "last_bounce = excluded.last_bounce, updated_at = now()",
        (email, listid, kind, first_at, last_at, bounces, reported or crossed,
         json.dumps(last, ensure_ascii=False)))
    return last if crossed else None
