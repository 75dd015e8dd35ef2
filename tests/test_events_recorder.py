"""The event recorder against a real PostgreSQL: delivery logs and spools into `events`."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pg
import psycopg
import pytest
from engine import wait_until
from processes import stop

from greenarrow.lib.core.delivery_log import FIELDS as LOG_FIELDS
from greenarrow.lib.core.delivery_log import DeliveryLogWriter, format_line
from greenarrow.lib.core.paths import Root
from greenarrow.lib.core.rotating_log import RotatingLog, rotated_files
from greenarrow.lib.events import schema
from greenarrow.lib.events.recorder import Recorder, spool_root
from greenarrow.lib.events.types import FIELDS, make_event
from greenarrow.lib.ops.install_root import init_root

pg_conninfo = pg.pg_conninfo
own_cluster = pg.own_cluster

CONF = "general {\n  server_id test-server\n  record_events delivery_attempt\n}\n"


def make_root(tmp_path: Path, conninfo: str, conf: str = CONF) -> Root:
    root = Root(tmp_path / "hvmail")
    init_root(root, me="recorder.test")
    (root.control / "greenarrow.conf").write_text(conf + pg.database_conf(conninfo))
    return root


def record(n: int, **extra) -> dict:
    base = {"timestamp": 1_700_000_000 + n / 1000, "channel": "remote", "status": "success",
            "is_retry": 0, "msguid": f"m{n:08d}", "email": f"user{n}@dest.test",
            "message": "250 ok " + "x" * (n % 37)}
    base.update(extra)
    return base


def recorder(root: Root, max_bytes: int = 1 << 20) -> Recorder:
    rec = Recorder(root, max_bytes=max_bytes)
    rec.configure()
    return rec


def drain(rec: Recorder, conn: psycopg.Connection, passes: int = 10_000) -> None:
    for _ in range(passes):
        if rec.poll(conn) == 0:
            return
    raise AssertionError("recorder never caught up")


def msguids(conninfo: str) -> list[str]:
    with psycopg.connect(conninfo) as conn:
        return [row[0] for row in conn.execute(
            "SELECT event->>'msguid' FROM events WHERE event_type = 'delivery_attempt' "
            "ORDER BY id")]


def test_every_field_the_log_knows_is_mapped(tmp_path, pg_conninfo):
    root = make_root(tmp_path, pg_conninfo)
    full = {
        "timestamp": 1_700_000_123.456, "channel": "remote", "status": "failure",
        "is_retry": 1, "msguid": "1700000000.123.abc", "sender": "bounce@origin.test",
        "mtaid": "pool1", "mtaid_id": 7, "mtaid_name": "pool1", "injected_time": 1_699_999_000,
        "message": "1.2.3.4 failed after I sent the message. Remote host said: 550 no",
        "outmtaid": 9, "outmtaid_ip": "10.0.0.9", "outmtaid_hostname": "out9.origin.test",
        "outmtaid_name": "ip9", "sendsliceid": "slice", "throttleid": 3,
        "email": "rcpt@dest.test", "listid": "l1", "sendid": "s1", "click_tracking_id": "ct9",
        "mx_hostname": "mx.dest.test", "mx_ip": "10.1.1.1", "bounce_code": 10,
        "mailclass": "news", "instanceid": "inst7",
    }
    assert set(full) == set(LOG_FIELDS)
    blank = {"timestamp": 1_700_000_200, "status": "deferral"}
    with DeliveryLogWriter(root.delivery_log("disk")) as writer:
        writer.write([full, blank])
    raw_full = format_line(full).encode()
    with psycopg.connect(pg_conninfo) as conn:
        rec = recorder(root)
        schema.migrate(conn)
        rec.load_positions(conn)
        drain(rec, conn)
        rows = conn.execute("SELECT event::text, event_unique_id, event_type, "
                            "extract(epoch FROM event_time)::bigint FROM events ORDER BY id"
                            ).fetchall()
    assert len(rows) == 2
    event = json.loads(rows[0][0])
    assert list(event) == list(FIELDS["delivery_attempt"])  # seed 003's order
    expected = make_event("delivery_attempt", 1_700_000_123, "test-server", raw_full, **full)
    assert event == expected
    assert rows[0][1] == expected["event_unique_id"] and rows[0][2] == "delivery_attempt"
    assert rows[0][3] == 1_700_000_123
    assert isinstance(event["timestamp"], float) and event["bounce_code"] == 10
    for name in ("from_address", "headers", "message_size", "smtp_timing", "source_ip"):
        assert event[name] is None  # not in the log
    empty = json.loads(rows[1][0])
    assert empty["bounce_code"] is None and empty["throttleid"] is None
    assert empty["listid"] == "" and empty["status"] == "deferral"


def test_rotation_while_running_and_while_stopped(tmp_path, pg_conninfo):
    root = make_root(tmp_path, pg_conninfo)
    writer = DeliveryLogWriter(root.delivery_log("ram"), max_bytes=3000, keep=1000)
    n = 0
    with psycopg.connect(pg_conninfo) as conn:
        schema.migrate(conn)
        rec = recorder(root, max_bytes=2000)
        rec.load_positions(conn)
        for _ in range(40):  # running: a poll between every few writes
            writer.write([record(n + i) for i in range(7)])
            n += 7
            rec.poll(conn)
        rotations_while_running = len(rotated_files(root.delivery_log("ram")))
        assert rotations_while_running >= 10
        for _ in range(60):  # stopped: many rotations before the next read
            writer.write([record(n + i) for i in range(5)])
            n += 5
        assert len(rotated_files(root.delivery_log("ram"))) >= rotations_while_running + 10
        rec = recorder(root, max_bytes=2000)  # a new process: position from the database
        rec.load_positions(conn)
        drain(rec, conn)
        lines = conn.execute("SELECT lines FROM event_sources WHERE source = 'delivery/ram'"
                             ).fetchone()[0]
    writer.close()
    assert msguids(pg_conninfo) == [f"m{i:08d}" for i in range(n)]
    assert lines == n


def test_a_file_pruned_while_stopped_is_reported_and_reading_goes_on(tmp_path, pg_conninfo,
                                                                     caplog):
    root = make_root(tmp_path, pg_conninfo)
    writer = DeliveryLogWriter(root.delivery_log("ram"), max_bytes=2000, keep=2)
    writer.write([record(i) for i in range(5)])
    with psycopg.connect(pg_conninfo) as conn:
        schema.migrate(conn)
        rec = recorder(root)
        rec.load_positions(conn)
        drain(rec, conn)
        for start in range(5, 200, 5):  # many rotations; only 2 old files kept
            writer.write([record(i) for i in range(start, start + 5)])
        rec = recorder(root)
        rec.load_positions(conn)
        with caplog.at_level(logging.ERROR, logger="greenarrow.events.recorder"):
            drain(rec, conn)
    writer.close()
    assert any("EVENTS LOST" in r.getMessage() for r in caplog.records)
    got = msguids(pg_conninfo)
    on_disk = [r["msguid"] for r in
               __import__("greenarrow.lib.core.delivery_log", fromlist=["x"]).iter_records(
                   root.delivery_log("ram"))]
    assert got[:5] == [f"m{i:08d}" for i in range(5)]
    assert got[5:] == on_disk  # everything still on disk, in order, once
    assert len(got) == len(set(got))


def test_a_replayed_file_adds_no_second_row(tmp_path, pg_conninfo):
    root = make_root(tmp_path, pg_conninfo)
    with DeliveryLogWriter(root.delivery_log("bounce")) as writer:
        writer.write([record(i) for i in range(50)])
    with psycopg.connect(pg_conninfo) as conn:
        schema.migrate(conn)
        rec = recorder(root)
        rec.load_positions(conn)
        drain(rec, conn)
        with conn.transaction():
            conn.execute("DELETE FROM event_sources")  # forget the position: read it all again
        rec.load_positions(conn)
        drain(rec, conn)
        assert conn.execute("SELECT lines FROM event_sources").fetchone()[0] == 50
    assert msguids(pg_conninfo) == [f"m{i:08d}" for i in range(50)]


def test_delivery_logs_are_not_read_unless_recorded(tmp_path, pg_conninfo):
    root = make_root(tmp_path, pg_conninfo, conf="general { server_id x }\n")
    with DeliveryLogWriter(root.delivery_log("ram")) as writer:
        writer.write([record(1)])
    rec = recorder(root)
    assert rec.sources() == []


def test_spool_events_are_stored_as_written_and_rotated_files_removed(tmp_path, pg_conninfo):
    root = make_root(tmp_path, pg_conninfo, conf="")
    events = [make_event("engine_click", 1_700_000_000 + i, "srv", f"click-{i}",
                         email=f"u{i}@x.test", click_url=f"https://example.com/{i}")
              for i in range(100)]
    texts = [json.dumps(e, separators=(",", ":")) for e in events]
    spool = RotatingLog(spool_root(root) / "tracker", max_bytes=2500, keep=10_000)
    for text in texts[:60]:
        spool.write_bytes(text.encode() + b"\n")
    spool.write_bytes(b"not json\n")
    assert len(rotated_files(spool.directory)) > 2
    with psycopg.connect(pg_conninfo) as conn:
        schema.migrate(conn)
        rec = recorder(root)
        rec.load_positions(conn)
        drain(rec, conn)
        assert rotated_files(spool.directory) == []  # committed, so removed
        for text in texts[60:]:
            spool.write_bytes(text.encode() + b"\n")
        drain(rec, conn)
        stored = [r[0] for r in conn.execute("SELECT event::text FROM events ORDER BY id")]
    spool.close()
    assert stored == texts
    assert (spool.directory / "current").exists()


def test_every_tracker_process_spool_is_recorded(tmp_path, pg_conninfo):
    """Each tracker process writes its own spool (tracker-0, tracker-1, ...), the
    unsubscribe processor another: the recorder stores the events of all of them."""
    from greenarrow.lib.tracker import spool as tracker_spool
    from greenarrow.lib.tracker.unsubscribe_mailbox import SPOOL

    root = make_root(tmp_path, pg_conninfo, conf="")
    spools = [tracker_spool.open_spool(root, 0), tracker_spool.open_spool(root, 1),
              RotatingLog(spool_root(root) / SPOOL)]
    written = set()
    for n, spool in enumerate(spools):
        for i in range(20):
            event = make_event("engine_unsub", 1_700_000_000 + i, "srv", f"{n}-{i}",
                               email=f"u{i}@x.test", click_url="")
            spool.write_bytes(tracker_spool.event_line(event))
            written.add(event["event_unique_id"])
    with psycopg.connect(pg_conninfo) as conn:
        schema.migrate(conn)
        rec = recorder(root)
        rec.load_positions(conn)
        drain(rec, conn)
        stored = {r[0] for r in conn.execute("SELECT event->>'event_unique_id' FROM events")}
    for spool in spools:
        spool.close()
    assert stored == written and len(stored) == 60


# -- the service, as a process ------------------------------------------------


class StreamWriter(threading.Thread):
    """Writes `total` delivery log lines in small batches, rotating often."""

    def __init__(self, root: Root, total: int, pause: float = 0.002,
                 gate_at: int | None = None) -> None:
        super().__init__(daemon=True)
        self.writer = DeliveryLogWriter(root.delivery_log("ram"), max_bytes=20_000, keep=10_000)
        self.total = total
        self.pause = pause
        self.written = 0
        self.gate_at = gate_at  # stop after this many lines until `gate` is set
        self.gate = threading.Event()

    def run(self) -> None:
        rng = random.Random(7)
        while self.written < self.total:
            if self.gate_at is not None and self.written >= self.gate_at:
                self.gate.wait(60)
                self.gate_at = None
            count = min(rng.randint(1, 20), self.total - self.written)
            self.writer.write([record(self.written + i) for i in range(count)])
            self.written += count
            time.sleep(self.pause)
        self.writer.close()


def start_recorder(root: Root) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "greenarrow.bin.event_recorder"],
                            env=dict(os.environ, HVMAIL_ROOT=str(root.path)),
                            stdout=subprocess.DEVNULL, stderr=open(root.path / "recorder.log", "ab"))


def count(conninfo: str) -> int:
    try:
        with psycopg.connect(conninfo, connect_timeout=2) as conn:
            return conn.execute("SELECT count(*) FROM events").fetchone()[0]
    except (psycopg.OperationalError, psycopg.errors.UndefinedTable):
        return -1  # down, or the recorder has not created the table yet


def assert_all_once(conninfo: str, total: int) -> None:
    assert msguids(conninfo) == [f"m{i:08d}" for i in range(total)]
    with psycopg.connect(conninfo) as conn:
        assert conn.execute("SELECT lines FROM event_sources WHERE source = 'delivery/ram'"
                            ).fetchone()[0] == total


def test_kill_9_during_a_stream_neither_loses_nor_doubles(tmp_path, pg_conninfo):
    total = 6000
    root = make_root(tmp_path, pg_conninfo)
    stream = StreamWriter(root, total)
    stream.start()
    rng = random.Random(11)
    proc = start_recorder(root)
    try:
        kills = 0
        deadline = time.monotonic() + 120
        while (stream.is_alive() or kills < 8) and time.monotonic() < deadline:
            time.sleep(rng.uniform(0.1, 0.6))
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            kills += 1
            proc = start_recorder(root)
        stream.join(60)
        assert stream.written == total
        wait_until(lambda: count(pg_conninfo) >= total, 120, "every line in the events table")
    finally:
        stop(proc)
    assert kills >= 8
    assert_all_once(pg_conninfo, total)


def test_postgresql_down_during_the_stream(tmp_path, own_cluster):
    total = 4000
    conninfo = own_cluster.new_database()
    root = make_root(tmp_path, conninfo)
    stream = StreamWriter(root, total, pause=0.003, gate_at=total // 2)
    proc = start_recorder(root)
    try:
        wait_until(lambda: count(conninfo) >= 0, 30, "the schema")
        stream.start()
        wait_until(lambda: count(conninfo) > 200, 60, "some events recorded")
        own_cluster.stop()  # perhaps in the middle of a batch
        stream.gate.set()  # the second half is written while PostgreSQL is down
        stream.join(60)
        assert stream.written == total
        time.sleep(1.0)
        assert proc.poll() is None  # the recorder waits for the database, it does not die
        own_cluster.start()
        stream.join(60)
        assert stream.written == total
        wait_until(lambda: count(conninfo) >= total, 120, "every line in the events table")
    finally:
        stop(proc)
    assert_all_once(conninfo, total)
    log_text = (root.path / "recorder.log").read_text()
    assert "events database unavailable" in log_text and "is back" in log_text


def test_no_database_configured_leaves_the_recorder_idle(tmp_path):
    root = Root(tmp_path / "hvmail")
    init_root(root, me="recorder.test")
    (root.control / "greenarrow.conf").write_text(CONF + "general { events_database_url none }\n")
    proc = start_recorder(root)
    try:
        wait_until(lambda: b"no events database" in (root.path / "recorder.log").read_bytes(),
                   30, "the idle notice")
        assert proc.poll() is None
    finally:
        stop(proc)
    assert proc.returncode == 0


@pytest.mark.parametrize("bad", ["general { record_events bogus }\n"])
def test_a_bad_type_stops_the_recorder_with_the_line(tmp_path, bad):
    root = Root(tmp_path / "hvmail")
    init_root(root, me="recorder.test")
    (root.control / "greenarrow.conf").write_text(bad)
    result = subprocess.run([sys.executable, "-m", "greenarrow.bin.event_recorder"],
                            env=dict(os.environ, HVMAIL_ROOT=str(root.path)),
                            capture_output=True, timeout=30)
    assert result.returncode == 111
    assert b"greenarrow.conf:1: record_events: unknown event type 'bogus'" in result.stderr


def test_server_id_defaults_to_me(tmp_path, pg_conninfo):
    root = make_root(tmp_path, pg_conninfo, conf="")
    rec = recorder(root)
    assert rec.server_id == "recorder.test"


def test_events_status_shows_destinations_and_the_recorder(tmp_path, pg_conninfo):
    root = make_root(tmp_path, pg_conninfo)
    with DeliveryLogWriter(root.delivery_log("ram")) as writer:
        writer.write([record(i) for i in range(10)])
    with psycopg.connect(pg_conninfo) as conn:
        schema.migrate(conn)
        rec = recorder(root)
        rec.load_positions(conn)
        drain(rec, conn)
        with DeliveryLogWriter(root.delivery_log("ram")) as writer:
            writer.write([record(10)])  # one line not read yet
        unread = len(format_line(record(10)).encode())
        with conn.transaction():
            conn.execute("INSERT INTO event_destinations (name, event_types, cursor, last_error) "
                         "VALUES ('primary', NULL, 3, 'HTTP 503 from https://example.com/hook'), "
                         "('opens', ARRAY['engine_open'], 0, NULL)")
            conn.execute("INSERT INTO event_retries (destination, event_id, due, last_error) "
                         "SELECT 'primary', id, now(), 'HTTP 503' FROM events ORDER BY id LIMIT 2")
    env = dict(os.environ, HVMAIL_ROOT=str(root.path))
    result = subprocess.run([sys.executable, "-m", "greenarrow.bin.greenarrow", "events", "status"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    primary = next(line for line in out if line.startswith("primary"))
    assert primary.split()[1:3] == ["7", "2"]  # 10 events, cursor 3: 7 waiting; 2 in retry
    assert "HTTP 503 from https://example.com/hook" in primary
    assert next(line for line in out if line.startswith("opens")).split()[1:3] == ["0", "0"]
    assert "Events stored: 10 (delivery_attempt 10)" in result.stdout
    ram = next(line for line in out if line.startswith("delivery/ram"))
    assert ram.split()[1:3] == ["10", str(unread)]


def test_events_status_without_a_database(tmp_path):
    root = Root(tmp_path / "hvmail")
    init_root(root, me="recorder.test")
    (root.control / "greenarrow.conf").write_text("general { events_database_url none }\n")
    result = subprocess.run([sys.executable, "-m", "greenarrow.bin.greenarrow", "events", "status"],
                            env=dict(os.environ, HVMAIL_ROOT=str(root.path)),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "no events database configured" in result.stderr


def test_bad_lines_are_skipped_and_the_rest_recorded(tmp_path, pg_conninfo, caplog):
    root = make_root(tmp_path, pg_conninfo)
    good = [make_event("engine_open", 1_700_000_000 + i, "srv", f"o{i}") for i in range(3)]
    bad = [
        '{"event_type":"engine_open","event_time":NaN}',
        '{"event_type":"engine_open","event_time":1,"event_unique_id":"%s","x":"\\ud800"}' % ("a" * 64),
        json.dumps({**good[0], "event_unique_id": "b" * 64, "event_time": 10**13}),
        "[1, 2]",
    ]
    spool = RotatingLog(spool_root(root) / "tracker")
    spool.write_bytes(json.dumps(good[0]).encode() + b"\n")
    for line in bad:
        spool.write_bytes(line.encode() + b"\n")
    spool.write_bytes(b"\xff\xfe not utf-8\n")
    spool.write_bytes((json.dumps(good[1]) + "\n" + json.dumps(good[2]) + "\n").encode())
    spool.close()
    with DeliveryLogWriter(root.delivery_log("ram")) as writer:
        writer.write_bytes(format_line(record(1)).replace("1700000000.001", "inf").encode())
        writer.write([record(2)])
    with psycopg.connect(pg_conninfo) as conn:
        schema.migrate(conn)
        rec = recorder(root)
        rec.load_positions(conn)
        with caplog.at_level(logging.WARNING):
            drain(rec, conn)
        ids = {r[0] for r in conn.execute("SELECT event_unique_id FROM events")}
    assert ids == {e["event_unique_id"] for e in good} | {
        json.loads(json.dumps(make_event("delivery_attempt", 0, "test-server",
                                         format_line(record(2)).encode())))["event_unique_id"]}
    skipped = [r.getMessage() for r in caplog.records if "skipped a line" in r.getMessage()]
    assert len(skipped) == len(bad) + 2


def test_a_row_postgresql_refuses_is_skipped_not_retried_forever(pg_conninfo, caplog):
    from greenarrow.lib.events import recorder as recorder_module
    from greenarrow.lib.events.store import EventRow

    rows = [EventRow("c" * 64, "engine_open", 1, '{"ok":1}'),
            EventRow("d" * 64, "engine_open", 1, '{"torn": '),
            EventRow("e" * 64, "engine_open", 1, '{"ok":2}')]
    with psycopg.connect(pg_conninfo) as conn:
        schema.migrate(conn)
        with caplog.at_level(logging.ERROR), conn.transaction():
            recorder_module._insert(conn, "events/test", rows)
        ids = sorted(r[0] for r in conn.execute("SELECT event_unique_id FROM events"))
    assert ids == ["c" * 64, "e" * 64]
    assert any("refused" in r.getMessage() for r in caplog.records)


def test_inodes_with_the_top_bit_fit_in_a_bigint():
    from greenarrow.lib.events import recorder as recorder_module

    for inode in (12, (1 << 63) - 1, 1 << 63, (1 << 64) - 1):
        stored = recorder_module.inode_to_db(inode)
        assert -(1 << 63) <= stored < 1 << 63
        assert recorder_module.position_from_db(("current", stored, "h", 0)).inode == inode
