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
rename and the folder after it. Nothing under `tmp/` is ever delivered; a
write that fails part-way removes its file at once.

Reading: every reader of an envelope goes through `check_envelope` (by way of
`read_envelope`, `read_entry` or `decode_entry`); an entry that fails it is a
`BadEntry`, which queue-send moves to the queue's `bad/` folder.

Command-line injection imports this module: it imports nothing heavy.
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
import time

ENTRIES = "entries"
TMP = "tmp"
HOLD = "hold"
BAD = "bad"  # entries whose envelope failed check_envelope; never scheduled

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

REQUIRED = "required"
# The envelope as readers see it: key -> (type, default). A key with default
# None is added only when written (bounce_level, dkim: readers of those take
# absent as 0 and ""). Unknown keys are ignored (a newer writer may add
# some); values of the wrong type make the entry bad.
ENVELOPE_FIELDS: dict[str, tuple[type, object]] = {
    "sender": (str, REQUIRED),
    "recipient": (str, REQUIRED),
    "msguid": (str, ""),
    "sendid": (str, ""),
    "listid": (str, ""),
    "mtaid": (str, ""),
    "mailclass": (str, ""),
    "instanceid": (str, ""),
    "click_tracking_id": (str, ""),
    "injected_time": (int, 0),  # 0: unknown (readers count from now)
    "source_ip": (str, ""),
    "bounce_level": (int, None),
    "dkim": (str, None),
}
ADDRESS_KEYS = ("sender", "recipient")
MAX_ENVELOPE_LINE = 65536  # bytes, newline excluded
MAX_ADDRESS = 1000  # characters of sender or recipient (an SMTP command line holds 512)
MAX_VALUE = 4096  # characters of any other string
MAX_INTEGER = 2**53  # what every JSON reader keeps exact

_PIPE_BUF = 4096
_sequence = itertools.count()


class QueueWriteError(Exception):
    """The queue could not take the message now (temporary: exit 111, SMTP 451)."""


class BadEntry(ValueError):
    """A queue entry that can never be delivered as it is: its envelope line is
    missing, not JSON, or not an envelope. The text says what is wrong."""


def new_msguid(now: float | None = None) -> str:
    """An id unique on this machine: microseconds, process id and a counter."""
    usec = int((time.time() if now is None else now) * 1_000_000)
    return f"{usec:x}-{os.getpid():x}-{next(_sequence):x}"


def entry_name(entry_id: str, attempts: int, due: int) -> str:
    """The file name of an entry with this retry state (docs/formats.md section 1)."""
    return f"{entry_id}.{attempts}.{due}"


def new_entry_name(msguid: str, index: int, attempts: int = 0, due: int = 0) -> str:
    """The file name of recipient `index` of message `msguid`, the way every writer names it."""
    return f"{msguid}-{index}.{attempts}.{due}"


_parse_name = None  # the compiled scanner's parser, imported at the first split_name


def split_name(name: str) -> tuple[str, int, int]:
    """(entry id, attempts, due) of an entry file name; ValueError if it is not one.

    The compiled scanner's parser decides, so a name is an entry for every
    reader or for none: `queue-send`'s scan and the queue tools agree.
    """
    global _parse_name
    if _parse_name is None:
        # Not at import: command-line injection imports this module but never parses names.
        from greenarrow.pyx.queue_scan import parse_name

        _parse_name = parse_name
    parsed = None if name.startswith(".") else _parse_name(name)
    if parsed is None:
        raise ValueError(f"not a queue entry name: {name!r}")
    return parsed


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


def check_envelope(value: object) -> dict:
    """The envelope with its known keys checked and defaulted; BadEntry if it is not one.

    Returns a new dict of the keys of ENVELOPE_FIELDS only (those with default
    None only when present). Addresses may not
    hold control characters (an address with CR LF would smuggle SMTP commands).
    """
    if not isinstance(value, dict):
        raise BadEntry(f"envelope is a JSON {_json_kind(value)}, not an object")
    envelope = {}
    for key, (kind, default) in ENVELOPE_FIELDS.items():
        if key not in value:
            if default is REQUIRED:
                raise BadEntry(f"envelope has no {key!r}")
            if default is not None:
                envelope[key] = default
            continue
        item = value[key]
        if isinstance(item, bool) or not isinstance(item, kind):
            raise BadEntry(f"envelope {key!r} is a JSON {_json_kind(item)}, "
                           f"not {'a string' if kind is str else 'an integer'}")
        if kind is str:
            limit = MAX_ADDRESS if key in ADDRESS_KEYS else MAX_VALUE
            if len(item) > limit:
                raise BadEntry(f"envelope {key!r} is {len(item)} characters long "
                               f"(at most {limit})")
            if key in ADDRESS_KEYS and not item.isprintable():
                raise BadEntry(f"envelope {key!r} holds a control character")
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:  # a lone surrogate such as "\\udc80"
                    raise BadEntry(f"envelope {key!r} is not valid Unicode") from None
        elif not 0 <= item <= MAX_INTEGER:
            raise BadEntry(f"envelope {key!r} is out of range (0 to 2**53)")
        envelope[key] = item
    if not envelope["recipient"]:
        raise BadEntry("envelope 'recipient' is empty")
    return envelope


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return {dict: "object", list: "array", str: "string", int: "number",
            float: "number"}.get(type(value), type(value).__name__)


