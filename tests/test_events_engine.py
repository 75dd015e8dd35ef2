"""End to end: a running engine with the event recorder records every delivery attempt."""

from __future__ import annotations

import pg
import psycopg
from engine import Engine, route_conf, wait_until
from smtp_receivers import Receiver

from greenarrow.lib.core import delivery_log
from greenarrow.lib.core.paths import QUEUES

pg_conninfo = pg.pg_conninfo

N = 60


def test_every_attempt_of_a_running_engine_is_recorded(tmp_path, pg_conninfo):
    with Receiver("127.0.0.1") as rx:
        conf = ("general {\n  server_id e2e\n  record_events delivery_attempt\n}\n"
                + route_conf({"dest.test": rx.port}))
        engine = Engine(tmp_path, conf=conf, database=pg.database_url(pg_conninfo))
        with engine:
            assert "event-recorder" in engine.program("hvmail_init", "status").stdout.decode()
            for n in range(N):
                message = f"From: a@origin.test\nTo: u{n}@dest.test\nSubject: {n}\n\nbody\n"
                result = engine.sendmail("-f", "a@origin.test", f"u{n}@dest.test",
                                         message=message.encode(),
                                         env={"GREENARROW_SENDID": "evsend"})
                assert result.returncode == 0, result.stderr
            wait_until(lambda: len(rx.messages) >= N, 120, "every message at the receiver")

            def logged() -> list[dict]:
                return [r for q in QUEUES
                        for r in delivery_log.iter_records(engine.root.delivery_log(q))]

            def stored() -> list[dict]:
                with psycopg.connect(pg_conninfo) as conn:
                    return [row[0] for row in conn.execute(
                        "SELECT event FROM events WHERE event_type = 'delivery_attempt'")]

            wait_until(lambda: len(stored()) >= len(logged()) >= N, 60,
                       "every attempt in the events table")
            records, events = logged(), stored()
    assert len(events) == len(records)
    assert sorted((e["msguid"], e["email"], e["status"]) for e in events) == sorted(
        (r["msguid"], r["email"], r["status"]) for r in records)
    assert {e["email"] for e in events if e["status"] == "success"} == {
        f"u{n}@dest.test" for n in range(N)}
    assert all(e["server_id"] == "e2e" and e["sendid"] == "evsend" and e["channel"] == "remote"
               for e in events)
