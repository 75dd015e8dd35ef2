"""Entries that change queue: deferred mail to the disk-queue, bounces to the bounce-queue.

GreenArrow's movements (ARCHITECTURE section 5): a deferred or throttled
first attempt in the ram- or bounce-queue moves the entry to the disk-queue;
a permanent failure creates a bounce in the bounce-queue, or in the
disk-queue when the bounce-queue is full. A move writes the copy first
(fsync'd: the disk-queue is durable) and removes the original only after,
so a crash in between leaves two copies, never none.

These functions do blocking file I/O with fsync; queue-send runs them in a
thread so its event loop keeps dispatching.
"""

from __future__ import annotations

import os
import time

from greenarrow.lib.core.paths import count_path, queue_dir, trigger_path
from greenarrow.lib.queue import entry as queue_entry
from greenarrow.lib.queue import failure_notice as bounce_message


def move_entries(root: str, moves: list[tuple[str, str]], dest: str = "disk") -> list[str]:
    """Move each (source path, new entry name) into queue `dest`; return the names placed.

    The copies are committed (durably for the disk-queue) before any source is
    removed. A source that vanished meanwhile (an operator deleted it) is skipped.
    Raises QueueWriteError when the destination cannot take them; then every
    source is still in place.
    """
    files = []
    sources = []
    for src, name in moves:
        try:
            with open(src, "rb") as f:
                files.append((name, [f.read()]))
        except FileNotFoundError:
            continue
        sources.append(src)
    if not files:
        return []
    placed = queue_entry.place(queue_dir(root, dest), files, durable=(dest == "disk"))
    for src in sources:
        try:
            os.unlink(src)
        except FileNotFoundError:
            pass
    queue_entry.trigger(trigger_path(root, dest), placed)
    return placed


def make_bounce_entry(me: str, envelope: dict, path: str, reason: str, max_bytes: int,
                      doublebounceto: str) -> tuple[dict, bytes] | None:
    """The envelope and message of the bounce for a failed entry, or None (nobody to tell,
    or the entry is gone). BadEntry if the entry file no longer holds a valid envelope."""
    target = bounce_message.bounce_recipient(envelope, doublebounceto)
    if target is None:
        return None
    to, double = target
    try:
        _, original = queue_entry.read_entry(path)
    except FileNotFoundError:
        return None
    now = time.time()
    msguid = queue_entry.new_msguid(now)
    message = bounce_message.make_bounce(me, to, envelope.get("recipient", ""), reason, original,
                                         max_bytes, msguid, double)
    bounce_envelope = {
        "sender": "",
        "recipient": to,
        "msguid": msguid,
        "sendid": bounce_message.INTERNAL_SENDID,
        "listid": "",
        "mtaid": "",
        "mailclass": "",
        "instanceid": "",
        "click_tracking_id": "",
        "injected_time": int(now),
        "source_ip": "",
        "bounce_level": 2 if double else 1,
    }
    return bounce_envelope, message


def commit_bounces(root: str, bounces: list[tuple[dict, bytes]], bounce_limit: int) -> str:
    """Commit bounces into the bounce-queue, or the disk-queue when it is full; return which."""
    dest = "bounce"
    if bounce_limit and queue_entry.read_count(count_path(root, "bounce")) \
            + len(bounces) > bounce_limit:
        dest = "disk"
    files = []
    for envelope, message in bounces:
        name = queue_entry.new_entry_name(envelope["msguid"], 0)
        files.append((name, [queue_entry.envelope_line(envelope), b"\n", message]))
    placed = queue_entry.place(queue_dir(root, dest), files, durable=(dest == "disk"))
    queue_entry.trigger(trigger_path(root, dest), placed)
    return dest
