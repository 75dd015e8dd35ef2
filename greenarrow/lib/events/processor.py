"""The event processor: delivers the events table to each configured destination.

Per destination (greenarrow.lib.events.destinations) one asyncio task with
its own database connection and, for a URL, its own keep-alive HTTP
session, so a slow or dead destination never holds up another. Each task:

1. sends the destination's retries that are due (event_retries), oldest due
   first, before anything new;
2. otherwise reads the next events after its cursor, in id order, of the
   types it takes, at most `max_batch_size`;
3. POSTs them as one JSON array (the stored JSON texts joined, never
   re-encoded), or appends them to its log folder as JSON lines;
4. on success moves the cursor past the batch (or deletes the retries it
   sent); on failure, in one transaction, puts the batch into event_retries
   with a due time, moves the cursor past it, records the error -- and backs
   off: the destination sends nothing until its back-off is over.

The cursor and the retries only change after the POST is answered, so a
crash (of this process, of PostgreSQL) between the POST and the commit sends
that batch again: delivery is at least once, duplicates carry the same
`event_unique_id`. Nothing is ever dropped: retries go on, capped at
BACKOFF_CAP between attempts, until the destination takes them.

Back-off (destinations and events share one schedule, `backoff_delay`):
after the n-th consecutive failure, min(BACKOFF_CAP, BACKOFF_FIRST * 2**(n-1))
times a random factor between 0.5 and 1 (jitter, so destinations and events
do not retry in lock step): about 1, 2, 4 ... 256, then 300 s. When a
destination that failed OUTAGE_FAILURES times in a row takes a batch again,
its retries are made due at once, so a day-long outage is caught up as soon
as the receiver is back rather than over the next five minutes.

Pruning: an event every destination's cursor has passed and that is in no
destination's retries is delivered everywhere and is deleted (GreenArrow
deletes on success too). With no destination nothing is deleted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import psycopg

from greenarrow.lib.config import conf as conf_file
from greenarrow.lib.core.paths import Root
from greenarrow.lib.core.rotating_log import RotatingLog
from greenarrow.lib.events import destinations as destinations_mod
from greenarrow.lib.events import schema, store
from greenarrow.lib.events.database import conninfo as database_conninfo
from greenarrow.lib.events.destinations import DROP_FROM_QUEUE, Destination, signature_headers

log = logging.getLogger("greenarrow.events.processor")

IDLE_POLL_SECONDS = 0.2  # how often an idle destination looks for new events
BACKOFF_FIRST = 1.0
BACKOFF_CAP = 300.0
OUTAGE_FAILURES = 3  # consecutive failures after which a success re-dues the retries
PRUNE_SECONDS = 2.0
PRUNE_CHUNK = 10_000
RECONNECT_SECONDS = (0.5, 1.0, 2.0, 5.0)  # waits between connection attempts
DOWN_LOG_SECONDS = 60.0
STOP_GRACE_SECONDS = 5.0  # a POST under way when asked to stop gets this long
# pg_try_advisory_lock(DESTINATION_LOCK, hashtext(name)): one sender per destination.
DESTINATION_LOCK = 0x67616576  # "gaev"
ERROR_TEXT_LIMIT = 500  # characters of an error kept in the tables
# Types whose `id` field is the events table's row id, filled in when delivered
# (greenarrow.lib.events.types: the Lite bounce and complaint events).
ROW_ID_TYPES = frozenset({"bounce_lite", "scomp_lite"})


def backoff_delay(failures: int, first: float = BACKOFF_FIRST, cap: float = BACKOFF_CAP,
                  rng: random.Random | None = None) -> float:
    """Seconds to wait after the `failures`-th consecutive failure (1 or more)."""
    base = min(cap, first * 2 ** min(max(failures, 1) - 1, 40))
    return base * (0.5 + 0.5 * (rng or random).random())


def delivered_text(row_id: int, event_type: str, text: str) -> str:
    """The JSON text delivered for a stored event: as stored, except that the
    Lite types get their row id in `id`."""
    if event_type not in ROW_ID_TYPES:
        return text
    event = json.loads(text)
    event["id"] = row_id
    return store.event_json(event)


def batch_of(rows: list[tuple], from_retries: bool, end: int = 0) -> Batch:
    """A batch from rows (id, event_unique_id, event_type, event text)."""
    return Batch([r[0] for r in rows], [r[1] for r in rows],
                 [delivered_text(r[0], r[2], r[3]) for r in rows], from_retries, end)


@dataclass
class Batch:
    """Events to hand over together, in the order they are sent."""

    ids: list[int]
    unique_ids: list[str]
    texts: list[str]
    from_retries: bool
    end: int = 0  # for new events: the cursor after this batch

    def body(self) -> bytes:
        return ("[" + ",".join(self.texts) + "]").encode("utf-8")

    def lines(self) -> bytes:
        return ("\n".join(self.texts) + "\n").encode("utf-8")


class DeliveryFailed(Exception):
    """The destination did not take the batch; str() says why (for last_error)."""


class HttpSender:
    """POSTs batches to one URL over a keep-alive session."""

    def __init__(self, destination: Destination) -> None:
        assert destination.url is not None
        self.destination = destination
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=destination.timeout),
            connector=aiohttp.TCPConnector(limit=1),
            headers={"User-Agent": "greenarrow-event-processor"},
        )

    async def send(self, batch: Batch) -> None:
        body = batch.body()
        headers = {"Content-Type": "application/json"}
        if self.destination.signing_secret is not None:
            headers.update(signature_headers(self.destination.signing_secret,
                                             batch.unique_ids[0], int(time.time()), body))
        try:
            async with self.session.post(self.destination.url, data=body, headers=headers,
                                         allow_redirects=False) as response:
                await response.read()  # read to the end so the connection can be kept
                if not 200 <= response.status < 300:
                    raise DeliveryFailed(f"HTTP {response.status} {response.reason or ''}".strip())
        except DeliveryFailed:
            raise
        except TimeoutError:
            raise DeliveryFailed(f"no answer within {self.destination.timeout}s") from None
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise DeliveryFailed(f"{type(exc).__name__}: {exc}".strip()) from None

    async def close(self) -> None:
        await self.session.close()


class LogfileSender:
    """Appends batches as JSON lines to a rotating log folder, synced before success."""

    def __init__(self, destination: Destination) -> None:
        assert destination.logfile is not None
        self.destination = destination
        self.log: RotatingLog | None = None

    def _write(self, data: bytes) -> None:
        if self.log is None:
            self.log = RotatingLog(self.destination.logfile, destinations_mod.LOGFILE_MAX_BYTES,
                                   destinations_mod.LOGFILE_KEEP)
        self.log.write_bytes(data)
        fd = os.open(self.log.path, os.O_RDONLY)
        try:
            os.fsync(fd)  # the cursor moves only once the lines are on disk
        finally:
            os.close(fd)

    async def send(self, batch: Batch) -> None:
        try:
            await asyncio.to_thread(self._write, batch.lines())
        except OSError as exc:
            if self.log is not None:
                self.log.close()
                self.log = None
            raise DeliveryFailed(f"cannot write {self.destination.logfile}: {exc}") from None

    async def close(self) -> None:
        if self.log is not None:
            self.log.close()
            self.log = None


def sender_of(destination: Destination) -> HttpSender | LogfileSender:
    return HttpSender(destination) if destination.url is not None else LogfileSender(destination)


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), timeout=max(seconds, 0.0))
    except TimeoutError:
        pass


def _clip(text: str) -> str:
    return text[:ERROR_TEXT_LIMIT]


async def connect(info: str, name: str) -> psycopg.AsyncConnection:
    return await psycopg.AsyncConnection.connect(
        info, autocommit=True, connect_timeout=10,
        application_name=f"greenarrow event-processor {name}"[:63])


class DestinationWorker:
    """Delivers to one destination until `stop` is set."""

    def __init__(self, destination: Destination, info: str, stop: asyncio.Event,
                 backoff_first: float = BACKOFF_FIRST, backoff_cap: float = BACKOFF_CAP,
                 idle_poll: float = IDLE_POLL_SECONDS) -> None:
        self.destination = destination
        self.info = info
        self.stop = stop
        self.backoff_first = backoff_first
        self.backoff_cap = backoff_cap
        self.idle_poll = idle_poll
        self.cursor = 0
        self.failures = 0
        self.delivered = 0  # events handed over since start (for the log and the bench)
        self._types = list(destination.event_types) if destination.event_types else None

    def delay(self, failures: int) -> float:
        return backoff_delay(failures, self.backoff_first, self.backoff_cap)

    async def run(self) -> None:
        sender = sender_of(self.destination)
        attempts = 0
        down_since: float | None = None
        last_down_log = 0.0
        busy_logged = False
        try:
            while not self.stop.is_set():
                conn = None
                try:
                    conn = await connect(self.info, self.destination.name)
                    if not await self.lock(conn):
                        if not busy_logged:
                            log.warning("%s: another event processor is delivering to this "
                                        "destination; waiting", self.destination.name)
                            busy_logged = True
                        await conn.close()
                        conn = None
                        await _wait(self.stop, RECONNECT_SECONDS[-1])
                        continue
                    busy_logged = False
                    row = await (await conn.execute(
                        "SELECT cursor FROM event_destinations WHERE name = %s",
                        (self.destination.name,))).fetchone()
                    if row is None:
                        raise RuntimeError(f"destination {self.destination.name} has no row")
                    self.cursor = row[0]
                    if down_since is not None:
                        log.info("%s: events database is back after %.0fs",
                                 self.destination.name, time.monotonic() - down_since)
                    down_since, attempts = None, 0
                    await self.deliver(conn, sender)
                except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                    now = time.monotonic()
                    if down_since is None:
                        down_since = last_down_log = now
                        log.warning("%s: events database unavailable, retrying: %s",
                                    self.destination.name, str(exc).strip())
                    elif now - last_down_log >= DOWN_LOG_SECONDS:
                        last_down_log = now
                        log.warning("%s: events database still unavailable after %.0fs: %s",
                                    self.destination.name, now - down_since, str(exc).strip())
                    await _wait(self.stop,
                                RECONNECT_SECONDS[min(attempts, len(RECONNECT_SECONDS) - 1)])
                    attempts += 1
                except (psycopg.Error, RuntimeError) as exc:
                    # Not an outage (a schema or data problem): say so, and try again
                    # later rather than stop the other destinations.
                    log.error("%s: %s; trying again in %.0fs", self.destination.name,
                              str(exc).strip(), RECONNECT_SECONDS[-1])
                    await _wait(self.stop, RECONNECT_SECONDS[-1])
                finally:
                    if conn is not None:
                        await conn.close()
        finally:
            await sender.close()

    async def lock(self, conn: psycopg.AsyncConnection) -> bool:
        """Take this destination's session lock (released when the connection ends)."""
        row = await (await conn.execute("SELECT pg_try_advisory_lock(%s, hashtext(%s))",
                                        (DESTINATION_LOCK, self.destination.name))).fetchone()
        return bool(row[0])

    async def deliver(self, conn: psycopg.AsyncConnection,
                      sender: HttpSender | LogfileSender) -> None:
        while not self.stop.is_set():
            batch = await self.due_retries(conn)
            if batch is None:
                batch = await self.new_events(conn)
            if batch is None:
                await _wait(self.stop, self.idle_poll)
                continue
            try:
                await sender.send(batch)
            except DeliveryFailed as exc:
                self.failures += 1
                await self.record_failure(conn, batch, str(exc))
                delay = self.delay(self.failures)
                log.warning("%s: %d events not delivered (%s, failure %d in a row); "
                            "sending again in %.1fs", self.destination.name, len(batch.ids),
                            exc, self.failures, delay)
                await _wait(self.stop, delay)
                continue
            await self.record_success(conn, batch)
            self.delivered += len(batch.ids)

    async def due_retries(self, conn: psycopg.AsyncConnection) -> Batch | None:
        rows = await (await conn.execute(
            "SELECT e.id, e.event_unique_id, e.event_type, e.event::text FROM event_retries r "
            "JOIN events e ON e.id = r.event_id "
            "WHERE r.destination = %s AND r.due <= now() ORDER BY r.due, r.event_id LIMIT %s",
            (self.destination.name, self.destination.max_batch_size))).fetchall()
        if not rows:
            return None
        return batch_of(rows, True)

    async def new_events(self, conn: psycopg.AsyncConnection) -> Batch | None:
        """The next events after the cursor, or None (the cursor moved past any
        events of types this destination does not take)."""
        # Every id up to the largest visible one is committed already (the
        # store's write lock), so the cursor may move up to it.
        top = (await (await conn.execute("SELECT max(id) FROM events")).fetchone())[0]
        if top is None or top <= self.cursor:
            return None
        limit = self.destination.max_batch_size
        if self._types is None:
            query = ("SELECT id, event_unique_id, event_type, event::text FROM events "
                     "WHERE id > %s AND id <= %s ORDER BY id LIMIT %s")
            params: tuple = (self.cursor, top, limit)
        else:
            query = ("SELECT id, event_unique_id, event_type, event::text FROM events "
                     "WHERE id > %s AND id <= %s AND event_type = ANY (%s) ORDER BY id LIMIT %s")
            params = (self.cursor, top, self._types, limit)
        rows = await (await conn.execute(query, params)).fetchall()
        end = rows[-1][0] if len(rows) == limit else top
        if not rows:
            await self.move_cursor(conn, end)
            return None
        return batch_of(rows, False, end)

    async def move_cursor(self, conn: psycopg.AsyncConnection, end: int,
                          success: bool = False) -> None:
        await conn.execute(
            "UPDATE event_destinations SET cursor = %s, updated_at = now()"
            + (", last_success_at = now()" if success else "")
            + " WHERE name = %s AND cursor < %s", (end, self.destination.name, end))
        self.cursor = max(self.cursor, end)

    async def record_success(self, conn: psycopg.AsyncConnection, batch: Batch) -> None:
        name = self.destination.name
        if batch.from_retries:
            async with conn.transaction():
                await conn.execute("DELETE FROM event_retries WHERE destination = %s "
                                   "AND event_id = ANY (%s)", (name, batch.ids))
                await conn.execute("UPDATE event_destinations SET last_success_at = now(), "
                                   "updated_at = now() WHERE name = %s", (name,))
        else:
            await self.move_cursor(conn, batch.end, success=True)
        if self.failures >= OUTAGE_FAILURES:
            cur = await conn.execute("UPDATE event_retries SET due = now() "
                                     "WHERE destination = %s AND due > now()", (name,))
            log.info("%s: delivering again after %d failures; %d events in retry are due now",
                     name, self.failures, cur.rowcount)
        elif self.failures:
            log.info("%s: delivering again", name)
        self.failures = 0

    async def record_failure(self, conn: psycopg.AsyncConnection, batch: Batch,
                             error: str) -> None:
        name, error = self.destination.name, _clip(error)
        async with conn.transaction():
            if batch.from_retries:
                # Each event's next due time follows its own attempt count.
                await conn.execute(
                    "UPDATE event_retries SET attempts = attempts + 1, last_error = %s, "
                    "due = now() + make_interval(secs => least(%s, %s * power(2, "
                    "least(attempts, 40))) * (0.5 + 0.5 * random())) "
                    "WHERE destination = %s AND event_id = ANY (%s)",
                    (error, self.backoff_cap, self.backoff_first, name, batch.ids))
            else:
                await conn.execute(
                    "INSERT INTO event_retries (destination, event_id, due, last_error) "
                    "SELECT %s, id, now() + make_interval(secs => %s), %s "
                    "FROM unnest(%s::bigint[]) AS id ON CONFLICT DO NOTHING",
                    (name, self.delay(1), error, batch.ids))
                await conn.execute(
                    "UPDATE event_destinations SET cursor = greatest(cursor, %s) "
                    "WHERE name = %s", (batch.end, name))
            await conn.execute(
                "UPDATE event_destinations SET last_error = %s, last_error_at = now(), "
                "updated_at = now() WHERE name = %s", (error, name))
        if not batch.from_retries:
            self.cursor = max(self.cursor, batch.end)


