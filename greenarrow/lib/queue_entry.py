"""The queue entry: one file per recipient, and how it is committed.

File layout (docs/formats.md, "Queue entry"):

    line 1   the envelope, one line of JSON (sender, recipient, msguid, ...)
    rest     the RFC 5322 message exactly as it will be sent: CRLF line
             endings, not dot-stuffed

File name: `<entry id>.<attempts>.<due>` in `queue/<q>/entries/`. The entry id
is `<msguid>-<recipient index>`; `attempts` counts the attempts made so far;
`due` is the epoch second of the next attempt (0: as soon as possible). Retry
state changes by `rename` only, so a scheduler rebuilds its schedule from a
directory scan (greenarrow.pyx.queue_scan) without opening a file.

Commit: the file is written under `queue/<q>/tmp/`, then renamed into
`entries/`. In a durable queue (the disk-queue) the file is fsync'd before the
rename and the folder after it. Nothing under `tmp/` is ever delivered.

Command-line injection imports this module: it imports nothing heavy.
"""

from __future__ import annotations

import errno
import itertools
import os
import time

ENTRIES = "entries"
TMP = "tmp"
HOLD = "hold"

# Keys of the envelope line, in the order they are written.
ENVELOPE_KEYS = (
    "sender",
    "recipient",
    "msguid",
    "sendid",
    "listid",
    "mtaid",
    "mailclass",
    "instanceid",
    "click_tracking_id",
    "injected_time",
    "source_ip",
)

_PIPE_BUF = 4096
_sequence = itertools.count()


class QueueWriteError(Exception):
    """The queue could not take the message now (temporary: exit 111, SMTP 451)."""


def new_msguid(now: float | None = None) -> str:
    """An id unique on this machine: microseconds, process id and a counter."""
    usec = int((time.time() if now is None else now) * 1_000_000)
    return f"{usec:x}-{os.getpid():x}-{next(_sequence):x}"


def entry_name(entry_id: str, attempts: int, due: int) -> str:
    return f"{entry_id}.{attempts}.{due}"


def split_name(name: str) -> tuple[str, int, int]:
    """(entry id, attempts, due) of an entry file name; ValueError if it is not one."""
    entry_id, attempts, due = name.rsplit(".", 2)
    return entry_id, int(attempts), int(due)


_JSON_ESCAPES = {i: f"\\u{i:04x}" for i in range(32)}
_JSON_ESCAPES.update({ord('"'): '\\"', ord("\\"): "\\\\", 0x7F: "\\u007f"})


def _json_string(value: str) -> str:
    text = value.translate(_JSON_ESCAPES)
    if not text.isascii():
        out = []
        for c in text:
            code = ord(c)
            if code < 0x80:
                out.append(c)
            elif code < 0x10000:
                out.append(f"\\u{code:04x}")
            else:
                code -= 0x10000
                out.append(f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}")
        text = "".join(out)
    return f'"{text}"'


def envelope_line(envelope: dict) -> bytes:
    """The envelope as one line of ASCII JSON, without its newline.

    Written by hand rather than with the json module, whose import (and that
    of `re` under it) would cost command-line injection more than the rest of
    its work; envelope values are strings and integers only.
    """
    parts = []
    for key, value in envelope.items():
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise TypeError(f"envelope field {key} must be a string or an integer")
        parts.append(f'"{key}":{value if isinstance(value, int) else _json_string(value)}')
    return ("{" + ",".join(parts) + "}").encode("ascii")


def encode_entry(envelope: dict, message: bytes) -> bytes:
    return envelope_line(envelope) + b"\n" + message


def decode_entry(data: bytes) -> tuple[dict, bytes]:
    """(envelope, message) of an entry file's bytes."""
    import json  # not at module level: see envelope_line

    nl = data.find(b"\n")
    if nl < 0:
        raise ValueError("queue entry has no envelope line")
    return json.loads(data[:nl]), data[nl + 1 :]


def read_envelope(path: str | os.PathLike) -> dict:
    """The envelope line alone, without reading the message."""
    import json

    # os.read rather than a file object: queue-send reads one per attempt.
    fd = os.open(path, os.O_RDONLY)
    try:
        head = os.read(fd, 4096)
        nl = head.find(b"\n")
        while nl < 0:
            more = os.read(fd, 65536)
            if not more:
                raise ValueError(f"{path}: queue entry has no envelope line")
            head += more
            nl = head.find(b"\n")
    finally:
        os.close(fd)
    return json.loads(head[:nl])


def read_entry(path: str | os.PathLike) -> tuple[dict, bytes]:
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = [os.read(fd, os.fstat(fd).st_size + 1)]
        while chunks[-1]:  # the file grew, or a short read: read to the end
            chunks.append(os.read(fd, 65536))
    finally:
        os.close(fd)
    return decode_entry(b"".join(chunks))


