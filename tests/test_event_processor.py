"""The event processor against a real PostgreSQL and real HTTP receivers (aiohttp)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import sys
import threading
from pathlib import Path

import pg
import psycopg
import pytest
from click.testing import CliRunner
from engine import wait_until
from event_receiver import Receiver

from greenarrow.bin.greenarrow_config import main as greenarrow_config
from greenarrow.lib.config import conf as conflib
from greenarrow.lib.core.paths import Root
from greenarrow.lib.core.rotating_log import CURRENT
from greenarrow.lib.events import destinations, schema, settings, store
from greenarrow.lib.events.processor import Processor, backoff_delay
from greenarrow.lib.events.status import format_status, read_status
from greenarrow.lib.events.types import make_event
from greenarrow.lib.ops.install_root import init_root

pg_conninfo = pg.pg_conninfo
own_cluster = pg.own_cluster

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


_DATABASES: dict[Path, str | None] = {}  # install root -> its test database


def make_root(tmp_path: Path, conninfo: str | None, conf: str) -> Root:
    root = Root(tmp_path / "hvmail")
    init_root(root, me="processor.test")
    _DATABASES[root.path] = conninfo
    write_conf(root, conf)
    return root


def write_conf(root: Root, conf: str) -> None:
    """greenarrow.conf: `conf` and the test's database (or none)."""
    conninfo = _DATABASES[root.path]
    database = (pg.database_conf(conninfo) if conninfo is not None
                else "\ngeneral {\n  events_database_url none\n}\n")
    (root.control / "greenarrow.conf").write_text(conf + database)


def destination(name: str, url: str, events: str = "all", **more: str) -> str:
    lines = [f'event_delivery_destination {name} {{', f'  event_delivery_url "{url}"',
             f"  event_delivery_events {events}"]
    lines += [f"  {key} {value}" for key, value in more.items()]
    return "\n".join(lines) + "\n}\n"


def insert(conninfo: str, start: int, count: int, event_type: str = "delivery_attempt") -> None:
    with psycopg.connect(conninfo) as conn:
        schema.migrate(conn)
        with conn.transaction():
            store.insert_events(conn, [
                make_event(event_type, 1_700_000_000 + i, "s1", f"{event_type} {i}",
                           email=f"u{i}@dest.test") for i in range(start, start + count)])


def emails(batches: list[list[dict]]) -> list[str]:
    return [e["email"] for batch in batches for e in batch]


def expected(start: int, count: int) -> list[str]:
    return [f"u{i}@dest.test" for i in range(start, start + count)]


class Running:
    """A Processor running in a thread of its own (its own event loop)."""

    def __init__(self, root: Root, **params: float) -> None:
        params = {"backoff_first": 0.05, "backoff_cap": 0.3, "idle_poll": 0.05,
                  "prune_seconds": 0.2, **params}
        self.processor = Processor(root, **params)  # type: ignore[arg-type]
        self.processor.configure()
        self.thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)
        self.ready = threading.Event()
        self.error: BaseException | None = None

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.stop_event, self.reload_event = asyncio.Event(), asyncio.Event()
        self.ready.set()
        try:
            await self.processor.run(self.stop_event, self.reload_event)
        except BaseException as exc:
            self.error = exc
            raise

    def __enter__(self) -> Running:
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def reload(self) -> None:
        self.loop.call_soon_threadsafe(self.reload_event.set)

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(30)
        assert not self.thread.is_alive(), "the processor did not stop"
        assert self.error is None, self.error


def count_events(conninfo: str) -> int:
    with psycopg.connect(conninfo) as conn:
        return conn.execute("SELECT count(*) FROM events").fetchone()[0]


# -- configuration


