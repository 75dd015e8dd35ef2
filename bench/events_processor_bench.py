"""How fast the event processor drains the events table to a local HTTP receiver.

    python -m bench.events_processor_bench [--n 200000] [--batch 100] [--conninfo CONNINFO]
    python -m bench.events_processor_bench --latency-rate 5000 --latency-seconds 20

Drain: inserts `--n` delivery_attempt events into a fresh database (store.
insert_rows, batches of 1,000), then times one in-process Processor posting
them to a receiver (aiohttp, in a process of its own on 127.0.0.1) in
batches of `--batch`, until the receiver has counted all N: events/s.

Latency: with the processor running, inserts events at `--latency-rate` per
second (in transactions of 1/20 s) for `--latency-seconds`; each event's
`timestamp` is the wall time of its insert's commit, and the receiver takes
its arrival time minus that: p50/p99/max seconds from the events table to
the POST (the recorder's own delay, at most its 0.25 s poll, comes on top).

Without `--conninfo` it starts a throwaway cluster (tests/pg.py) and removes
it afterwards. Bounded: every loop is a fixed count or has a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psycopg
from psycopg.conninfo import make_conninfo

from greenarrow.lib.core.paths import Root
from greenarrow.lib.events import schema, store
from greenarrow.lib.events.processor import Processor
from greenarrow.lib.events.types import make_event
from greenarrow.lib.ops.install_root import init_root

REPO = Path(__file__).resolve().parent.parent

# The receiver: counts events by their "event_unique_id" keys (no JSON decoding
# unless latencies are wanted); GET /count answers the count and latencies.
RECEIVER = r"""
import json, sys, time
from aiohttp import web
parse = sys.argv[1] == "latency"
state = {"events": 0, "latencies": []}
async def post(request):
    body = await request.read()
    now = time.time()
    if parse:
        events = json.loads(body)
        state["events"] += len(events)
        state["latencies"].extend(now - e["timestamp"] for e in events)
    else:
        state["events"] += body.count(b'"event_unique_id"')
    return web.Response(status=200)
async def count(request):
    return web.json_response(state)
app = web.Application(client_max_size=256 << 20)
app.router.add_post("/events", post)
app.router.add_get("/count", count)
async def main():
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(site._server.sockets[0].getsockname()[1], flush=True)
    while True:
        await asyncio.sleep(3600)
