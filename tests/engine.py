"""A whole engine in a temporary install root, run the way an operator runs it.

`Engine` creates the root with `greenarrow init`'s code, writes the control
files a test needs (loopback ports, fast timeouts), starts the real services
with `hvmail_init start` as a subprocess and stops them with `hvmail_init
stop`, checking that no process is left behind. Tests inject through the
real `bin/sendmail` script and over SMTP, and read the delivery log.

As root (here and in CI) the services run as the engine's users
(greenarrow.lib.core.users), which may not pass pytest's 0700 folders: the
install root is then made in a folder of its own under /tmp that they may
reach (`reachable_tmp`), removed when the tests end.
"""

from __future__ import annotations

import atexit
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from greenarrow.lib.config import control
from greenarrow.lib.core import delivery_log, users
from greenarrow.lib.core.paths import Root
from greenarrow.lib.ops import supervisor
from greenarrow.lib.ops.install_root import init_root


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def reachable_tmp(tmp_path: Path, name: str = "reachable") -> Path:
    """`tmp_path / name`, a folder for an install root; as root, a symlink to a
    folder under /tmp that the engine's users may reach (removed at exit)."""
    link = tmp_path / name
    if not users.separated():
        link.mkdir(exist_ok=True)
        return link
    if link.is_symlink():  # asked again for the same test
        return link.resolve()
    outer = Path(tempfile.mkdtemp(prefix="ga-test-"))
    outer.chmod(0o755)
    atexit.register(shutil.rmtree, outer, True)
    link.symlink_to(outer)
    return outer


def wait_until(predicate: Callable[[], object], timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")


# The user a root test run starts its own throwaway PostgreSQL as (the engine
# drops privileges itself). It keeps CAP_DAC_READ_SEARCH (read and search, no
# write) so it can reach pytest's temporary folders, root's own (mode 0700).
UNPRIVILEGED = "nobody"


def as_unprivileged(command: list[str]) -> list[str]:
    """`command` run as UNPRIVILEGED with CAP_DAC_READ_SEARCH (util-linux setpriv)."""
    return ["setpriv", f"--reuid={UNPRIVILEGED}", f"--regid={_group(UNPRIVILEGED)}",
            "--clear-groups", "--inh-caps=+dac_read_search",
            "--ambient-caps=+dac_read_search", "--", *command]


def _group(user: str) -> int:
    return pwd.getpwnam(user).pw_gid


def chown_tree(path: Path, user: str) -> None:
    entry = pwd.getpwnam(user)
    for folder, dirs, files in os.walk(path):
        for name in [folder, *(os.path.join(folder, n) for n in dirs + files)]:
            os.lchown(name, entry.pw_uid, entry.pw_gid)


class Engine:
    """One install root under `tmp_path` and its services."""

    def __init__(self, tmp_path: Path, conf: str = "", workers: int = 1,
                 controls: dict[str, object] | None = None, database: str = "none") -> None:
        """`database`: `none` (no database service, the default: most tests need none),
        `bundled` (the install root's own PostgreSQL) or a postgresql:// URL."""
        self.root = Root(reachable_tmp(tmp_path, "engine") / "hvmail")
        init_root(self.root, me="engine.test")
        self.smtp_port = free_port()
        self.env = dict(os.environ, HVMAIL_ROOT=str(self.root.path))
        settings: dict[str, object] = {
            "smtp.listen": [f"127.0.0.1:{self.smtp_port}"],
            "remote.workers": workers,
            "timeoutconnect": 5,
            "timeoutremote": 10,
            "queue.rescan.seconds": 2,
            # No test may ask a real DNS server: nothing answers on this port.
            "dns.servers": ["127.0.0.1:9"],
        }
        settings.update(controls or {})
        for name, value in settings.items():
            control.write(self.root.control, name, value)
        if database != "bundled":
            conf += f"\ngeneral {{\n  events_database_url {json.dumps(database)}\n}}\n"
        (self.root.control / "greenarrow.conf").write_text(conf)
        self.started = False
        # Put before every command the test runs for this engine, e.g.
        # ["nsenter", "--net=/run/netns/NS"]: an engine in a network namespace.
        self.command_prefix: list[str] = []

    # -- programs ----------------------------------------------------------

    def program(self, name: str, *args: str, input: bytes | None = None,
                env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([*self.command_prefix, sys.executable, "-m",
                               f"greenarrow.bin.{name}", *args],
                              input=input, capture_output=True, env=env or self.env,
                              timeout=timeout)

    def start(self) -> None:
        result = self.program("hvmail_init", "start")
        assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
        self.started = True

    def stop(self) -> None:
        """Stop the services and prove that none of their processes is left."""
        if not self.started:
            return
        pids = self.all_pids()
        result = self.program("hvmail_init", "stop")
        self.started = False
        assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
        wait_until(lambda: not any(supervisor.pid_alive(p) for p in pids), 10,
                   "every service process to exit")

    def all_pids(self) -> list[int]:
        pids = list(supervisor.service_pids(self.root).values())
        sup = supervisor.supervisor_pid(self.root)
        return pids + ([sup] if sup else [])

    def service_pid(self, name: str) -> int:
        return supervisor.service_pids(self.root)[name]

    def kill_service(self, name: str) -> int:
        """kill -9 a service; return its pid (the supervisor restarts it)."""
        pid = self.service_pid(name)
        os.kill(pid, signal.SIGKILL)
        return pid

    def sendmail(self, *args: str, message: bytes, env: dict[str, str] | None = None
                 ) -> subprocess.CompletedProcess:
        return subprocess.run([*self.command_prefix, str(self.root.bin / "sendmail"), *args],
                              input=message,
                              capture_output=True, env={**self.env, **(env or {})}, timeout=60)

    # -- what happened -----------------------------------------------------

    def records(self, queue: str = "ram") -> list[dict]:
        return list(delivery_log.iter_records(self.root.delivery_log(queue)))

    def queued(self, queue: str = "ram") -> list[str]:
        """The entry names of a queue."""
        return os.listdir(self.root.queue(queue) / "entries")

    def __enter__(self) -> Engine:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def route_conf(routes: dict[str, int], host: str = "127.0.0.1") -> str:
    """greenarrow.conf text routing each domain pattern to host:port."""
    blocks = "".join(f"  domain {pattern} {{\n    smtp_route {host}:{port}\n  }}\n"
                     for pattern, port in routes.items())
    return f"ip_address * {{\n{blocks}}}\n"