@pytest.mark.parametrize(("body", "line", "words"), [
    ('event_delivery_url "ftp://x.test/"\n  event_delivery_events all', 2, "http:// or https://"),
    ('event_delivery_url "http://"\n  event_delivery_events all', 2, "with a host"),
    ('event_delivery_url "http://x.test:99999/"\n  event_delivery_events all', 2, "not a URL"),
    ('event_delivery_url "http://x.test/"\n  event_delivery_events bounce_all nonsense', 3,
     "unknown event type 'nonsense'"),
    ('event_delivery_url "http://x.test/"', 1, "event_delivery_events is required"),
    ("event_delivery_events all", 1, "exactly one of"),
    ('event_delivery_url "http://x.test/"\n  event_delivery_logfile out\n'
     "  event_delivery_events all", 1, "exactly one of"),
    ('event_delivery_url "http://x.test/"\n  event_delivery_events all\n'
     "  event_delivery_max_batch_size 0", 4, "1 to 10000"),
    ('event_delivery_url "http://x.test/"\n  event_delivery_events all\n'
     '  event_delivery_signing_secret "secret"', 4, "whsec_"),
    ('event_delivery_url "http://x.test/"\n  event_delivery_events all\n'
     "  event_delivery_new_destination keep", 4, "leave_in_queue or drop_from_queue"),
    ('event_delivery_url "http://x.test/"\n  event_delivery_events all\n'
     "  event_delivery_colour blue", 4, "unknown directive event_delivery_colour"),
])
def test_a_bad_destination_is_refused_with_its_line(tmp_path, body, line, words):
    root = Root(tmp_path / "hvmail")
    init_root(root, me="processor.test")
    (root.control / "greenarrow.conf").write_text(f"event_delivery_destination bad {{\n  {body}\n}}\n")
    result = CliRunner().invoke(greenarrow_config, ["check"],
                                env={"HVMAIL_ROOT": str(root.path)})
    assert result.exit_code != 0
    assert f"greenarrow.conf:{line}:" in result.output and words in result.output, result.output


def test_a_good_destination_and_its_defaults():
    tree = conflib.parse(
        destination("primary", "https://app.example.com/greenarrow-events",
                    "delivery_attempt, bounce_all")
        + destination("everything", "http://127.0.0.1:9/x", event_delivery_timeout="5s",
                      event_delivery_max_batch_size="500",
                      event_delivery_signing_secret=f'"{SECRET}"',
                      event_delivery_new_destination="drop_from_queue"))
    primary, everything = destinations.load(tree)
    assert primary == destinations.Destination(
        "primary", "https://app.example.com/greenarrow-events", None,
        ("delivery_attempt", "bounce_all"), 100, 30, None, "leave_in_queue")
    assert everything.event_types is None and everything.timeout == 5
    assert everything.max_batch_size == 500 and everything.new_destination == "drop_from_queue"
    assert everything.signing_secret == b"0123456789abcdef0123456789abcdef"


def test_declaring_a_destination_turns_recording_of_its_types_on():
    tree = conflib.parse(destination("d", "http://127.0.0.1:9/", "engine_click bounce_all"))
    assert settings.recorded_types(tree) == {"engine_click", "bounce_all"}


def test_backoff_is_exponential_capped_and_jittered():
    import random
    rng = random.Random(1)
    delays = [backoff_delay(n, 1.0, 300.0, rng) for n in range(1, 15)]
    for n, delay in enumerate(delays, 1):
        base = min(300.0, 2.0 ** (n - 1))
        assert base * 0.5 <= delay <= base
    assert len({round(d, 6) for d in delays}) == len(delays)  # jittered


# -- delivery


def test_batches_in_id_order_per_type_then_pruned(tmp_path, pg_conninfo):
    with Receiver() as everything, Receiver() as bounces:
        conf = (destination("everything", everything.url, event_delivery_max_batch_size="7")
                + destination("bounces", bounces.url, "bounce_all"))
        root = make_root(tmp_path, pg_conninfo, conf)
        insert(pg_conninfo, 0, 40)
        insert(pg_conninfo, 40, 5, "bounce_all")
        insert(pg_conninfo, 45, 10)
        with Running(root):
            wait_until(lambda: everything.received() >= 55 and bounces.received() >= 5, 60,
                       "every event delivered")
            wait_until(lambda: count_events(pg_conninfo) == 0, 30, "delivered events pruned")
        assert emails(everything.batches) == expected(0, 55)
        assert all(1 <= len(batch) <= 7 for batch in everything.batches)
        assert emails(bounces.batches) == expected(40, 5)
        assert {e["event_type"] for b in bounces.batches for e in b} == {"bounce_all"}
        assert all(h["Content-Type"] == "application/json" for h in everything.headers)
        assert "webhook-signature" not in everything.headers[0]  # no secret: not signed
        # The body is the stored JSON texts joined: the events exactly as made.
        first = make_event("delivery_attempt", 1_700_000_000, "s1", "delivery_attempt 0",
                           email="u0@dest.test")
        assert everything.bodies[0].startswith(b"[" + store.event_json(first).encode() + b",")