import asyncio
asyncio.run(main())
"""


def event(n: int, now: float) -> dict:
    return make_event(
        "delivery_attempt", int(now), "bench", f"bench {n}", timestamp=now, channel="remote",
        status="success", is_retry=0, msguid=f"1700000000.{n}.bench",
        sender="bounce@origin.test", mtaid="pool", mtaid_name="pool",
        injected_time=1_700_000_000,
        message="10.0.0.1 accepted message. Remote host said: 250 2.0.0 OK queued",
        outmtaid_ip="10.0.0.2", outmtaid_hostname="out.origin.test",
        email=f"user{n}@dest.test", listid="list1", sendid="send1",
        mx_hostname="mx.dest.test", mx_ip="10.0.0.1")


def fresh_database(conninfo: str, name: str) -> str:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    return make_conninfo(conninfo, dbname=name)


def database_url(conninfo: str) -> str:
    """`events_database_url` for a conninfo: a URL as is, `key=value` words as a URL."""
    if conninfo.startswith(("postgresql://", "postgres://")):
        return conninfo
    fields = dict(part.split("=", 1) for part in conninfo.split())
    user = fields.get("user", "")
    query = f"?host={fields['host']}" if fields.get("host", "").startswith("/") else ""
    host = "" if query else fields.get("host", "")
    port = f":{fields['port']}" if "port" in fields else ""
    return f"postgresql://{user}{'@' if user else ''}{host}{port}/{fields.get('dbname', '')}{query}"


def receiver_state(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/count", timeout=10) as response:
        return json.loads(response.read())


class Background:
    """A Processor in a thread of its own."""

    def __init__(self, root: Root) -> None:
        self.processor = Processor(root)
        self.processor.configure()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.stop = asyncio.Event()
        self.ready.set()
        await self.processor.run(self.stop, asyncio.Event())

    def __enter__(self) -> Background:
        self.thread.start()
        self.ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(60)


def setup_root(tmp: str, conninfo: str, port: int, batch: int) -> Root:
    root = Root(Path(tmp) / "hvmail")
    init_root(root, me="bench.test")
    (root.control / "greenarrow.conf").write_text(
        "event_delivery_destination bench {\n"
        f'  event_delivery_url "http://127.0.0.1:{port}/events"\n'
        "  event_delivery_events all\n"
        f"  event_delivery_max_batch_size {batch}\n}}\n"
        f'general {{\n  events_database_url "{database_url(conninfo)}"\n}}\n')
    return root


def start_receiver(mode: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-c", RECEIVER, mode], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def drain(n: int, batch: int, conninfo: str, say=print) -> dict[str, float]:
    db = fresh_database(conninfo, "events_processor_bench")
    with psycopg.connect(db) as conn:
        schema.migrate(conn)
        now = time.time()
        for start in range(0, n, 1000):
            with conn.transaction():
                store.insert_events(conn, [event(i, now) for i in range(start, min(start + 1000, n))])
    proc, port = start_receiver("count")
    try:
        with tempfile.TemporaryDirectory(prefix="events-processor-bench-") as tmp:
            root = setup_root(tmp, db, port, batch)
            started = time.perf_counter()
            with Background(root):
                deadline = time.monotonic() + 3600
                while receiver_state(port)["events"] < n and time.monotonic() < deadline:
                    time.sleep(0.05)
                elapsed = time.perf_counter() - started
            got = receiver_state(port)["events"]
    finally:
        proc.kill()
        proc.wait()
    assert got >= n, f"received {got} of {n}"
    say(f"processor drain: {n} events, batches of {batch}, in {elapsed:.2f}s "
        f"= {n / elapsed:,.0f} events/s")
    return {"drain_events_per_s": n / elapsed}


def latency(rate: int, seconds: float, batch: int, conninfo: str, say=print) -> dict[str, float]:
    db = fresh_database(conninfo, "events_processor_bench_latency")
    with psycopg.connect(db) as conn:
        schema.migrate(conn)
    proc, port = start_receiver("latency")
    total = 0
    try:
        with tempfile.TemporaryDirectory(prefix="events-processor-bench-") as tmp:
            root = setup_root(tmp, db, port, batch)
            with Background(root), psycopg.connect(db) as conn:
                tick = 0.05
                per_tick = max(1, int(rate * tick))
                started = time.monotonic()
                for step in range(int(seconds / tick)):  # bounded
                    with conn.transaction():
                        now = time.time()  # committed right after: the event's birth
                        store.insert_events(conn, [event(total + i, now) for i in range(per_tick)])
                    total += per_tick
                    pause = started + (step + 1) * tick - time.monotonic()
                    if pause > 0:
                        time.sleep(pause)
                deadline = time.monotonic() + 600
                while receiver_state(port)["events"] < total and time.monotonic() < deadline:
                    time.sleep(0.05)
            state = receiver_state(port)
    finally:
        proc.kill()
        proc.wait()
    lat = sorted(state["latencies"])
    assert len(lat) >= total, f"received {len(lat)} of {total}"
    p50, p99 = lat[len(lat) // 2], lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    say(f"processor latency at {rate}/s for {seconds:.0f}s ({total} events, batches of "
        f"{batch}): p50 {p50:.3f}s p99 {p99:.3f}s max {lat[-1]:.3f}s")
    return {"latency_p50_s": p50, "latency_p99_s": p99, "latency_max_s": lat[-1]}


def run(args: argparse.Namespace, conninfo: str) -> dict[str, float]:
    if args.latency_rate:
        return latency(args.latency_rate, args.latency_seconds, args.batch, conninfo)
    return drain(args.n, args.batch, conninfo)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200_000, help="events queued before the drain")
    parser.add_argument("--batch", type=int, default=100, help="event_delivery_max_batch_size")
    parser.add_argument("--latency-rate", type=int, default=0,
                        help="measure latency at this many events/s instead of a drain")
    parser.add_argument("--latency-seconds", type=float, default=20.0)
    parser.add_argument("--conninfo", help="a PostgreSQL server to use (default: a throwaway one)")
    args = parser.parse_args(argv)
    if args.conninfo:
        run(args, args.conninfo)
        return 0
    sys.path.insert(0, str(REPO / "tests"))
    from pg import Cluster

    cluster = Cluster()
    try:
        cluster.start()
        run(args, cluster.conninfo())
    finally:
        cluster.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