def parse_envelope(line: bytes) -> dict:
    """The checked envelope of an envelope line (without its newline); BadEntry if bad."""
    import json  # not at module level: see envelope_line

    if len(line) > MAX_ENVELOPE_LINE:
        raise BadEntry(f"envelope line is {len(line)} bytes long (at most {MAX_ENVELOPE_LINE})")
    try:
        value = json.loads(line)
    except RecursionError:
        raise BadEntry("envelope line is not JSON: nested too deeply") from None
    except UnicodeDecodeError as e:
        raise BadEntry(f"envelope line is not UTF-8: {e.reason} at byte {e.start}") from None
    except ValueError as e:  # json.JSONDecodeError, and integers too long to convert
        raise BadEntry(f"envelope line is not JSON: {e}") from None
    return check_envelope(value)


def decode_entry(data: bytes) -> tuple[dict, bytes]:
    """(envelope, message) of an entry file's bytes; BadEntry if the envelope is bad."""
    nl = data.find(b"\n", 0, MAX_ENVELOPE_LINE + 1)
    if nl < 0:
        raise BadEntry(_no_line(len(data)))
    return parse_envelope(data[:nl]), data[nl + 1 :]


def _no_line(size: int) -> str:
    if size == 0:
        return "queue entry is empty"
    if size > MAX_ENVELOPE_LINE:
        return f"envelope line is longer than {MAX_ENVELOPE_LINE} bytes (or has no newline)"
    return "queue entry has no envelope line (no newline)"


def _open_entry(path: str | os.PathLike) -> tuple[int, int]:
    """Open an entry to read: (descriptor, size); BadEntry if it is not a regular file.

    An entry is always a file renamed into place: a symbolic link (which
    could make a worker send any file the engine can read) or a FIFO (which
    would block the reader) is refused without being followed or waited on.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise BadEntry("queue entry is a symbolic link") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BadEntry("queue entry is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def read_envelope(path: str | os.PathLike) -> dict:
    """The checked envelope alone, without reading the message; BadEntry if it is bad."""
    # os.read rather than a file object: queue-send reads one per attempt.
    fd, _ = _open_entry(path)
    try:
        head = os.read(fd, 4096)
        nl = head.find(b"\n")
        while nl < 0 and len(head) <= MAX_ENVELOPE_LINE:
            more = os.read(fd, 65536)
            if not more:
                break
            start = len(head)
            head += more
            nl = head.find(b"\n", start)
    finally:
        os.close(fd)
    if nl < 0 or nl > MAX_ENVELOPE_LINE:
        raise BadEntry(_no_line(len(head)))
    return parse_envelope(head[:nl])


def read_entry(path: str | os.PathLike) -> tuple[dict, bytes]:
    """(checked envelope, message) of an entry file; BadEntry if the envelope is bad."""
    fd, size = _open_entry(path)
    try:
        chunks = [os.read(fd, size + 1)]
        while chunks[-1]:  # the file grew, or a short read: read to the end
            chunks.append(os.read(fd, 65536))
    finally:
        os.close(fd)
    return decode_entry(b"".join(chunks))


def ensure_queue_dirs(queue_dir: str | os.PathLike) -> None:
    for sub in (ENTRIES, TMP, HOLD, BAD):
        os.makedirs(os.path.join(queue_dir, sub), exist_ok=True)


def move_to_bad(queue_dir: str | os.PathLike, name: str) -> str:
    """Move entry `name` from entries/ to bad/ (created if missing); return its name there.

    Never replaces a file already in bad/: a second bad entry of the same
    name gets a `.1`, `.2`... suffix. FileNotFoundError if the entry is gone.
    A rename, not a link and an unlink: the entry may belong to another of the
    engine's users (smtpd commits as its own), and the kernel refuses a hard
    link to another user's file (fs.protected_hardlinks). The check-then-rename
    cannot race: the queue's queue-send is the only writer of its bad/.
    """
    src = os.path.join(queue_dir, ENTRIES, name)
    bad_dir = os.path.join(queue_dir, BAD)
    os.makedirs(bad_dir, exist_ok=True)
    target = name
    for n in range(1, 1000):
        if not os.path.lexists(os.path.join(bad_dir, target)):
            break
        target = f"{name}.{n}"
    else:
        raise FileExistsError(f"{name}: too many entries of this name in {bad_dir}")
    os.rename(src, os.path.join(bad_dir, target))
    return target


def _write_file(path: str, chunks: list[bytes], durable: bool) -> None:
    """Write a new file; if anything fails part-way, the file is removed before raising."""
    # Group-readable: the queue-sends and remote workers read what smtpd writes (core.users).
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
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
    except BaseException:  # ENOSPC, EIO, EFBIG, a signal: no partial file stays in tmp/
        _remove(path)
        raise


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


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
    except BaseException as e:
        for tmp_path, name in written:
            _remove(tmp_path)
            _remove(os.path.join(entries_dir, name))
        if not isinstance(e, OSError):
            raise
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise QueueWriteError("queue is full (no space left)") from e
        raise QueueWriteError(f"cannot write to the queue: {e.strerror}") from e


def commit(queue_dir: str | os.PathLike, envelopes: list[dict], message: bytes,
           durable: bool = False, attempts: int = 0, due: int = 0) -> list[str]:
    """Write one entry per envelope (ids `<msguid>-<index>`); return the committed names."""
    files = []
    for index, envelope in enumerate(envelopes):
        name = new_entry_name(envelope["msguid"], index, attempts, due)
        files.append((name, [envelope_line(envelope), b"\n", message]))
    return place(queue_dir, files, durable)


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
