"""A log folder rotated by size, multilog-style: `current` plus `@<ns>.s` files.

Used for the processed delivery logs (greenarrow.lib.core.delivery_log) and for
each service's log under `log/<service>/`. The writer is the only writer of
its folder. Each write is one unbuffered write(2) of whole lines, so a
reader never sees half a batch, and nothing sits in a userspace buffer when
the process dies.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

CURRENT = "current"
_ROTATED_RE = re.compile(r"^@(\d+)\.s$")


def rotated_name(timestamp_ns: int) -> str:
    """The file name of a log rotated at `timestamp_ns` (sortable by name)."""
    return f"@{timestamp_ns:020d}.s"


def rotated_files(directory: Path) -> list[tuple[int, Path]]:
    """The rotated files of a log folder as (end time in ns, path), oldest first."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        match = _ROTATED_RE.match(name)
        if match:
            found.append((int(match.group(1)), directory / name))
    found.sort()
    return found


class RotatingLog:
    """Appends whole lines to `directory/current`, rotating by size and keeping `keep` old files."""

    def __init__(self, directory: Path, max_bytes: int = 16 * 1024 * 1024, keep: int = 20) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, not {max_bytes}")
        if keep < 0:
            raise ValueError(f"keep must be zero or more, not {keep}")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.keep = keep
        self.directory.mkdir(parents=True, exist_ok=True)
        existing = rotated_files(self.directory)
        self._last_rotated_ns = existing[-1][0] if existing else 0
        self._fd: int | None = None
        self._size = 0
        self._open()

    @property
    def path(self) -> Path:
        """The file currently appended to."""
        return self.directory / CURRENT

    def _open(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        size = os.fstat(fd).st_size
        if size:
            # A previous writer that died mid-line left a torn last line; end
            # it so our first record does not get glued onto it.
            with open(self.path, "rb") as existing:
                existing.seek(size - 1)
                if existing.read(1) != b"\n":
                    size += _write_all(fd, b"\n")
        self._fd = fd
        self._size = size

    def write_bytes(self, data: bytes) -> None:
        """Append whole lines with one write, rotating first if they would not fit."""
        if self._fd is None:
            raise ValueError("write to a closed log")
        if not data:
            return
        if self._size and self._size + len(data) > self.max_bytes:
            self._rotate()
        self._size += _write_all(self._fd, data)

    def _rotate(self) -> None:
        """Rename `current` to `@<ns>.s`, start a new one, drop the oldest."""
        assert self._fd is not None
        os.close(self._fd)
        self._fd = None
        # Strictly increasing even if two rotations land in the same ns or the
        # clock steps back, so the name order is always the write order.
        stamp = max(time.time_ns(), self._last_rotated_ns + 1)
        os.rename(self.path, self.directory / rotated_name(stamp))
        self._last_rotated_ns = stamp
        self._open()
        self._prune()

    def _prune(self) -> None:
        rotated = rotated_files(self.directory)
        excess = len(rotated) - self.keep
        for _, path in rotated[: max(excess, 0)]:
            try:
                path.unlink()
            except FileNotFoundError:
                pass

    def sync(self) -> None:
        """fsync `current`: the lines written so far survive a power loss, not only a crash."""
        if self._fd is None:
            raise ValueError("sync of a closed log")
        os.fsync(self._fd)

    def close(self) -> None:
        """Close `current`; closing twice is harmless."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RotatingLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _write_all(fd: int, data: bytes) -> int:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
    return len(data)
