"""Reading a rotated log folder (`current` + `@<ns>.s`, greenarrow.lib.core.rotating_log)
line by line from a saved position, across rotations, without ever holding it up.

A position names a file by its inode and the name it had when last read
(`current` until it is rotated, then its `@<ns>.s` name), plus a SHA-256 of
its first bytes so a pruned file's inode reused by a new file is not taken
for it, and the byte offset of the first line not yet consumed.

Each `read` takes a snapshot of the folder, oldest file first, opening
`current` before listing the rotated files (as delivery_log.iter_entries
does), so a rotation during the read neither skips nor repeats a file.
Only whole lines are returned from the newest file (the writer may be in the
middle of one); an older file is complete, and a torn last line in it is
returned as it is for the caller to reject.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from greenarrow.lib.core.rotating_log import CURRENT, rotated_files

log = logging.getLogger("greenarrow.events.log_follower")

HEAD_BYTES = 256  # how much of a file's start identifies it


@dataclass(frozen=True)
class Position:
    """Where reading a folder stopped: file (name, inode, head) and byte offset."""

    file_name: str
    inode: int
    head_sha256: str
    byte_offset: int


@dataclass
class Chunk:
    """What one `read` found: whole lines, where to continue, and what it passed."""

    lines: list[bytes]
    position: Position | None
    line_offsets: list[tuple[str, int]] = field(default_factory=list)  # (file, offset) per line
    finished: list[Path] = field(default_factory=list)  # rotated files read to their end
    lost: str | None = None  # why the saved position could not be found, if it could not


@dataclass
class _File:
    name: str
    path: Path
    inode: int
    fd: int | None = None  # kept open: `current`, opened before the listing


def _head(fd: int, offset: int) -> str:
    return hashlib.sha256(os.pread(fd, min(offset, HEAD_BYTES), 0)).hexdigest()


class FolderReader:
    """Reads one rotated log folder from a Position (the caller stores it)."""

    def __init__(self, directory: Path, max_bytes: int = 1 << 20) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes

    def _snapshot(self) -> list[_File]:
        files: list[_File] = []
        current: _File | None = None
        try:
            fd = os.open(self.directory / CURRENT, os.O_RDONLY)
            current = _File(CURRENT, self.directory / CURRENT, os.fstat(fd).st_ino, fd)
        except FileNotFoundError:
            pass
        for _, path in rotated_files(self.directory):
            try:
                inode = os.stat(path).st_ino
            except FileNotFoundError:
                continue  # pruned as we listed
            if current is not None and inode == current.inode:
                current.name = path.name  # rotated after we opened it: it is this one
                current.path = path
                files.append(current)
                current = None
            else:
                files.append(_File(path.name, path, inode))
        if current is not None:
            files.append(current)
        return files

    def _open(self, entry: _File) -> int | None:
        if entry.fd is not None:
            return entry.fd
        try:
            fd = os.open(entry.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        if os.fstat(fd).st_ino != entry.inode:
            os.close(fd)
            return None
        entry.fd = fd
        return fd

    def _locate(self, files: list[_File], position: Position) -> int | None:
        for index, entry in enumerate(files):
            if entry.inode != position.inode:
                continue
            if position.file_name != CURRENT and entry.name != position.file_name:
                continue  # a rotated file keeps its name; this inode was reused
            fd = self._open(entry)
            if fd is None:
                continue
            if os.fstat(fd).st_size < position.byte_offset:
                continue
            if _head(fd, position.byte_offset) == position.head_sha256:
                return index
        return None

    def read(self, position: Position | None) -> Chunk:
        """Lines after `position` (None: from the oldest file), up to max_bytes."""
        files = self._snapshot()
        try:
            return self._read(files, position)
        finally:
            for entry in files:
                if entry.fd is not None:
                    os.close(entry.fd)

    def _read(self, files: list[_File], position: Position | None) -> Chunk:
        chunk = Chunk([], position)
        if not files:
            return chunk
        index: int | None = 0
        offset = 0
        if position is not None:
            index = self._locate(files, position)
            if index is None:
                chunk.lost = (
                    f"{self.directory}: the file being read ({position.file_name}, inode "
                    f"{position.inode}) is gone or changed; anything after its byte "
                    f"{position.byte_offset} was not read. Continuing with the oldest file, "
                    f"{files[0].name}"
                )
                index = 0
            else:
                offset = position.byte_offset
                chunk.finished.extend(entry.path for entry in files[:index])
        assert index is not None
        budget = self.max_bytes
        while True:
            entry = files[index]
            newest = index == len(files) - 1
            fd = self._open(entry)
            if fd is None:  # a rotated file pruned since the snapshot
                if newest:
                    break
                chunk.finished.append(entry.path)
                index, offset = index + 1, 0
                continue
            data = os.pread(fd, budget, offset)
            at_end = len(data) < budget
            end = data.rfind(b"\n") + 1
            if not newest and at_end:
                end = len(data)  # a complete file: its torn last line too
            elif end == 0 and not at_end:
                end = len(data)  # one line longer than max_bytes: pass it on in pieces
            start = 0
            while start < end:
                stop = data.find(b"\n", start, end)
                stop = end if stop < 0 else stop + 1
                chunk.lines.append(data[start:stop])
                chunk.line_offsets.append((entry.name, offset + start))
                start = stop
            offset += end
            budget -= end
            chunk.position = Position(entry.name, entry.inode, _head(fd, offset), offset)
            if newest or not at_end:
                break
            # This rotated file is done: go on with the next, at its start.
            chunk.finished.append(entry.path)
            index, offset = index + 1, 0
            following = files[index]
            next_fd = self._open(following)
            if next_fd is not None:
                chunk.position = Position(following.name, following.inode, _head(next_fd, 0), 0)
            if budget <= 0:
                break
        return chunk


def bytes_behind(directory: Path, position: Position | None) -> int:
    """How many bytes of the folder lie after `position` (all of it for None)."""
    reader = FolderReader(directory)
    files = reader._snapshot()
    try:
        index = 0 if position is None else reader._locate(files, position)
        if index is None:
            index = 0
            skip = 0
        else:
            skip = 0 if position is None else position.byte_offset
        total = 0
        for entry in files[index:]:
            fd = reader._open(entry)
            if fd is not None:
                total += os.fstat(fd).st_size
        return max(total - skip, 0)
    finally:
        for entry in files:
            if entry.fd is not None:
                os.close(entry.fd)
