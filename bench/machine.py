"""What machine a result comes from: figures mean nothing without it.

Cores, CPU model (from /proc/cpuinfo), kernel, OS, memory, the filesystem
under the work folder, the load average (other work on the box skews every
figure, so it is recorded at the start and the end), and the versions of
what was measured.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

from bench.injectors import REPO


def _first(path: str, key: str) -> str:
    try:
        with open(path) as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() == key:
                    return value.strip()
    except OSError:
        pass
    return "?"


def os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                name = line.split("=", 1)[1].strip('"')
                debian = Path("/etc/debian_version")
                if debian.exists():
                    name += f" ({debian.read_text().strip()})"
                return name
    except OSError:
        pass
    return platform.platform()


def filesystem(path: Path) -> str:
    """Device and type of the mount holding `path` (longest matching mount point)."""
    best = ("", "?", "?")
    target = str(path.resolve())
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, fstype = line.split()[:3]
            inside = target == mnt or target.startswith(mnt.rstrip("/") + "/")
            if inside and len(mnt) >= len(best[0]):
                best = (mnt, dev, fstype)
    except OSError:
        pass
    return f"{best[1]} {best[2]} (mounted on {best[0]})"


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def engine_version() -> str:
    """The commit of the checkout measured, and whether engine files differ from it.

    Read-only git commands only (GIT_OPTIONAL_LOCKS=0: not even an index refresh).
    """
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=10, env=env,
        ).stdout.strip()
        diff = subprocess.run(
            ["git", "-C", str(REPO), "diff", "--quiet", "HEAD", "--", "greenarrow", "pyx"],
            capture_output=True, timeout=10, env=env,
        ).returncode
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    if not head:
        return "?"
    return f"{head}{' + uncommitted engine changes' if diff == 1 else ''}"


def describe(work: Path) -> dict[str, str]:
    """The machine facts recorded with every result file."""
    mem_kb = _first("/proc/meminfo", "MemTotal").split()[0]
    return {
        "cores": str(os.cpu_count()),
        "cpu": _first("/proc/cpuinfo", "model name"),
        "kernel": f"{platform.system()} {platform.release()} {platform.version()} {platform.machine()}",
        "os": os_name(),
        "python": sys.version.split()[0],
        "memory": f"{int(mem_kb) / 2**20:.1f} GiB" if mem_kb.isdigit() else "?",
        "work filesystem": filesystem(work),
        "load average at start": loadavg(),
        "engine at start": engine_version(),
    }
