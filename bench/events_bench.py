"""How fast the event recorder moves delivery log lines into PostgreSQL.

    python -m bench.events_bench [--n 100000] [--conninfo CONNINFO]

Writes `--n` delivery log lines (rotating every 16 MiB, like queue-send)
into a temporary install root, then times one in-process Recorder draining
them into a fresh database: rows/s for the whole path (read, parse, map to
delivery_attempt, COPY + INSERT ... ON CONFLICT, position update). Then the
store alone: `store.insert_rows` of the same rows in batches of 1,000.

Without `--conninfo` it starts a throwaway cluster (tests/pg.py) and removes
it afterwards. Bounded: every loop is a fixed count.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import psycopg
from psycopg.conninfo import make_conninfo

from greenarrow.lib.core.delivery_log import DeliveryLogWriter
from greenarrow.lib.core.paths import Root
from greenarrow.lib.events import schema, store
from greenarrow.lib.events.delivery_attempt import event_of_line
from greenarrow.lib.events.recorder import Recorder
from greenarrow.lib.ops.install_root import init_root

REPO = Path(__file__).resolve().parent.parent


def attempt(n: int) -> dict:
    return {"timestamp": 1_700_000_000 + n / 1000, "channel": "remote", "status": "success",
            "is_retry": 0, "msguid": f"1700000000.{n}.bench", "sender": "bounce@origin.test",
            "mtaid": "pool", "mtaid_name": "pool", "injected_time": 1_700_000_000,
            "message": "10.0.0.1 accepted message. Remote host said: 250 2.0.0 OK queued",
            "outmtaid_ip": "10.0.0.2", "outmtaid_hostname": "out.origin.test",
            "email": f"user{n}@dest.test", "listid": "list1", "sendid": "send1",
            "mx_hostname": "mx.dest.test", "mx_ip": "10.0.0.1"}


def fresh_database(conninfo: str, name: str) -> str:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    return make_conninfo(conninfo, dbname=name)


def run(n: int, conninfo: str, say=print) -> dict[str, float]:
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="events-bench-") as tmp:
        root = Root(Path(tmp) / "hvmail")
        init_root(root, me="bench.test")
        (root.control / "greenarrow.conf").write_text("general { record_events delivery_attempt }\n")
        with DeliveryLogWriter(root.delivery_log("ram")) as writer:
            for start in range(0, n, 1000):
                writer.write([attempt(i) for i in range(start, min(start + 1000, n))])
        recorder_db = fresh_database(conninfo, "events_bench_recorder")
        fields = dict(part.split("=", 1) for part in recorder_db.split())
        url = f"postgresql://{fields['user']}@/{fields['dbname']}?host={fields['host']}"
        with open(root.control / "greenarrow.conf", "a") as conf:
            conf.write(f'general {{ events_database_url "{url}" }}\n')
        recorder = Recorder(root)
        recorder.configure()
        conn = recorder.connect()
        assert conn is not None
        with conn:
            started = time.perf_counter()
            for _ in range(n + 10):  # bounded: each pass consumes at least one line or stops
                if recorder.poll(conn) == 0:
                    break
            elapsed = time.perf_counter() - started
            stored = conn.execute("SELECT count(*) FROM events").fetchone()[0]
        assert stored == n, f"recorded {stored} of {n}"
        figures["recorder_rows_per_s"] = n / elapsed
        say(f"recorder: {n} lines in {elapsed:.2f}s = {n / elapsed:,.0f} rows/s")

        rows = []
        for path in sorted(root.delivery_log("ram").iterdir()):
            rows += [store.row_of(event_of_line(line, "bench")) for line in path.read_bytes()
                     .splitlines(keepends=True)]
        store_db = fresh_database(conninfo, "events_bench_store")
        with psycopg.connect(store_db) as conn:
            schema.migrate(conn)
            started = time.perf_counter()
            for start in range(0, len(rows), 1000):
                with conn.transaction():
                    store.insert_rows(conn, rows[start:start + 1000])
            elapsed = time.perf_counter() - started
        figures["store_rows_per_s"] = len(rows) / elapsed
        say(f"store.insert_rows, batches of 1000: {len(rows) / elapsed:,.0f} rows/s")
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="delivery log lines")
    parser.add_argument("--conninfo", help="a PostgreSQL server to use (default: a throwaway one)")
    args = parser.parse_args(argv)
    if args.conninfo:
        run(args.n, args.conninfo)
        return 0
    sys.path.insert(0, str(REPO / "tests"))
    from pg import Cluster

    cluster = Cluster()
    try:
        cluster.start()
        run(args.n, cluster.conninfo())
    finally:
        cluster.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