def test_signed_posts_verify_with_the_standard_webhooks_library(tmp_path, pg_conninfo):
    standardwebhooks = pytest.importorskip("standardwebhooks")
    with Receiver() as receiver:
        conf = destination("signed", receiver.url, event_delivery_signing_secret=f'"{SECRET}"',
                           event_delivery_max_batch_size="4")
        root = make_root(tmp_path, pg_conninfo, conf)
        insert(pg_conninfo, 0, 10)
        with Running(root):
            wait_until(lambda: receiver.received() >= 10, 60, "delivery")
        verifier = standardwebhooks.Webhook(SECRET)
        for body, headers, batch in zip(receiver.bodies, receiver.headers, receiver.batches,
                                        strict=True):
            assert verifier.verify(body, headers) == batch
            assert headers["webhook-id"] == batch[0]["event_unique_id"]
        forged = dict(receiver.headers[0])
        with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
            verifier.verify(receiver.bodies[0].replace(b"u0@", b"u9@"), forged)


def test_a_failing_destination_retries_and_does_not_hold_up_another(tmp_path, pg_conninfo):
    with Receiver() as bad, Receiver() as good:
        bad.mode = "fail"
        conf = (destination("bad", bad.url, event_delivery_max_batch_size="10")
                + destination("good", good.url, event_delivery_max_batch_size="10"))
        root = make_root(tmp_path, pg_conninfo, conf)
        insert(pg_conninfo, 0, 30)
        with Running(root):
            wait_until(lambda: good.received() >= 30, 60, "the good destination served")
            wait_until(lambda: bad.requests >= 4, 60, "retries of the failing destination")
            with psycopg.connect(pg_conninfo) as conn:
                status = {d.name: d for d in read_status(conn, root).destinations}
            assert status["bad"].last_error == "HTTP 500 Internal Server Error"
            assert status["bad"].retrying + status["bad"].waiting == 30
            assert status["good"].retrying == status["good"].waiting == 0
            assert count_events(pg_conninfo) == 30  # kept while "bad" lacks them
            insert(pg_conninfo, 30, 5)
            wait_until(lambda: good.received() >= 35, 60, "new events to the good one")
            bad.mode = "ok"
            wait_until(lambda: set(bad.unique_ids()) == set(good.unique_ids()), 60,
                       "everything delivered once the failing destination is back")
            wait_until(lambda: count_events(pg_conninfo) == 0, 30, "pruned")
        assert emails(good.batches) == expected(0, 35)
        assert sorted(emails(bad.batches)) == sorted(expected(0, 35))
        with psycopg.connect(pg_conninfo) as conn:
            assert conn.execute("SELECT count(*) FROM event_retries").fetchone()[0] == 0


@pytest.mark.parametrize("mode", ["slow", "cut", "down"])
def test_timeouts_cut_connections_and_a_receiver_down_for_a_while(tmp_path, pg_conninfo,
                                                                  mode):
    with Receiver() as receiver, Receiver() as other:
        receiver.slow_seconds = 3.0
        conf = (destination("flaky", receiver.url, event_delivery_timeout="1",
                            event_delivery_max_batch_size="5")
                + destination("other", other.url))
        root = make_root(tmp_path, pg_conninfo, conf)
        if mode == "down":
            receiver.stop()
        else:
            receiver.mode = mode
        with Running(root):
            insert(pg_conninfo, 0, 20)
            wait_until(lambda: other.received() >= 20, 60, "the other destination served")
            if mode != "down":
                wait_until(lambda: receiver.requests >= 2, 60, "failed attempts")
            else:
                wait_until(lambda: _last_error(pg_conninfo, "flaky"), 60, "a refused connection")
            assert receiver.received() == 0
            error = _last_error(pg_conninfo, "flaky")
            assert {"slow": "no answer within 1s", "cut": "ServerDisconnected",
                    "down": "ClientConnectorError"}[mode] in error
            if mode == "down":
                receiver.start()  # the same port again
            receiver.mode = "ok"
            wait_until(lambda: len(receiver.unique_ids()) >= 20, 60, "everything once it is back")
        assert sorted(emails(receiver.batches)) == sorted(expected(0, 20))


def _last_error(conninfo: str, name: str) -> str:
    with psycopg.connect(conninfo) as conn:
        row = conn.execute("SELECT last_error FROM event_destinations WHERE name = %s",
                           (name,)).fetchone()
    return (row[0] or "") if row else ""


