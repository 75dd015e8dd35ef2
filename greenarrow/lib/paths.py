"""The install root: where every program finds its control files, queues and logs.

`HVMAIL_ROOT` names the root (default `/var/hvmail`). Tests and benchmarks
point it at a temporary folder, so several instances run side by side.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_ROOT = "/var/hvmail"
QUEUES = ("ram", "bounce", "disk")


class Root:
    """The folders of one install root (ARCHITECTURE section 3).

    A plain class, not a dataclass: command-line injection imports this module
    and every millisecond of start-up counts there.
    """

    __slots__ = ("path",)

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"Root({str(self.path)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Root) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    @property
    def control(self) -> Path:
        return self.path / "control"

    @property
    def bin(self) -> Path:
        return self.path / "bin"

    @property
    def var(self) -> Path:
        return self.path / "var"

    @property
    def log(self) -> Path:
        return self.path / "log"

    @property
    def maildata(self) -> Path:
        return self.path / "maildata"

    def queue(self, name: str) -> Path:
        """The folder of one queue: `ram`, `bounce` or `disk`."""
        if name not in QUEUES:
            raise ValueError(f"unknown queue {name!r}: expected one of {', '.join(QUEUES)}")
        return self.path / "queue" / name

    def service_log(self, service: str) -> Path:
        return self.log / service

    def delivery_log(self, queue: str) -> Path:
        """The processed delivery log folder written by `queue-send <queue>`."""
        return self.log / "delivery" / queue

    def trigger(self, queue: str) -> Path:
        """The FIFO that wakes `queue-send <queue>`."""
        return self.var / f"trigger.{queue}"

    def remote_socket(self, worker: int) -> Path:
        """The Unix socket on which remote worker number `worker` takes attempts."""
        return self.var / f"remote.{worker}.sock"


def root_from_env(environ: os._Environ[str] | dict[str, str] | None = None) -> Root:
    """The install root named by `HVMAIL_ROOT`, or the default `/var/hvmail`."""
    env = os.environ if environ is None else environ
    return Root(Path(env.get("HVMAIL_ROOT") or DEFAULT_ROOT).absolute())
