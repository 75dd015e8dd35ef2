"""Writing the outcome of one bounce or complaint, in the caller's transaction.

Everything one source (a Maildir message, a delivery log line) changes goes
in together: the repeat-counting runs, the suppressed addresses, and the
events (only those of recorded types: greenarrow.lib.events.settings), so a
crash leaves all of it or none.
"""

from __future__ import annotations

import psycopg

from greenarrow.lib.events import store
from greenarrow.lib.feedback import repeat_counting
from greenarrow.lib.feedback.feedback_message import (
    BOUNCE_BAD_ADDRESS,
    Outcome,
    Settings,
    bad_address_event,
)
from greenarrow.lib.feedback.processor_config import ProcessorConfig


def claim(conn: psycopg.Connection, source_key: str) -> bool:
    """Mark `source_key` processed; False if it already was (a replay after a crash)."""
    cur = conn.execute("INSERT INTO feedback_processed (source_key) VALUES (%s) "
                       "ON CONFLICT DO NOTHING", (source_key,))
    return cur.rowcount == 1


def record(conn: psycopg.Connection, outcome: Outcome, when: int, source_key: str,
           settings: Settings, config: ProcessorConfig, recorded: frozenset[str]) -> int:
    """Count, suppress and insert the events of `outcome`; the number of events inserted."""
    events = list(outcome.events)
    suppress = list(outcome.suppress)
    for bounce in outcome.counted:
        latest = repeat_counting.count_bounce(
            conn, bounce.email, bounce.listid, bounce.kind, when, bounce.fields,
            config.thresholds(bounce.listid))
        if latest is not None:
            events.append(bad_address_event(latest, when, settings, source_key))
            suppress.append((bounce.email, bounce.listid, BOUNCE_BAD_ADDRESS))
    for email, listid, why in suppress:
        email, listid = repeat_counting.run_key(email, listid)
        conn.execute("INSERT INTO suppressed_addresses (email, listid, reason) "
                     "VALUES (%s, %s, %s) ON CONFLICT DO NOTHING", (email, listid, why))
    wanted = [event for event in events if event["event_type"] in recorded]
    return store.insert_events(conn, wanted)


def prune_processed(conn: psycopg.Connection, days: int = 30) -> None:
    """Forget processed-message marks older than `days` (Maildir names are never reused)."""
    with conn.transaction():
        conn.execute("DELETE FROM feedback_processed WHERE processed_at < "
                     "now() - make_interval(days => %s)", (days,))