def test_a_new_destination_takes_the_queue_or_only_new_events(tmp_path, pg_conninfo):
    with Receiver() as first, Receiver() as replay, Receiver() as fresh:
        root = make_root(tmp_path, pg_conninfo, destination("first", first.url))
        insert(pg_conninfo, 0, 10)
        with Running(root) as running:
            wait_until(lambda: first.received() >= 10, 60, "the first destination")
            insert(pg_conninfo, 10, 10)  # a receiver that is paused keeps these queued
            first.mode = "fail"
            insert(pg_conninfo, 20, 5)
            wait_until(lambda: first.requests >= 12, 60, "the first one failing")
            write_conf(
                root, destination("first", first.url)
                + destination("replay", replay.url,
                              event_delivery_new_destination="leave_in_queue")
                + destination("fresh", fresh.url,
                              event_delivery_new_destination="drop_from_queue"))
            running.reload()
            wait_until(lambda: replay.received() >= 15, 60, "what is still queued")
            insert(pg_conninfo, 25, 3)
            wait_until(lambda: fresh.received() >= 3 and replay.received() >= 18, 60,
                       "new events")
        # Events 0-9 were delivered everywhere configured then, and pruned.
        assert sorted(emails(replay.batches)) == sorted(expected(10, 18))
        assert emails(fresh.batches) == expected(25, 3)


def test_a_removed_destination_releases_its_events(tmp_path, pg_conninfo, caplog):
    with Receiver() as keep, Receiver() as gone:
        gone.mode = "fail"
        root = make_root(tmp_path, pg_conninfo,
                         destination("keep", keep.url) + destination("gone", gone.url))
        insert(pg_conninfo, 0, 10)
        with Running(root) as running:
            wait_until(lambda: keep.received() >= 10 and gone.requests >= 1, 60, "delivery")
            assert count_events(pg_conninfo) == 10
            write_conf(root, destination("keep", keep.url))
            with caplog.at_level(logging.WARNING, "greenarrow.events.processor"):
                running.reload()
                wait_until(lambda: count_events(pg_conninfo) == 0, 60, "pruned")
        assert "gone is no longer configured" in caplog.text


def test_logfile_destination_writes_json_lines(tmp_path, pg_conninfo):
    root = make_root(tmp_path, pg_conninfo,
                     "event_delivery_destination archive {\n"
                     "  event_delivery_logfile events-archive\n"
                     "  event_delivery_events delivery_attempt\n"
                     "  event_delivery_max_batch_size 3\n}\n")
    insert(pg_conninfo, 0, 10)
    insert(pg_conninfo, 10, 2, "engine_open")
    current = root.log / "events-archive" / CURRENT
    with Running(root):
        wait_until(lambda: current.exists() and len(current.read_bytes().splitlines()) >= 10,
                   60, "the log file")
        wait_until(lambda: count_events(pg_conninfo) == 0, 30, "pruned")
    lines = current.read_bytes().splitlines()
    assert [json.loads(line)["email"] for line in lines] == expected(0, 10)


def test_events_status_per_destination(tmp_path, pg_conninfo):
    with Receiver() as receiver:
        receiver.mode = "fail"
        root = make_root(tmp_path, pg_conninfo,
                         destination("primary", receiver.url, event_delivery_max_batch_size="5"))
        insert(pg_conninfo, 0, 12)
        with Running(root, backoff_first=30.0, backoff_cap=30.0):
            wait_until(lambda: _last_error(pg_conninfo, "primary"), 60, "a failure")
            with psycopg.connect(pg_conninfo) as conn:
                text = format_status(read_status(conn, root))
    row = next(line for line in text.splitlines() if line.startswith("primary"))
    assert row.split()[:3] == ["primary", "7", "5"], text
    assert "HTTP 500" in row and " in " in row  # the next retry, not due yet
    # A destination declared but not started by the processor yet is named.
    write_conf(root, destination("primary", receiver.url) + destination("later", receiver.url))
    with psycopg.connect(pg_conninfo) as conn:
        text = format_status(read_status(conn, root))
    assert "later: declared in greenarrow.conf, not started yet" in text


def test_an_unreachable_database_at_start_is_logged_and_retried(tmp_path, own_cluster, caplog):
    conninfo = own_cluster.new_database()
    insert(conninfo, 0, 10)
    own_cluster.stop()
    with Receiver() as receiver:
        root = make_root(tmp_path, conninfo, destination("primary", receiver.url))
        with caplog.at_level(logging.INFO, "greenarrow.events.processor"):
            with Running(root):
                wait_until(lambda: "events database unavailable, retrying" in caplog.text, 30,
                           "the outage logged")
                own_cluster.start()
                wait_until(lambda: receiver.received() >= 10, 60, "delivery once it is up")
        assert "events database reached after" in caplog.text
    assert emails(receiver.batches) == expected(0, 10)


