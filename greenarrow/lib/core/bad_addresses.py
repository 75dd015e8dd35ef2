"""`var/bad_addresses`: the (address, ListID) pairs SimpleMH injection suppresses.

The one owner of the file's name and format. The bounce processor
(greenarrow.lib.feedback) writes it from the events database after it
commits a suppressing event (`bounce_bad_address`, `scomp`, `engine_unsub`);
SimpleMH injection (greenarrow.lib.simplemh.processing) reads it for a Mail Class with
`bad_address_suppression yes`.

Format: one line per pair, `<listid>\\t<address>\\n`, both lower-cased,
lines sorted by their bytes, no duplicates. Lookups binary-search the file
through mmap: no loading, no parsing, O(log n) page touches per recipient,
so a file of millions of addresses costs an injection nothing measurable
and a new version is seen at the next message (the file is replaced by
rename; a reader keeps its old mapping until it notices the new inode).

Imports nothing heavy (injection's import guard: no re, json, hashlib).
"""

from __future__ import annotations

import mmap
import os

FILE = "bad_addresses"


def path(root: str) -> str:
    return os.path.join(root, "var", FILE)


def line_of(email: str, listid: str) -> bytes | None:
    """The line of a pair (without its newline); None if it cannot be written (TAB, LF)."""
    key = f"{listid.strip().lower()}\t{email.strip().lower()}"
    if key.count("\t") != 1 or "\n" in key or "\r" in key:
        return None
    return key.encode("utf-8", "surrogateescape")


def write(root: str, pairs: object) -> int:
    """Replace the file with `pairs` (iterable of (email, listid)); the number of lines."""
    lines = sorted({line for email, listid in pairs  # type: ignore[attr-defined]
                    if (line := line_of(email, listid)) is not None})
    target = path(root)
    tmp = f"{target}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(b"".join(line + b"\n" for line in lines))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    return len(lines)


def _contains(data: mmap.mmap, key: bytes) -> bool:
    lo, hi = 0, len(data)  # both always at a line start (or the end)
    while lo < hi:
        mid = (lo + hi) // 2
        nl = data.rfind(b"\n", lo, mid)
        start = lo if nl < 0 else nl + 1  # the start of the line that holds mid
        end = data.find(b"\n", mid, hi)
        if end < 0:
            end = hi
        line = data[start:end]
        if line == key:
            return True
        if line < key:
            lo = end + 1
        else:
            hi = start
    return False


class BadAddresses:
    """The file of one install root, re-mapped when it is replaced."""

    def __init__(self, root: str) -> None:
        self.file = path(root)
        self._key: tuple[int, int, int] | None = None
        self._map: mmap.mmap | None = None

    def _refresh(self) -> mmap.mmap | None:
        try:
            st = os.stat(self.file)
        except FileNotFoundError:
            self._key, self._map = None, None
            return None
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        if key != self._key:
            self._key, self._map = key, None
            if st.st_size:
                with open(self.file, "rb") as f:
                    self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._map

    def contains(self, email: str, listid: str) -> bool:
        """Whether (email, ListID) is suppressed (the file is checked for a new version)."""
        data = self._refresh()
        if data is None:
            return False
        key = line_of(email, listid)
        return key is not None and _contains(data, key)


_open: dict[str, BadAddresses] = {}


def for_root(root: str) -> BadAddresses:
    """The BadAddresses of `root`, one per process."""
    found = _open.get(root)
    if found is None:
        found = _open[root] = BadAddresses(root)
    return found
