from __future__ import annotations

import json

import pg
import psycopg
import pytest

from greenarrow.lib.events import schema, store
from greenarrow.lib.events.types import EventError, make_event

pg_conninfo = pg.pg_conninfo


def _connect(conninfo: str) -> psycopg.Connection:
    conn = psycopg.connect(conninfo)
    schema.migrate(conn)
    return conn


def test_migrate_creates_the_tables_once(pg_conninfo):
    with psycopg.connect(pg_conninfo) as conn:
        first = schema.migrate(conn)
        assert first == [m.name for m in schema.migrations()]
        assert "001_events.sql" in first
        assert schema.migrate(conn) == []
        tables = {r[0] for r in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")}
    assert {"events", "event_destinations", "event_retries", "event_sources",
            "schema_migrations"} <= tables


def test_migrations_are_shipped_with_the_package():
    names = [m.name for m in schema.migrations()]
    assert names[0] == "001_events.sql"


def test_insert_skips_a_replayed_event_and_keeps_the_json_text(pg_conninfo):
    event = make_event("engine_open", 1_700_000_000, "srv", "open-1", email="a@example.com",
                       user_agent="Ünïcode agent")
    other = make_event("engine_open", 1_700_000_001, "srv", "open-2", email="b@example.com")
    with _connect(pg_conninfo) as conn:
        with conn.transaction():
            assert store.insert_events(conn, [event, event]) == 1
        with conn.transaction():
            assert store.insert_events(conn, [event, other]) == 1
        rows = conn.execute(
            "SELECT event_unique_id, event_type, extract(epoch FROM event_time)::bigint, "
            "event::text FROM events ORDER BY id").fetchall()
    assert [r[0] for r in rows] == [event["event_unique_id"], other["event_unique_id"]]
    assert rows[0][1] == "engine_open" and rows[0][2] == 1_700_000_000
    assert rows[0][3] == store.event_json(event)
    assert json.loads(rows[0][3]) == event


def test_batches_overlapping_earlier_ones_add_only_the_new_rows(pg_conninfo):
    events = [make_event("scomp", 1_700_000_000 + i, "srv", f"k{i}", email=f"{i}@x") for i in range(50)]
    rows = [store.row_of(e) for e in events]
    with _connect(pg_conninfo) as conn:
        with conn.transaction():
            assert store.insert_rows(conn, rows[:30]) == 30
        with conn.transaction():
            assert store.insert_rows(conn, rows) == 20
        assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 50


def test_rolled_back_batch_leaves_nothing(pg_conninfo):
    event = make_event("scomp", 1, "srv", "k")
    with _connect(pg_conninfo) as conn:
        with pytest.raises(RuntimeError), conn.transaction():
            store.insert_events(conn, [event])
            raise RuntimeError("crash before commit")
        assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 0


@pytest.mark.parametrize("bad", [{"event_unique_id": "x"}, {"event_type": "nope"},
                                 {"event_time": "soon"}])
def test_bad_event_is_refused_with_the_field_named(bad):
    event = make_event("scomp", 1, "srv", "k")
    event.update(bad)
    with pytest.raises(EventError, match=next(iter(bad)).split("_")[-1]):
        store.row_of(event)


def test_events_bench_runs_on_a_tiny_n(capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench import events_bench

    figures = events_bench.run(300, pg.shared_cluster().conninfo(), say=print)
    assert set(figures) == {"recorder_rows_per_s", "store_rows_per_s"}
    assert "rows/s" in capsys.readouterr().out