def ensure_queue_dirs(queue_dir: str | os.PathLike) -> None:
    for sub in (ENTRIES, TMP, HOLD):
        os.makedirs(os.path.join(queue_dir, sub), exist_ok=True)


def _write_file(path: str, chunks: list[bytes], durable: bool) -> None:
    # Group-readable: the queue-sends and remote workers read what smtpd writes (core.users).
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        total = sum(len(c) for c in chunks)
        written = os.writev(fd, chunks)
        while written < total:  # a short write: finish it chunk by chunk
            data = b"".join(chunks)[written:]
            written += os.write(fd, data)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def place(queue_dir: str | os.PathLike, files: list[tuple[str, list[bytes]]],
          durable: bool = False) -> list[str]:
    """Commit files (entry name, content chunks) into a queue, all or nothing.

    Each is written under tmp/ (fsync'd when `durable`), then renamed into
    entries/; in a durable queue the folder is fsync'd once for the batch
    after the renames. If any write fails, what was written is removed and
    QueueWriteError is raised: nothing half-written is ever delivered.
    """
    queue_dir = os.fspath(queue_dir)
    tmp_dir = os.path.join(queue_dir, TMP)
    entries_dir = os.path.join(queue_dir, ENTRIES)
    written: list[tuple[str, str]] = []
    try:
        for name, chunks in files:
            tmp_path = os.path.join(tmp_dir, name)
            _write_file(tmp_path, chunks, durable)
            written.append((tmp_path, name))
        for tmp_path, name in written:
            os.rename(tmp_path, os.path.join(entries_dir, name))
        if durable:
            fsync_dir(entries_dir)
        return [name for _, name in written]
    except OSError as e:
        for tmp_path, name in written:
            for path in (tmp_path, os.path.join(entries_dir, name)):
                try:
                    os.unlink(path)
                except OSError:
                    pass
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise QueueWriteError("queue is full (no space left)") from e
        raise QueueWriteError(f"cannot write to the queue: {e.strerror}") from e


def commit(queue_dir: str | os.PathLike, envelopes: list[dict], message: bytes,
           durable: bool = False, attempts: int = 0, due: int = 0) -> list[str]:
    """Write one entry per envelope (ids `<msguid>-<index>`); return the committed names."""
    files = []
    for index, envelope in enumerate(envelopes):
        name = entry_name(f"{envelope['msguid']}-{index}", attempts, due)
        files.append((name, [envelope_line(envelope), b"\n", message]))
    return place(queue_dir, files, durable)


def count_path(root: str, queue: str) -> str:
    """The file where `queue-send <queue>` publishes how many entries it holds."""
    return os.path.join(root, "var", f"queue.{queue}.count")


def write_count(path: str, count: int) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{count}\n")
    os.replace(tmp, path)


def read_count(path: str) -> int:
    """The published entry count of a queue; 0 when its queue-send has not said."""
    try:
        with open(path) as f:
            return int(f.read().strip() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def _write_names(fd: int, names: list[str]) -> None:
    chunk = b""
    for name in names:
        line = name.encode("ascii") + b"\n"
        if len(chunk) + len(line) > _PIPE_BUF:
            os.write(fd, chunk)
            chunk = b""
        chunk += line
    if chunk:
        os.write(fd, chunk)


def trigger(fifo_path: str | os.PathLike, names: list[str]) -> None:
    """Tell the queue's scheduler about new entries; harmless if it is not running.

    The names go through the FIFO, one per line, in writes of at most
    PIPE_BUF bytes so that lines from several injectors never interleave.
    A name that does not get through (no reader, pipe full) is found by the
    scheduler's next rescan.
    """
    try:
        fd = os.open(fifo_path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return
    try:
        _write_names(fd, names)
    except OSError:
        pass
    finally:
        os.close(fd)


class Trigger:
    """`trigger` for a long-lived injector (smtpd): the FIFO stays open between messages.

    Opening the FIFO for each message cost smtpd a sixth of its time. A
    failed write (the scheduler restarted: EPIPE) closes it, and the next
    call opens it again. Inside an event loop, the names committed during
    one round of the loop (several sessions ending DATA together) go in one
    write when the round ends; the entries are already in the queue by then.
    """

    def __init__(self, fifo_path: str | os.PathLike) -> None:
        self.path = fifo_path
        self.fd: int | None = None
        self.pending: list[str] = []

    def __call__(self, names: list[str]) -> None:
        import asyncio

        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.write(names)
            return
        if not self.pending:
            loop.call_soon(self.flush)
        self.pending.extend(names)

    def flush(self) -> None:
        names, self.pending = self.pending, []
        if names:
            self.write(names)

    def write(self, names: list[str]) -> None:
        if self.fd is None:
            try:
                self.fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                return
        try:
            _write_names(self.fd, names)
        except BlockingIOError:
            pass  # the pipe is full: the scheduler's rescan finds these names
        except OSError:
            self.close()

    def close(self) -> None:
        self.flush()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
