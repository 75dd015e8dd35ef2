"""`queue-send`: the scheduler of one queue.

It knows every entry of its queue by file name alone: a directory scan at
start (greenarrow.pyx.queue_scan) and then the names injectors write into
its trigger FIFO, plus a periodic rescan for any name a full FIFO dropped.
It hands due entries to the `remote` workers, at most `concurrencyremote`
at a time, and applies each result:

- success: the delivery log line is written, then the entry is removed;
- failure (and a deferral past the queue lifetime, logged as
  failure_toolong): the log line, the bounce to the sender is queued
  (greenarrow.lib.queue.moves), then the entry is removed; except when the
  sender is an address whose failures the bounce processor records from
  the delivery log (incoming.sync_bounce_mailbox: SimpleMH's encoded bounce
  addresses): then no bounce message is made, and the log is fsynced
  before the entry goes, since that line is the bounce's only record;
- deferral: the log line, then the entry gets one more attempt and its next
  due time (greenarrow.lib.queue.retry_schedule): a first attempt in the ram- or
  bounce-queue moves to the durable disk-queue, a disk-queue entry is
  renamed in place;
- a worker that goes away: its attempts under way are simply scheduled
  again; the entry was never removed, so nothing is lost (a duplicate
  delivery is possible, as in qmail).

A recipient at one of the engine's own mailboxes (greenarrow.lib.config.
incoming: `incoming_email_domain`, the lite processor addresses) goes to the
`local` agent (greenarrow.lib.local.agent) on `var/local.sock` instead of a
remote worker, with the same link and results. Its deferrals are retried
in place in this queue, never moved to the disk-queue (GreenArrow:
"deliveries to local domain names are not moved to the disk-queue"). An
entry whose kind of agent has no link up waits (parked) until one connects.

An entry whose envelope fails queue_entry.check_envelope (read here before
each attempt, or by the worker, which answers `bad`) is moved to the
queue's `bad/` folder with one log line naming it; nothing else stops.

One writer per file: this process alone renames and removes the entries of
its queue and writes its delivery log.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import logging
import os
import time
import zlib
from collections import deque

from greenarrow.lib.config import conf as conflib
from greenarrow.lib.config import control
from greenarrow.lib.core import remote_link
from greenarrow.lib.core.delivery_log import DeliveryLogWriter
from greenarrow.lib.core.paths import Root, count_path
from greenarrow.lib.core.remote_link import CONNMAXOUT, FAILURE_TOOLONG, RETRIED
from greenarrow.lib.queue import entry as queue_entry
from greenarrow.lib.queue import moves as queue_moves
from greenarrow.lib.queue import retry_schedule
from greenarrow.lib.routing import incoming
from greenarrow.lib.routing.plan import Planner
from greenarrow.pyx.queue_scan import scan

log = logging.getLogger("queue-send")

STALE_TMP_SECONDS = 3600
TOOLONG_TEXT = "I'm not going to try again; this message has been in the queue too long."
CONNMAXOUT_RETRY = 60  # seconds before a throttled attempt is tried again (at most)
MOVES_TO_DISK = ("ram", "bounce")  # first-attempt queues; the disk-queue retries in place
REMOTE, LOCAL = "remote", "local"  # delivery channels: the log's `channel` column
LEARNED_MX_MAX = 100_000  # domains whose MX host is remembered for mx: patterns
STATUS_INTERVAL = 0.5  # seconds between two publications of the queue's count and status
_FIFO_READ = 65536


class WorkerLink:
    """The connection to one remote worker, or (channel LOCAL) to the local agent."""

    def __init__(self, number: int, path: str = "", channel: str = REMOTE) -> None:
        self.number = number
        self.path = path
        self.channel = channel
        self.writer: asyncio.StreamWriter | None = None
        self.jobs: remote_link.LineBatch | None = None
        self.inflight: set[str] = set()

    @property
    def up(self) -> bool:
        return self.writer is not None and not self.writer.is_closing()


class Scheduler:
    """Schedules and applies the delivery attempts of one queue."""

    def __init__(self, root: Root, queue: str, clock=time.time) -> None:
        self.root = root
        self.queue = queue
        self.clock = clock
        self.queue_dir = str(root.queue(queue))
        self.entries_dir = os.path.join(self.queue_dir, queue_entry.ENTRIES)
        self.known: set[str] = set()
        self.ready: deque[str] = deque()
        self.waiting: list[tuple[int, str]] = []
        self.inflight: dict[str, tuple[WorkerLink, dict, float]] = {}
        self.links: list[WorkerLink] = []
        self.local_link: WorkerLink | None = None
        self.parked: dict[str, list[str]] = {REMOTE: [], LOCAL: []}  # waiting for a link
        self.wake = asyncio.Event()
        self.stopping = False
        self.changed = True
        self.learned_mx: dict[str, str] = {}
        self.load_settings()
        c = root.control
        self.log = DeliveryLogWriter(
            root.delivery_log(queue),
            max_bytes=control.read_int(c, "log.delivery.maxbytes"),
            keep=control.read_int(c, "log.delivery.keep"),
        )

    # -- configuration -------------------------------------------------

    def load_settings(self) -> None:
        """Read control files and greenarrow.conf; raises on errors (nothing changes)."""
        c = self.root.control
        concurrency = control.read_int(c, f"queue.{self.queue}.concurrencyremote")
        rescan = control.read_int(c, "queue.rescan.seconds")
        scale = control.read_float(c, "queue.retry.scale")
        workers = control.read_int(c, "remote.workers")
        lifetime = control.read_int(c, "queuelifetime")
        me = control.read_text(c, "me")
        bouncemaxbytes = control.read_int(c, "bouncemaxbytes")
        doublebounceto = control.read_text(c, "doublebounceto")
        bounce_limit = control.read_int(c, "queue.bounce.limit.messages")
        disk_limit = control.read_int(c, "queue.disk.limit.messages")
        conf = conflib.load_root(self.root)
        incoming.mailboxes(str(self.root.path), conf)  # a ConfError now, not at dispatch
        planner = Planner(conf)
        general = conf.block("general")
        system_max = general.get_int("system_max_smtp_connections", 0) if general else 0
        self.concurrency, self.rescan_seconds, self.retry_scale = concurrency, rescan, scale
        self.worker_count, self.rules, self.queuelifetime = workers, planner.rules, lifetime
        self.me, self.bouncemaxbytes, self.doublebounceto = me, bouncemaxbytes, doublebounceto
        self.bounce_limit, self.disk_limit = bounce_limit, disk_limit
        self.planner = planner
        self.conf = conf
        # The global cap, shared out: each worker enforces its part.
        self.system_max_share = -(-system_max // max(1, workers)) if system_max else 0

    def reload(self) -> None:
        try:
            self.load_settings()
        except (control.ControlError, conflib.ConfError, OSError) as e:
            log.error("reload failed, keeping the previous settings: %s", e)
            return
        log.info("reloaded configuration")
        self.wake.set()

    # -- knowing the queue ---------------------------------------------

    def clean_tmp(self) -> None:
        tmp = os.path.join(self.queue_dir, queue_entry.TMP)
        cutoff = self.clock() - STALE_TMP_SECONDS
        for entry in os.scandir(tmp):
            try:
                if entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    log.info("removed stale tmp file %s", entry.name)
            except FileNotFoundError:
                pass

    def publish(self) -> None:
        """Write the entry count (read by injectors for the queue limit) and the status
        (read by `greenarrow queue status`)."""
        root = str(self.root.path)
        queue_entry.write_count(count_path(root, self.queue), len(self.known))
        status = {"queue": self.queue, "time": self.clock(), "known": len(self.known),
                  "ready": len(self.ready), "waiting": len(self.waiting),
                  "inflight": len(self.inflight), "pid": os.getpid()}
        path = self.root.status_file(self.queue)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(status))
        os.replace(tmp, path)
        self.changed = False

    def add(self, name: str, attempts: int, due: int) -> None:
        if name in self.known:
            return
        self.changed = True
        self.known.add(name)
        if due <= self.clock():
            self.ready.append(name)
        else:
            heapq.heappush(self.waiting, (due, name))

    def rescan(self) -> None:
        """Add every entry on disk not yet known; forget known ones removed by others."""
        result = scan(self.entries_dir)
        on_disk = set(result.names)
        for name, attempts, due in result:
            if name not in self.known:
                self.add(name, attempts, due)
        gone = self.known - on_disk - self.inflight.keys()
        if gone:
            self.known -= gone  # ready/waiting copies are skipped when they come up
        for stray in result.strays:
            log.warning("ignoring file that is not a queue entry: %s", stray)
        self.wake.set()

    def add_from_trigger(self, data: bytes) -> None:
        for raw in data.split(b"\n"):
            if not raw:
                continue
            name = raw.decode("ascii", "replace")
            try:
                _, attempts, due = queue_entry.split_name(name)
            except ValueError:
                continue
            self.add(name, attempts, due)
        self.wake.set()

    # -- dispatching -----------------------------------------------------

    def _promote_due(self) -> None:
        now = self.clock()
        while self.waiting and self.waiting[0][0] <= now:
            self.ready.append(heapq.heappop(self.waiting)[1])

    def _pick_link(self, key: str | None = None) -> WorkerLink | None:
        """The worker for an attempt: by throttle key when it has one (that worker keeps
        the key's counters and kept sessions), else the least busy."""
        if key is not None and self.links:
            link = self.links[zlib.crc32(key.encode()) % len(self.links)]
            if link.up:
                return link
        best = None
        for link in self.links:
            if link.up and (best is None or len(link.inflight) < len(best.inflight)):
                best = link
        return best

    def job_for(self, name: str, path: str, envelope: dict) -> tuple[dict, dict]:
        """The job for a worker, and the log fields that describe how it is sent."""
        recipient = envelope["recipient"]
        domain = recipient.rpartition("@")[2].lower()
        mx = self.learned_mx.get(domain, "") if self.rules.has_mx_rules else ""
        plan = self.planner.plan(recipient, envelope["mtaid"], envelope["msguid"] or name, mx)
        return plan.job(name, path, self.system_max_share), plan.log_fields()

    def local_job(self, name: str, path: str, envelope: dict) -> tuple[dict, dict] | None:
        """The job for the local agent when the recipient is one of our mailboxes, else None."""
        box = incoming.find(str(self.root.path), self.conf, envelope["recipient"])
        if box is None:
            return None
        vmta = self.planner.vmtas.lookup(envelope["mtaid"])
        fields = {"mtaid_id": vmta.id, "mtaid_name": vmta.name, "outmtaid": "",
                  "outmtaid_ip": "", "outmtaid_name": ""}
        return {"id": name, "path": path, "maildir": box.path}, fields

    def _links_up(self) -> bool:
        local = self.local_link
        return any(link.up for link in self.links) or (local is not None and local.up)

    def unpark(self, channel: str) -> None:
        """A link of `channel` is up: the entries that waited for one go first."""
        names, self.parked[channel] = self.parked[channel], []
        self.ready.extendleft(reversed(names))
        if names:
            self.wake.set()

    def dispatch(self) -> None:
        self._promote_due()
        while self.ready and len(self.inflight) < self.concurrency and not self.stopping:
            if not self._links_up():
                return
            name = self.ready.popleft()
            if name not in self.known or name in self.inflight:
                continue
            path = os.path.join(self.entries_dir, name)
            try:
                envelope = queue_entry.read_envelope(path)
            except FileNotFoundError:
                self.known.discard(name)
                continue
            except queue_entry.BadEntry as e:
                self.set_aside(name, str(e))
                continue
            except OSError as e:  # EACCES, EIO...: perhaps passing; the next rescan tries again
                log.error("cannot read queue entry %s, left in place: %s", name, e)
                self.known.discard(name)
                continue
            try:
                local = self.local_job(name, path, envelope)
                job, fields = local if local is not None else self.job_for(name, path, envelope)
            except Exception:  # a checked envelope should not get here; the queue goes on
                log.exception("cannot schedule queue entry %s, left in place", name)
                self.known.discard(name)
                continue
            if local is not None:
                link = self.local_link if self.local_link and self.local_link.up else None
            else:
                link = self._pick_link(job.get("worker_key"))
            if link is None:
                self.parked[LOCAL if local is not None else REMOTE].append(name)
                continue
            envelope["_log"] = fields
            envelope["_channel"] = link.channel
            self.inflight[name] = (link, envelope, self.clock())
            link.inflight.add(name)
            link.jobs.write(remote_link.encode(job))

    def set_aside(self, name: str, problem: str) -> None:
        """Move a bad entry to bad/ (never scheduled) with one log line naming it."""
        self.known.discard(name)
        self.changed = True
        try:
            kept_as = queue_entry.move_to_bad(self.queue_dir, name)
        except FileNotFoundError:
            return
        except OSError as e:
            log.error("bad queue entry %s (%s) left in place: cannot move it to bad/: %s",
                      name, problem, e)
            return
        where = "bad/" if kept_as == name else f"bad/{kept_as}"
        log.error("bad queue entry %s moved to %s: %s", name, where, problem)

    # -- results ---------------------------------------------------------

    async def apply_results(self, results: list[dict]) -> None:
        """Log a batch of results, then act on the entries (log first: see module docstring)."""
        now = self.clock()
        records = []
        finished: list[str] = []  # names to remove
        retries: list[tuple[str, int, int]] = []  # (name, attempts, due) renamed in place
        moves: list[tuple[str, int, int]] = []  # the same, moved to the disk-queue
        failed: list[tuple[dict, str, str]] = []  # (envelope, name, reason) to bounce
        synced = False  # a failure recorded from the log alone: fsync the log first
        for result in results:
            name = result.get("id")
            held = self.inflight.pop(name, None)
            if held is None:
                continue
            link, envelope, started = held
            link.inflight.discard(name)
            status = result["status"]
            if result.get("mx_hostname") and self.rules.has_mx_rules:
                self._learn_mx(envelope, result["mx_hostname"])
            if status == remote_link.MISSING:
                self.known.discard(name)
                continue
            if status == remote_link.BAD:
                self.set_aside(name, result.get("text", ""))
                continue
            _, attempts, _ = queue_entry.split_name(name)
            text = result.get("text", "")
            if status in RETRIED and self._expired(envelope, now):
                status, text = FAILURE_TOOLONG, f"{text} {TOOLONG_TEXT}".strip()
            records.append(self._record(envelope, result, started, attempts, status, text))
            if status in RETRIED:
                due = retry_schedule.next_due(envelope["injected_time"] or now, attempts + 1,
                                              now, scale=self.retry_scale)
                if status == CONNMAXOUT:  # the receiver did not refuse: try again soon
                    due = min(due, int(now + CONNMAXOUT_RETRY * self.retry_scale) + 1)
                local = envelope.get("_channel") == LOCAL  # local deliveries never move
                target = moves if self.queue in MOVES_TO_DISK and not local else retries
                target.append((name, attempts + 1, due))
            else:
                if status != remote_link.SUCCESS:
                    if self._recorded_from_log(envelope):
                        synced = True
                    else:
                        failed.append((envelope, name, text))
                finished.append(name)
        if records:
            self.log.write(records)
        if synced:
            self._sync_log()
        if failed and not await self._bounce(failed):
            kept = {name for _, name, _ in failed}
            finished = [name for name in finished if name not in kept]
        if moves:
            retries += await self._move(moves)
        for name, attempts, due in retries:
            self._retry_in_place(name, attempts, due)
        for name in finished:
            self.known.discard(name)
            try:
                os.unlink(os.path.join(self.entries_dir, name))
            except FileNotFoundError:
                pass
        self.changed = True
        self.wake.set()

    def _recorded_from_log(self, envelope: dict) -> bool:
        """Whether the bounce processor makes this failure's bounce event from its log line
        (a synchronous bounce): then no bounce message is mailed (docs/bounces.md)."""
        return incoming.sync_bounce_mailbox(str(self.root.path), self.conf,
                                            envelope.get("sender", "")) is not None

    def _sync_log(self) -> None:
        try:
            self.log.sync()
        except OSError as e:  # the line is written; only its power-loss safety is in doubt
            log.error("cannot fsync the delivery log (%s): a synchronous bounce logged "
                      "just now may not survive a power loss", e)

    def _learn_mx(self, envelope: dict, mx_hostname: str) -> None:
        """Remember a domain's MX host for `mx:` throttle patterns (learned, not looked up:
        queue-send never waits on DNS)."""
        if len(self.learned_mx) > LEARNED_MX_MAX:
            self.learned_mx.clear()
        domain = envelope["recipient"].rpartition("@")[2].lower()
        self.learned_mx[domain] = mx_hostname.lower()

    def _expired(self, envelope: dict, now: float) -> bool:
        domain = envelope["recipient"].rpartition("@")[2].lower()
        lifetime = self.rules.settings(domain).queue_lifetime or self.queuelifetime
        return now - (envelope["injected_time"] or now) >= lifetime

    async def _bounce(self, failed: list[tuple[dict, str, str]]) -> bool:
        """Create the bounces of permanent failures before their entries are removed.

        False when they could not be queued: the failed entries then stay in
        place (forgotten until the next rescan), so no bounce is lost; they
        are tried again later, fail again, and get their bounce then.
        """
        root = str(self.root.path)

        def work() -> list[tuple[str, str]]:
            bounces, bad = [], []
            for envelope, name, reason in failed:
                path = os.path.join(self.entries_dir, name)
                try:
                    bounce = queue_moves.make_bounce_entry(self.me, envelope, path, reason,
                                                           self.bouncemaxbytes, self.doublebounceto)
                except queue_entry.BadEntry as e:  # the file changed since it was read
                    bad.append((name, str(e)))
                    continue
                if bounce is not None:
                    bounces.append(bounce)
            if bounces:
                queue_moves.commit_bounces(root, bounces, self.bounce_limit)
            return bad

        try:
            bad = await asyncio.to_thread(work)
        except queue_entry.QueueWriteError as e:
            log.error("cannot queue bounces now (%s); the failed entries stay queued", e)
            for _, name, _ in failed:
                self.known.discard(name)
            return False
        for name, problem in bad:
            self.set_aside(name, problem)
        return True

    async def _move(self, moves: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
        """Move deferred first attempts to the disk-queue; return those that must stay here."""
        disk_count = queue_entry.read_count(count_path(str(self.root.path), "disk"))
        if self.disk_limit and disk_count + len(moves) > self.disk_limit:
            log.warning("disk-queue is full (%d); deferred entries stay in the %s-queue",
                        disk_count, self.queue)
            return moves
        pairs = []
        for name, attempts, due in moves:
            entry_id, _, _ = queue_entry.split_name(name)
            pairs.append((os.path.join(self.entries_dir, name),
                          queue_entry.entry_name(entry_id, attempts, due)))
        try:
            await asyncio.to_thread(queue_moves.move_entries, str(self.root.path), pairs)
        except queue_entry.QueueWriteError as e:
            log.error("cannot move deferred entries to the disk-queue (%s); they stay here", e)
            return moves
        for name, _, _ in moves:
            self.known.discard(name)
        return []

    def _retry_in_place(self, name: str, attempts: int, due: int) -> None:
        entry_id, _, _ = queue_entry.split_name(name)
        new_name = queue_entry.entry_name(entry_id, attempts, due)
        self.known.discard(name)
        try:
            os.rename(os.path.join(self.entries_dir, name),
                      os.path.join(self.entries_dir, new_name))
        except FileNotFoundError:
            return
        self.add(new_name, attempts, due)

    def _record(self, envelope: dict, result: dict, started: float, attempts: int,
                status: str, text: str) -> dict:
        return {
            "timestamp": started,
            "channel": envelope.get("_channel", REMOTE),
            "status": status,
            # An overflowed bounce makes its first attempt from the disk-queue: a retry there.
            "is_retry": 1 if attempts > 0 or self.queue == "disk" else 0,
            "msguid": envelope.get("msguid", ""),
            "sender": envelope.get("sender", ""),
            "mtaid": envelope.get("mtaid", ""),
            **envelope.get("_log", {}),
            "injected_time": envelope["injected_time"] or "",
            "message": text,
            "outmtaid_hostname": result.get("outmtaid_hostname", ""),
            "email": envelope.get("recipient", ""),
            "listid": envelope.get("listid", ""),
            "sendid": envelope.get("sendid", ""),
            "click_tracking_id": envelope.get("click_tracking_id", ""),
            "mx_hostname": result.get("mx_hostname", ""),
            "mx_ip": result.get("mx_ip", ""),
            "mailclass": envelope.get("mailclass", ""),
            "instanceid": envelope.get("instanceid", ""),
        }

    def requeue_link(self, link: WorkerLink) -> None:
        """A worker went away: its attempts under way go back to the front of the line."""
        for name in list(link.inflight):
            self.inflight.pop(name, None)
            self.ready.appendleft(name)
        if link.inflight:
            log.warning(
                "%s went away with %d attempts under way; they will be retried",
                self._link_name(link),
                len(link.inflight),
            )
        link.inflight.clear()
        self.wake.set()

    @staticmethod
    def _link_name(link: WorkerLink) -> str:
        return "local" if link.channel == LOCAL else f"remote {link.number}"

    # -- the loops -------------------------------------------------------

    async def link_loop(self, link: WorkerLink) -> None:
        """Keep a connection to one worker and read its results, reconnecting with back-off."""
        path = link.path or str(self.root.remote_socket(link.number))
        delay = 0.05
        while not (self.stopping and not link.inflight):
            try:
                reader, writer = await asyncio.open_unix_connection(path, limit=1024 * 1024)
            except OSError:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            delay = 0.05
            link.writer = writer
            link.jobs = remote_link.LineBatch(writer)
            log.info("connected to %s", self._link_name(link))
            self.unpark(link.channel)
            self.wake.set()
            try:
                while True:
                    chunk = await reader.read(_FIFO_READ)
                    if not chunk:
                        break
                    while not chunk.endswith(b"\n"):
                        more = await reader.readuntil(b"\n")
                        chunk += more
                    results = [remote_link.decode(line) for line in chunk.splitlines() if line]
                    await self.apply_results(results)
                    if self.stopping and not self.inflight:
                        break
            except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                pass
            finally:
                link.writer = None
                writer.close()
            self.requeue_link(link)

    def _wake_on(self, event: asyncio.Event) -> asyncio.Future:
        """Wake the main loop when `event` is set (one wait, not one per round of the loop)."""
        watch = asyncio.ensure_future(event.wait())
        watch.add_done_callback(lambda _: self.wake.set())
        return watch

    def open_trigger(self) -> int:
        fifo = str(self.root.trigger(self.queue))
        if not os.path.exists(fifo):
            os.mkfifo(fifo, 0o622)
        # O_RDWR keeps a writer open ourselves, so the FIFO never reports EOF.
        return os.open(fifo, os.O_RDWR | os.O_NONBLOCK)

    async def run(self, stop: asyncio.Event, reload: asyncio.Event, grace: float = 10.0) -> None:
        loop = asyncio.get_running_loop()
        queue_entry.ensure_queue_dirs(self.queue_dir)
        self.clean_tmp()
        fifo = self.open_trigger()

        def on_trigger() -> None:
            try:
                data = os.read(fifo, _FIFO_READ)
            except BlockingIOError:
                return
            self.add_from_trigger(data)

        loop.add_reader(fifo, on_trigger)
        self.rescan()
        log.info("%s-queue: %d entries at start", self.queue, len(self.known))
        self.links = [WorkerLink(n, str(self.root.remote_socket(n)))
                      for n in range(self.worker_count)]
        self.local_link = WorkerLink(-1, str(self.root.local_socket()), LOCAL)
        link_tasks = [asyncio.create_task(self.link_loop(link))
                      for link in [*self.links, self.local_link]]
        last_scan = last_publish = time.monotonic()
        self.publish()
        watches = [self._wake_on(stop), self._wake_on(reload)]
        while not stop.is_set():
            if reload.is_set():
                reload.clear()
                self.reload()
                watches[1] = self._wake_on(reload)
            self.dispatch()
            if self.changed and time.monotonic() - last_publish >= STATUS_INTERVAL:
                self.publish()
                last_publish = time.monotonic()
            timeout = self.rescan_seconds - (time.monotonic() - last_scan)
            if self.changed:
                timeout = min(timeout, STATUS_INTERVAL)
            if self.waiting:
                timeout = min(timeout, self.waiting[0][0] - self.clock())
            self.wake.clear()
            try:
                async with asyncio.timeout(max(0.0, timeout)):
                    await self.wake.wait()
            except TimeoutError:
                pass
            if time.monotonic() - last_scan >= self.rescan_seconds:
                self.rescan()
                last_scan = time.monotonic()
        for watch in watches:
            watch.cancel()
        # Stop: take no new attempts; let those under way report, for a while.
        self.stopping = True
        loop.remove_reader(fifo)
        os.close(fifo)
        deadline = time.monotonic() + grace
        while self.inflight and time.monotonic() < deadline:
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), timeout=deadline - time.monotonic())
            except TimeoutError:
                break
        if self.inflight:
            log.info("stopping with %d attempts unreported; they stay queued", len(self.inflight))
        for task in link_tasks:
            task.cancel()
        await asyncio.gather(*link_tasks, return_exceptions=True)
        self.publish()
        self.log.close()