async def sync_destinations(conn: psycopg.AsyncConnection,
                            destinations: list[Destination]) -> None:
    """Make event_destinations match the configuration: add new destinations
    (cursor 0, or the newest id for drop_from_queue), update their types, and
    remove those no longer configured (with their retries)."""
    async with conn.transaction():
        rows = await (await conn.execute(
            "SELECT name FROM event_destinations FOR UPDATE")).fetchall()
        known = {row[0] for row in rows}
        for destination in destinations:
            types = list(destination.event_types) if destination.event_types else None
            if destination.name in known:
                await conn.execute(
                    "UPDATE event_destinations SET event_types = %s, updated_at = now() "
                    "WHERE name = %s AND event_types IS DISTINCT FROM %s",
                    (types, destination.name, types))
                continue
            start = 0
            if destination.new_destination == DROP_FROM_QUEUE:
                start = (await (await conn.execute(
                    "SELECT coalesce(max(id), 0) FROM events")).fetchone())[0]
            await conn.execute(
                "INSERT INTO event_destinations (name, event_types, cursor) VALUES (%s, %s, %s)",
                (destination.name, types, start))
            log.info("new event delivery destination %s: %s", destination.name,
                     "only events recorded from now on (drop_from_queue)" if start
                     else "every event still in the events table (leave_in_queue)")
        for name in sorted(known - {d.name for d in destinations}):
            cur = await conn.execute("DELETE FROM event_retries WHERE destination = %s", (name,))
            await conn.execute("DELETE FROM event_destinations WHERE name = %s", (name,))
            log.warning("event delivery destination %s is no longer configured: removed, "
                        "with its %d events in retry", name, cur.rowcount)