def test_the_bench_runs_on_tiny_inputs(pg_conninfo):
    """bench/events_processor_bench.py end to end on a few hundred events (no figures)."""
    repo = str(Path(__file__).resolve().parent.parent)
    if repo not in sys.path:
        sys.path.insert(0, repo)
    from bench import events_processor_bench as bench

    said: list[str] = []
    drained = bench.drain(300, 50, pg_conninfo, say=said.append)
    timed = bench.latency(400, 0.5, 50, pg_conninfo, say=said.append)
    assert drained["drain_events_per_s"] > 0 and timed["latency_p99_s"] >= 0
    assert "processor drain: 300 events" in said[0] and "p99" in said[1]


def test_a_running_engine_delivers_its_attempts_to_the_destination(tmp_path, pg_conninfo):
    """hvmail_init starts the processor after the recorder; a destination alone
    (no record_events) turns delivery_attempt recording on."""
    from engine import Engine, route_conf
    from smtp_receivers import Receiver as SmtpReceiver

    with SmtpReceiver("127.0.0.1") as rx, Receiver() as events:
        conf = ("general {\n  server_id e2e\n}\n" + route_conf({"dest.test": rx.port})
                + destination("app", events.url, "delivery_attempt"))
        engine = Engine(tmp_path, conf=conf, database=pg.database_url(pg_conninfo))
        with engine:
            status = engine.program("hvmail_init", "status").stdout.decode()
            assert "event-recorder" in status and "event-processor" in status
            for n in range(5):
                result = engine.sendmail("-f", "a@origin.test", f"u{n}@dest.test",
                                         message=f"Subject: {n}\n\nbody\n".encode())
                assert result.returncode == 0, result.stderr
            wait_until(lambda: {e["email"] for b in events.batches for e in b
                                if e["status"] == "success"} >= set(expected(0, 5)), 120,
                       "every attempt at the events receiver")
            shown = engine.program("greenarrow", "events", "status")
            assert shown.returncode == 0 and "app" in shown.stdout.decode()
    assert all(e["event_type"] == "delivery_attempt" and e["server_id"] == "e2e"
               for b in events.batches for e in b)


def test_a_second_processor_started_by_mistake_sends_nothing_twice(tmp_path, pg_conninfo,
                                                                    caplog):
    with Receiver() as receiver:
        root = make_root(tmp_path, pg_conninfo,
                         destination("primary", receiver.url, event_delivery_max_batch_size="3"))
        with caplog.at_level(logging.WARNING, "greenarrow.events.processor"):
            with Running(root), Running(root):
                for start in range(0, 60, 6):
                    insert(pg_conninfo, start, 6)
                wait_until(lambda: receiver.received() >= 60, 60, "delivery")
                wait_until(lambda: "another event processor is delivering" in caplog.text, 30,
                           "the second one waiting")
    assert sorted(receiver.unique_ids().values()) == [1] * 60


def test_the_service_refuses_a_bad_destination_with_its_line(tmp_path):
    import os
    import subprocess

    root = make_root(tmp_path, None, destination("x", "http://127.0.0.1:9/", "nonsense"))
    result = subprocess.run([sys.executable, "-m", "greenarrow.bin.event_processor"],
                            env=dict(os.environ, HVMAIL_ROOT=str(root.path)),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 111
    assert "greenarrow.conf:3: event_delivery_events: unknown event type 'nonsense'" in \
        result.stderr


def test_lite_events_carry_their_row_id(tmp_path, pg_conninfo):
    with Receiver() as receiver:
        root = make_root(tmp_path, pg_conninfo, destination("lite", receiver.url))
        insert(pg_conninfo, 0, 2)
        with psycopg.connect(pg_conninfo) as conn, conn.transaction():
            store.insert_events(conn, [make_event("bounce_lite", 1_700_000_000, "s1", "lite 1",
                                                  bounce_code=10)])
            lite_id = conn.execute("SELECT id FROM events WHERE event_type = 'bounce_lite'"
                                   ).fetchone()[0]
        with Running(root):
            wait_until(lambda: receiver.received() >= 3, 60, "delivery")
    events = [e for b in receiver.batches for e in b]
    assert [e.get("id") for e in events] == [None, None, lite_id]
    assert "id" not in events[0]
    assert list(events[2]) == list(make_event("bounce_lite", 0, "s", "k"))  # field order kept


def test_greenarrows_one_line_example_parses():
    tree = conflib.parse('event_delivery_destination primary { event_delivery_url '
                         '"https://app.example.com/greenarrow-events"; event_delivery_events all }\n')
    (primary,) = destinations.load(tree)
    assert primary.url == "https://app.example.com/greenarrow-events"
    assert primary.event_types is None
