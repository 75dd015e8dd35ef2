"""The install root: where every program finds its control files, queues and logs.

`HVMAIL_ROOT` names the root (default `/var/hvmail`). Tests and benchmarks
point it at a temporary folder, so several instances run side by side.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing itself costs command-line injection milliseconds

if TYPE_CHECKING:
    from pathlib import Path

DEFAULT_ROOT = "/var/hvmail"
QUEUES = ("ram", "bounce", "disk")

# Files under var/ (docs/formats.md section 12). Every program names them
# through this module; the functions below take the root as a string so that
# command-line injection needs no pathlib.
INJECT_SOCKET = "inject.sock"  # injectd's socket for the compiled sendmail client
SIMPLEMH_CACHE = "simplemh.cache"  # the compiled Mail Classes
SUPERVISE_PID = "supervise.pid"
SUPERVISE_STATUS = "supervise.status"
THROTTLE_STATE_GLOB = "throttle.*.json"


class Root:
    """The folders of one install root (docs/ARCHITECTURE.md section 4).

    A plain class, not a dataclass, and pathlib is imported only when one is
    made: command-line injection imports this module for the string functions
    below, and every millisecond of its start-up counts.
    """

    __slots__ = ("path",)

    def __init__(self, path: Path | str) -> None:
        from pathlib import Path  # not at import time: see the class docstring

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
        return self.path.__class__(queue_dir(str(self.path), name))

    def service_log(self, service: str) -> Path:
        return self.log / service

    def delivery_log(self, queue: str) -> Path:
        """The processed delivery log folder written by `queue-send <queue>`."""
        return self.log / "delivery" / queue

    def trigger(self, queue: str) -> Path:
        """The FIFO that wakes `queue-send <queue>`."""
        return self.path.__class__(trigger_path(str(self.path), queue))

    def remote_socket(self, worker: int) -> Path:
        """The Unix socket on which remote worker number `worker` takes attempts."""
        return self.var / f"remote.{worker}.sock"

    def var_file(self, name: str) -> Path:
        """A file under var/ named by one of this module's names."""
        return self.var / name

    def status_file(self, queue: str) -> Path:
        return self.path.__class__(status_path(str(self.path), queue))

    def throttle_state(self, worker: int) -> Path:
        return self.path.__class__(throttle_state_path(str(self.path), worker))

    def service_pid(self, service: str) -> Path:
        return self.path.__class__(service_pid_path(str(self.path), service))


def root_path_from_env(environ: os._Environ[str] | dict[str, str] | None = None) -> str:
    """The install root named by `HVMAIL_ROOT` (or the default), as a string."""
    env = os.environ if environ is None else environ
    return os.path.abspath(env.get("HVMAIL_ROOT") or DEFAULT_ROOT)


def queue_dir(root: str, name: str) -> str:
    """The folder of queue `name` under install root `root` (a string: no pathlib)."""
    if name not in QUEUES:
        raise ValueError(f"unknown queue {name!r}: expected one of {', '.join(QUEUES)}")
    return os.path.join(root, "queue", name)


def trigger_path(root: str, queue: str) -> str:
    """The FIFO that wakes `queue-send <queue>`."""
    return os.path.join(root, "var", f"trigger.{queue}")


def control_dir(root: str) -> str:
    return os.path.join(root, "control")


def var_path(root: str, name: str) -> str:
    """The file `name` (one of the names above, or a function's below) under var/."""
    return os.path.join(root, "var", name)


def count_path(root: str, queue: str) -> str:
    """Where `queue-send <queue>` publishes how many entries it holds."""
    return os.path.join(root, "var", f"queue.{queue}.count")


def status_path(root: str, queue: str) -> str:
    """Where `queue-send <queue>` publishes its status (JSON) for `greenarrow queue status`."""
    return os.path.join(root, "var", f"queue.{queue}.status")


def throttle_state_path(root: str, worker: int) -> str:
    """Where remote worker `worker` publishes the state of its throttle keys."""
    return os.path.join(root, "var", f"throttle.{worker}.json")


def service_pid_path(root: str, service: str) -> str:
    """The pid file the supervisor keeps for one service."""
    return os.path.join(root, "var", f"{service}.pid")


def root_from_env(environ: os._Environ[str] | dict[str, str] | None = None) -> Root:
    """The install root named by `HVMAIL_ROOT`, or the default `/var/hvmail`."""
    return Root(root_path_from_env(environ))
