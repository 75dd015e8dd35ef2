"""Process and port helpers that read /proc instead of shelling out.

The harness must know when a server is listening without connecting to it
(a probe connection would show up in the sink's session counters), and must
measure the memory of a whole process tree (the engine's supervisor and its
services; Postfix's master and its children) while it works, many times a
second, without forking `ps`.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_listening(port: int, host: str = "127.0.0.1") -> bool:
    """True when a socket listens on host:port (or on 0.0.0.0:port), from /proc/net/tcp."""
    wanted = {
        f"{socket.inet_aton(host)[::-1].hex().upper()}:{port:04X}",
        f"00000000:{port:04X}",
    }
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                parts = line.split()
                if parts[3] == "0A" and parts[1] in wanted:
                    return True
    except OSError:
        return False
    return False


def wait_port(port: int, up: bool = True, timeout: float = 20.0) -> bool:
    """Wait (bounded) until the port is listening (`up`) or no longer listening."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_listening(port) == up:
            return True
        time.sleep(0.02)
    return False


def stat_fields(pid: int | str) -> list[bytes] | None:
    """The fields of /proc/PID/stat after the command name (state first), None when gone.

    The command name may hold spaces and parentheses: the split is after the last ')'.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2 :].split()


def pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (exited, not yet reaped).

    A zombie counts as gone: an orphan's exit is reaped by PID 1, which on
    some machines (this sandbox's init) takes seconds.
    """
    fields = stat_fields(pid)
    return fields is not None and fields[0] not in (b"Z", b"X")


def descendants(root_pid: int) -> list[int]:
    """`root_pid` and every live process below it, from the ppid field of /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = stat_fields(entry.name)
        if fields is None:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    out: list[int] = []
    todo = [root_pid]
    while todo:
        pid = todo.pop()
        if pid in out:
            continue
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return [p for p in out if os.path.exists(f"/proc/{p}")]


def rss_bytes(pids: list[int]) -> int:
    """Sum of the resident set sizes of `pids` (processes gone meanwhile count 0)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm", "rb") as f:
                total += int(f.read().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            continue
    return total


def pss_bytes(pids: list[int]) -> int:
    """Sum of the proportional set sizes of `pids` (/proc/PID/smaps_rollup).

    Unlike RSS, a page shared by k processes counts 1/k in each, so the sum
    is the memory the tree really holds; RSS sums overcount MTAs made of many
    small processes (Postfix) that share their libraries.
    """
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
                for line in f:
                    if line.startswith(b"Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except (OSError, IndexError, ValueError):
            continue
    return total


CLK_TCK = os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(root_pid: int | None) -> float:
    """CPU seconds (user + system) used so far by a process tree, dead members included.

    Sums utime + stime + cutime + cstime over the live tree: a member that
    exited was reaped by its parent (also in the tree), whose c-times then
    hold its whole lifetime. So the difference of two readings is the CPU the
    tree used in between, even as processes come and go (Postfix's smtpd and
    smtp processes do). 0 when the root is gone.
    """
    if not root_pid:
        return 0.0
    total = 0
    for pid in descendants(root_pid):
        fields = stat_fields(pid)
        if fields is not None:
            total += sum(int(x) for x in fields[11:15])
    return total / CLK_TCK


def loadavg1() -> float:
    """The 1-minute load average: other work on the box shows here."""
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


class RssSampler:
    """Samples the summed RSS (and PSS) of a process tree in a thread; `peak` is the
    largest RSS sum, `peak_pss` the largest PSS sum.

    The tree is re-walked at every sample, so services the supervisor
    (re)starts during the run are counted. `root` is a callable because the
    root pid may only be known once the server has started.
    """

    def __init__(self, root: Callable[[], int | None], interval: float = 0.1) -> None:
        self.root = root
        self.interval = interval
        self.peak = 0
        self.peak_pss = 0
        self.samples = 0
        self.max_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            pid = self.root()
            if pid:
                pids = descendants(pid)
                self.max_processes = max(self.max_processes, len(pids))
                self.peak = max(self.peak, rss_bytes(pids))
                self.peak_pss = max(self.peak_pss, pss_bytes(pids))
                self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
