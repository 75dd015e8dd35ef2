"""Maildir delivery: a message is written under `tmp/`, then renamed into `new/`.

The one writer of Maildirs in the engine (the counting sink files into one;
local delivery and the bounce and complaint mailboxes will). A reader never
sees part of a message: it appears in `new/` whole, by rename. With
`durable`, the file and `new/` are fsync'd before `deliver` returns, so a
message reported delivered survives a crash of the machine.

File names follow the Maildir convention `<seconds>.M<usec>P<pid>Q<n>.<host>`,
unique on the machine without a lock.
"""

from __future__ import annotations

import itertools
import os
import socket
import time

SUBFOLDERS = ("tmp", "new", "cur")


def _host() -> str:
    # "/" and ":" cannot appear in a Maildir name part; the convention escapes them.
    return socket.gethostname().replace("/", "\\057").replace(":", "\\072")


class Maildir:
    """One Maildir folder, created on first use (with its tmp/, new/ and cur/)."""

    def __init__(self, path: str | os.PathLike[str], durable: bool = False) -> None:
        self.path = os.fspath(path)
        self.durable = durable
        self._host = _host()
        self._sequence = itertools.count()
        for sub in SUBFOLDERS:
            os.makedirs(os.path.join(self.path, sub), exist_ok=True)

    def new_name(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        usec = int(now * 1_000_000) % 1_000_000
        return f"{int(now)}.M{usec}P{os.getpid()}Q{next(self._sequence)}.{self._host}"

    def deliver(self, parts: list[bytes] | bytes) -> str:
        """File one message (its bytes, or a list of byte strings joined); its name in new/.

        A failed write leaves nothing behind in tmp/ and raises OSError.
        """
        name = self.new_name()
        tmp = os.path.join(self.path, "tmp", name)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                data = parts if isinstance(parts, bytes) else b"".join(parts)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                if self.durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, os.path.join(self.path, "new", name))
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        if self.durable:
            folder = os.open(os.path.join(self.path, "new"), os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
        return name
