"""Writing the outcome of one bounce or complaint, in the caller's transaction.

Everything one source (a Maildir message, a delivery log line) changes goes
in together: the repeat-counting runs, the suppressed addresses, and the
events (only those of recorded types: greenarrow.lib.events.settings), so a
crash leaves all of it or none.
"""

from __future__ import annotations

from typing import NamedTuple

import psycopg

from greenarrow.lib.core import bad_addresses
from greenarrow.lib.events import store
from greenarrow.lib.feedback import repeat_counting
from greenarrow.lib.feedback.feedback_message import (
    BOUNCE_BAD_ADDRESS,
    Outcome,
    Settings,
    bad_address_event,
)
from greenarrow.lib.feedback.processor_config import ProcessorConfig

ENGINE_UNSUB = "engine_unsub"


class Recorded(NamedTuple):
    inserted: int  # events inserted
    suppressed: int  # (address, ListID) pairs added to suppressed_addresses


def claim(conn: psycopg.Connection, source_key: str) -> bool:
    """Mark `source_key` processed; False if it already was (a replay after a crash)."""
    cur = conn.execute("INSERT INTO feedback_processed (source_key) VALUES (%s) "
                       "ON CONFLICT DO NOTHING", (source_key,))
    return cur.rowcount == 1


def record(conn: psycopg.Connection, outcome: Outcome, when: int, source_key: str,
           settings: Settings, config: ProcessorConfig, recorded: frozenset[str]) -> Recorded:
    """Count, suppress and insert the events of `outcome`."""
    events = list(outcome.events)
    suppress = list(outcome.suppress)
    for bounce in outcome.counted:
        latest = repeat_counting.count_bounce(
            conn, bounce.email, bounce.listid, bounce.kind, when, bounce.fields,
            config.thresholds(bounce.listid))
        if latest is not None:
            events.append(bad_address_event(latest, when, settings, source_key))
            suppress.append((bounce.email, bounce.listid, BOUNCE_BAD_ADDRESS))
    added = 0
    for email, listid, why in suppress:
        email, listid = repeat_counting.run_key(email, listid)
        added += conn.execute("INSERT INTO suppressed_addresses (email, listid, reason) "
                              "VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                              (email, listid, why)).rowcount
    wanted = [event for event in events if event["event_type"] in recorded]
    return Recorded(store.insert_events(conn, wanted), added)


def take_unsubscribes(conn: psycopg.Connection, after_id: int) -> tuple[int, int]:
    """Add the engine_unsub events with id > after_id to suppressed_addresses.

    The tracker records them (through the recorder); this keeps the pairs in
    step. Returns (the highest id seen, pairs added).
    """
    with conn.transaction():
        top = conn.execute("SELECT coalesce(max(id), 0) FROM events WHERE event_type = %s",
                           (ENGINE_UNSUB,)).fetchone()[0]
        if top <= after_id:
            return after_id, 0
        added = conn.execute(
            "INSERT INTO suppressed_addresses (email, listid, reason) "
            "SELECT DISTINCT lower(trim(event->>'email')), lower(trim(coalesce(event->>'listid', "
            "''))), %s FROM events WHERE event_type = %s AND id > %s AND id <= %s "
            "AND coalesce(event->>'email', '') <> '' ON CONFLICT DO NOTHING",
            (ENGINE_UNSUB, ENGINE_UNSUB, after_id, top)).rowcount
    return top, added


def write_bad_addresses(conn: psycopg.Connection, root: str) -> int:
    """Rebuild var/bad_addresses from suppressed_addresses; the number of pairs."""
    with conn.transaction():
        rows = conn.execute("SELECT email, listid FROM suppressed_addresses").fetchall()
    return bad_addresses.write(root, rows)


def prune_processed(conn: psycopg.Connection, days: int = 30) -> None:
    """Forget processed-message marks older than `days` (Maildir names are never reused)."""
    with conn.transaction():
        conn.execute("DELETE FROM feedback_processed WHERE processed_at < "
                     "now() - make_interval(days => %s)", (days,))
