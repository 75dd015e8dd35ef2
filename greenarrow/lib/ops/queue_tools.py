"""`greenarrow queue ...`: look into the queues and act on entries, while the engine runs.

Every action is a rename or an unlink of whole entry files, so it is atomic
and never blocks a scheduler: `hold` moves entries to the queue's `hold/`
folder (schedulers never look there), `release` moves them back, due at
once, `retry-now` renames an entry to be due at once, `delete` removes it,
`bounce` queues a bounce to its sender and removes it. Entries whose
envelope is bad (queue-send moved them to `bad/`) are counted by `status`
and listed, with what is wrong, by `bad_entries`; no action touches them.
After a rename the
queue's scheduler is told through its trigger FIFO; an entry that vanished
under it (deleted, held) is simply dropped when its turn comes. An entry
acted on while an attempt is under way may still be delivered by that
attempt.

Ages come from the msguid (it starts with the injection time in
microseconds, hex), so a status needs no file opened; filters on envelope
fields read only each entry's first line.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from greenarrow.lib.core.paths import QUEUES, Root
from greenarrow.lib.ops.delivery_report import wildcard_regex
from greenarrow.lib.queue import entry as queue_entry
from greenarrow.lib.queue import moves as queue_moves

OPERATOR_BOUNCE_TEXT = "This message was bounced by the queue operator."


@dataclass
class Entry:
    """One queue entry as the tools see it."""

    queue: str
    name: str
    held: bool
    attempts: int
    due: int
    injected: float
    envelope: dict | None = field(default=None, repr=False)

    def age(self, now: float) -> float:
        return max(0.0, now - self.injected)


@dataclass
class BadFile:
    """A file in a queue's bad/ folder, and what is wrong with it."""

    queue: str
    name: str
    size: int
    problem: str


def injected_from_name(name: str) -> float:
    """The injection time encoded at the start of an entry's msguid (0 if unreadable)."""
    try:
        return int(name.split("-", 1)[0], 16) / 1_000_000
    except ValueError:
        return 0.0


@dataclass
class Filter:
    """Which entries an action applies to; empty fields match everything."""

    domains: list[str] = field(default_factory=list)
    sendids: list[str] = field(default_factory=list)
    listids: list[str] = field(default_factory=list)
    recipients: list[str] = field(default_factory=list)
    older_than: float | None = None
    newer_than: float | None = None

    def __post_init__(self) -> None:
        # The same wildcard rules as hvmail_report's filters (`*` and `?` only).
        self._domain_re = wildcard_regex(self.domains)
        self._recipient_re = wildcard_regex(self.recipients)

    @property
    def needs_envelope(self) -> bool:
        return bool(self.domains or self.sendids or self.listids or self.recipients)

    def matches(self, entry: Entry, now: float) -> bool:
        age = entry.age(now)
        if self.older_than is not None and age < self.older_than:
            return False
        if self.newer_than is not None and age > self.newer_than:
            return False
        if not self.needs_envelope:
            return True
        env = entry.envelope or {}
        recipient = env.get("recipient", "").lower()
        domain = recipient.rpartition("@")[2]
        if self._domain_re is not None and not self._domain_re.match(domain):
            return False
        if self.sendids and env.get("sendid", "").lower() not in {s.lower() for s in self.sendids}:
            return False
        if self.listids and env.get("listid", "").lower() not in {s.lower() for s in self.listids}:
            return False
        if self._recipient_re is not None and not self._recipient_re.match(recipient):
            return False
        return True


