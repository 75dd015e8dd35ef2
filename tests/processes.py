"""Processes the tests start, and the sockets they hold, as /proc shows them."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path


def stop(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM a process this test started, wait up to `grace` s, then SIGKILL it."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def listening_inodes(port: int | None = None) -> set[str]:
    """The inodes of TCP sockets in LISTEN: on 127.0.0.1:port, or any address (also IPv6)
    when `port` is None."""
    wanted = None if port is None else f"0100007F:{port:04X}"
    tables = ("/proc/net/tcp",) if port is not None else ("/proc/net/tcp", "/proc/net/tcp6")
    inodes = set()
    for table in tables:
        for line in Path(table).read_text().splitlines()[1:]:
            parts = line.split()
            if parts[3] == "0A" and (wanted is None or parts[1] == wanted):
                inodes.add(parts[9])
    return inodes


def socket_inodes(pid: int) -> set[str]:
    """The inodes of the sockets process `pid` holds open."""
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(target[len("socket:["):-1])
    return found