async def prune(conn: psycopg.AsyncConnection, chunk: int = PRUNE_CHUNK) -> int:
    """Delete events every destination has passed and none is retrying; how many."""
    deleted = 0
    for _ in range(100):  # bounded: at most 100 chunks per call
        cur = await conn.execute(
            "DELETE FROM events WHERE id IN (SELECT e.id FROM events e "
            "WHERE e.id <= (SELECT min(cursor) FROM event_destinations) "
            "AND NOT EXISTS (SELECT 1 FROM event_retries r WHERE r.event_id = e.id) "
            "ORDER BY e.id LIMIT %s)", (chunk,))
        deleted += cur.rowcount
        if cur.rowcount < chunk:
            break
    return deleted


class Processor:
    """The event processor of an install root: every destination, and the pruning."""

    def __init__(self, root: Root,
                 conninfo: Callable[[Root], str | None] = database_conninfo,
                 backoff_first: float = BACKOFF_FIRST, backoff_cap: float = BACKOFF_CAP,
                 idle_poll: float = IDLE_POLL_SECONDS, prune_seconds: float = PRUNE_SECONDS
                 ) -> None:
        self.root = root
        self.conninfo = conninfo
        self.backoff_first = backoff_first
        self.backoff_cap = backoff_cap
        self.idle_poll = idle_poll
        self.prune_seconds = prune_seconds
        self.destinations: list[Destination] = []
        self.workers: list[DestinationWorker] = []
        self._idle_logged = False

    def configure(self) -> None:
        """Read the destinations from greenarrow.conf (ConfError if one is bad)."""
        self.destinations = destinations_mod.load(conf_file.load_root(self.root), self.root)

    async def run(self, stop: asyncio.Event, reload: asyncio.Event) -> None:
        """Deliver until `stop` is set; re-read greenarrow.conf when `reload` is set."""
        while not stop.is_set():
            round_stop = asyncio.Event()
            task = asyncio.create_task(self.run_configuration(round_stop))
            watchers = [asyncio.create_task(stop.wait()), asyncio.create_task(reload.wait())]
            await asyncio.wait([task, *watchers], return_when=asyncio.FIRST_COMPLETED)
            round_stop.set()
            for watcher in watchers:
                watcher.cancel()
            try:
                await asyncio.wait_for(task, STOP_GRACE_SECONDS)
            except TimeoutError:
                log.info("stopped with a delivery under way (it is sent again at the next start)")
            if reload.is_set() and not stop.is_set():
                reload.clear()
                try:
                    self.configure()
                    log.info("configuration re-read: destinations %s",
                             ", ".join(d.name for d in self.destinations) or "none")
                except conf_file.ConfError as exc:
                    log.error("configuration not re-read, keeping the previous one: %s", exc)
            elif not stop.is_set():
                await _wait(stop, 5.0)  # the round ended by itself (no database configured)

    async def run_configuration(self, stop: asyncio.Event) -> None:
        """Deliver with the current destinations until `stop` is set."""
        info = self.conninfo(self.root)
        if info is None:
            if not self._idle_logged:
                log.warning("no events database configured; not delivering events")
                self._idle_logged = True
            return
        self._idle_logged = False
        if not await self.prepare(info, stop):
            return
        if not self.destinations:
            log.info("no event delivery destinations configured: events wait in the "
                     "events table until one is declared")
            await stop.wait()
            return
        self.workers = [DestinationWorker(d, info, stop, self.backoff_first, self.backoff_cap,
                                          self.idle_poll) for d in self.destinations]
        log.info("delivering events to %s", ", ".join(
            f"{d.name} ({d.url or d.logfile})" for d in self.destinations))
        tasks = [asyncio.create_task(w.run()) for w in self.workers]
        tasks.append(asyncio.create_task(self.prune_loop(info, stop)))
        await asyncio.gather(*tasks)

    async def prepare(self, info: str, stop: asyncio.Event) -> bool:
        """Migrate the schema and sync event_destinations, retrying while the
        database is unreachable; False if stopped first."""
        attempts = 0
        started = time.monotonic()
        last_log = 0.0
        while not stop.is_set():
            try:
                async with await connect(info, "setup") as conn:
                    await asyncio.to_thread(self._migrate, info)
                    await sync_destinations(conn, self.destinations)
                if attempts:
                    log.info("events database reached after %.0fs", time.monotonic() - started)
                return True
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                now = time.monotonic()
                if attempts == 0 or now - last_log >= DOWN_LOG_SECONDS:
                    last_log = now
                    log.warning("events database unavailable, retrying (events wait in the "
                                "database and the logs meanwhile): %s", str(exc).strip())
                await _wait(stop, RECONNECT_SECONDS[min(attempts, len(RECONNECT_SECONDS) - 1)])
                attempts += 1
        return False

    @staticmethod
    def _migrate(info: str) -> None:
        with psycopg.connect(info, connect_timeout=10,
                             application_name="greenarrow event-processor") as conn:
            schema.migrate(conn)

    async def prune_loop(self, info: str, stop: asyncio.Event) -> None:
        conn: psycopg.AsyncConnection | None = None
        while not stop.is_set():
            try:
                if conn is None:
                    conn = await connect(info, "prune")
                await prune(conn)
            except (psycopg.OperationalError, psycopg.InterfaceError):
                if conn is not None:
                    await conn.close()
                    conn = None  # the workers log the outage
            await _wait(stop, self.prune_seconds)
        if conn is not None:
            await conn.close()