class Queues:
    """The queues of one install root, for the tools."""

    def __init__(self, root: Root) -> None:
        self.root = root

    def folder(self, queue: str, held: bool) -> str:
        sub = queue_entry.HOLD if held else queue_entry.ENTRIES
        return os.path.join(str(self.root.queue(queue)), sub)

    def entries(self, queues: list[str], held: bool | None = None,
                with_envelope: bool = False) -> Iterator[tuple[Entry, str]]:
        """Every entry (and its path) of `queues`; held None means both folders."""
        for queue in queues:
            for is_held in ((False, True) if held is None else (held,)):
                folder = self.folder(queue, is_held)
                try:
                    names = os.listdir(folder)
                except FileNotFoundError:
                    continue
                for name in names:
                    try:
                        _, attempts, due = queue_entry.split_name(name)
                    except ValueError:
                        continue
                    entry = Entry(queue, name, is_held, attempts, due, injected_from_name(name))
                    path = os.path.join(folder, name)
                    if with_envelope:
                        try:
                            entry.envelope = queue_entry.read_envelope(path)
                        except (OSError, queue_entry.BadEntry):
                            continue  # gone, or bad: queue-send moves it to bad/
                    yield entry, path

    def select(self, queues: list[str], flt: Filter, held: bool | None = None,
               now: float | None = None) -> list[tuple[Entry, str]]:
        now = time.time() if now is None else now
        return [(e, p) for e, p in self.entries(queues, held, flt.needs_envelope)
                if flt.matches(e, now)]

    def bad_entries(self, queues: list[str]) -> list[BadFile]:
        """The files of each queue's bad/ folder, with what is wrong with each."""
        found = []
        for queue in queues:
            folder = os.path.join(str(self.root.queue(queue)), queue_entry.BAD)
            try:
                names = sorted(os.listdir(folder))
            except FileNotFoundError:
                continue
            for name in names:
                path = os.path.join(folder, name)
                try:
                    size = os.lstat(path).st_size
                    queue_entry.read_envelope(path)
                    problem = "its envelope passes the check now: move it back to entries/"
                except queue_entry.BadEntry as e:
                    problem = str(e)
                except OSError as e:
                    if isinstance(e, FileNotFoundError):
                        continue
                    problem, size = f"cannot read it: {e.strerror}", 0
                found.append(BadFile(queue, name, size, problem))
        return found

    def _bad_count(self, queue: str) -> int:
        try:
            return len(os.listdir(os.path.join(str(self.root.queue(queue)), queue_entry.BAD)))
        except FileNotFoundError:
            return 0

    # -- status ------------------------------------------------------------

    def status(self, queues: list[str], top: int = 10, now: float | None = None) -> dict:
        now = time.time() if now is None else now
        report = {}
        for queue in queues:
            counts = Counter()
            oldest = None
            domains: Counter[str] = Counter()
            for entry, _ in self.entries([queue], None, with_envelope=top > 0):
                if entry.held:
                    counts["held"] += 1
                    continue
                counts["messages"] += 1
                if entry.due <= now:
                    counts["due"] += 1
                if entry.attempts > 0:
                    counts["deferred"] += 1
                if entry.injected and (oldest is None or entry.injected < oldest):
                    oldest = entry.injected
                if entry.envelope:
                    domains[entry.envelope.get("recipient", "").rpartition("@")[2].lower()] += 1
            live = self._scheduler_status(queue, now)
            report[queue] = {
                "messages": counts["messages"],
                "held": counts["held"],
                "bad": self._bad_count(queue),
                "due_now": counts["due"],
                "deferred": counts["deferred"],
                "in_flight": live.get("inflight") if live else None,
                "oldest_age": round(now - oldest, 1) if oldest else None,
                "top_domains": domains.most_common(top) if top > 0 else [],
            }
        return report

    def _scheduler_status(self, queue: str, now: float) -> dict | None:
        """What the queue's scheduler last published, if it is recent."""
        import json

        try:
            status = json.loads(self.root.status_file(queue).read_text())
        except (FileNotFoundError, ValueError):
            return None
        return status if now - status.get("time", 0) < 60 else None

    # -- actions -----------------------------------------------------------

    def _trigger(self, queue: str, names: list[str]) -> None:
        if names:
            queue_entry.trigger(str(self.root.trigger(queue)), names)

    def hold(self, selected: list[tuple[Entry, str]]) -> int:
        done = 0
        for entry, path in selected:
            if entry.held:
                continue
            if _rename(path, os.path.join(self.folder(entry.queue, True), entry.name)):
                done += 1
        return done

    def release(self, selected: list[tuple[Entry, str]]) -> int:
        by_queue: dict[str, list[str]] = {}
        for entry, path in selected:
            if not entry.held:
                continue
            entry_id, attempts, _ = queue_entry.split_name(entry.name)
            name = queue_entry.entry_name(entry_id, attempts, 0)
            if _rename(path, os.path.join(self.folder(entry.queue, False), name)):
                by_queue.setdefault(entry.queue, []).append(name)
        for queue, names in by_queue.items():
            self._trigger(queue, names)
        return sum(len(v) for v in by_queue.values())

    def retry_now(self, selected: list[tuple[Entry, str]]) -> int:
        by_queue: dict[str, list[str]] = {}
        for entry, path in selected:
            if entry.held:
                continue
            entry_id, attempts, _ = queue_entry.split_name(entry.name)
            name = queue_entry.entry_name(entry_id, attempts, 0)
            if name == entry.name or _rename(path, os.path.join(self.folder(entry.queue, False), name)):
                by_queue.setdefault(entry.queue, []).append(name)
        for queue, names in by_queue.items():
            self._trigger(queue, names)
        return sum(len(v) for v in by_queue.values())

    def delete(self, selected: list[tuple[Entry, str]]) -> int:
        return sum(_unlink(path) for _, path in selected)

    def bounce(self, selected: list[tuple[Entry, str]], me: str, max_bytes: int,
               doublebounceto: str) -> int:
        """Bounce each entry to its sender now (no further attempt), then remove it."""
        done = 0
        root = str(self.root.path)
        for entry, path in selected:
            try:
                envelope = entry.envelope or queue_entry.read_envelope(path)
            except (OSError, queue_entry.BadEntry):
                continue
            try:
                bounce = queue_moves.make_bounce_entry(me, envelope, path, OPERATOR_BOUNCE_TEXT,
                                                       max_bytes, doublebounceto)
            except queue_entry.BadEntry:
                continue
            if bounce is not None:
                queue_moves.commit_bounces(root, [bounce], 0)
            done += _unlink(path)
        return done


def _unlink(path: str) -> bool:
    """Remove an entry; False when it was already gone (delivered meanwhile)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def _rename(src: str, dst: str) -> bool:
    try:
        os.rename(src, dst)
    except FileNotFoundError:
        return False
    return True


def queue_names(queue: str) -> list[str]:
    return list(QUEUES) if queue == "all" else [queue]
