"""Starting, stopping and inspecting one install root's engine (what `hvmail_init` does).

`hvmail_init start` runs `hvmail_init run` (the supervisor) in the background
and waits until `ready()`; `status_lines()` says what runs; `stop()` sends
the supervisor SIGTERM and waits for every service to go. Lines are returned,
not printed, so the program decides where they go.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable

from greenarrow.lib.config import control
from greenarrow.lib.core import users
from greenarrow.lib.core.paths import Root
from greenarrow.lib.ops import ramdisk, supervisor
from greenarrow.lib.ops.install_root import init_root, privilege_problems

POSTGRES_SERVICE = "postgres"  # its name in init/services


class StartError(Exception):
    """The engine cannot be started; the message says why and what to do."""


def prepare(root: Root) -> None:
    """Create or complete the root; StartError when, started as root, the engine's users
    could not run the services (a folder on the way to Python or the root that they may
    not pass)."""
    try:
        init_root(root)
        problems = privilege_problems(root)
    except users.UsersError as e:
        raise StartError(str(e)) from None
    if problems:
        problems.append(f"the services run as {', '.join(users.USERS)} (group {users.GROUP}) "
                        "when started as root; let them pass (chmod o+x FOLDER) or install "
                        "the engine and its root elsewhere")
        raise StartError("\n".join(problems))


def format_uptime(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def status_lines(root: Root) -> tuple[list[str], bool]:
    """What runs, a line per service; and whether the supervisor and every service are up."""
    pid = supervisor.supervisor_pid(root)
    status = supervisor.read_status(root)
    lines = [f"install root {root.path}"]
    if pid is None:
        return [*lines, "supervise: down"], False
    lines.append(f"supervise: up (pid {pid})")
    all_up = True
    now = time.time()
    for s in status["services"]:
        if supervisor.pid_alive(s["pid"]):
            uptime = format_uptime(now - (s["started"] or now))
            lines.append(f"{s['name']}: up (pid {s['pid']}) {uptime}, {s['restarts']} restarts")
        else:
            all_up = False
            lines.append(f"{s['name']}: down, {s['restarts']} restarts")
    lines.append(describe_database(root, status["services"]))
    lines.extend(ramdisk.describe(root, queue) for queue in ramdisk.RAM_QUEUES)
    return lines, all_up


def describe_database(root: Root, services: list[dict]) -> str:
    from greenarrow.lib.config import conf
    from greenarrow.lib.events import database, postgres

    try:
        db = database.configured(root)
    except conf.ConfError as exc:
        return f"database: {exc}"
    if db.kind != database.BUNDLED:
        return f"database: {db.describe()}"
    if not any(s["name"] == POSTGRES_SERVICE for s in services):
        return "database: bundled PostgreSQL, not started"
    state = "accepting connections" if postgres.ready(root) else "not accepting connections"
    return f"database: {db.describe()}, {state}"


def _private(path: str, flags: int) -> int:
    return os.open(path, flags, 0o640)  # the supervisor's log: not for every local user


def launch(root: Root) -> None:
    """Start `hvmail_init run` (the supervisor) in the background, its output in
    log/supervise/current."""
    (root.var / supervisor.STATUS_FILE).unlink(missing_ok=True)
    logdir = root.service_log("supervise")
    logdir.mkdir(parents=True, exist_ok=True)
    with open(logdir / "current", "ab", opener=_private) as out:
        subprocess.Popen(
            [sys.executable, "-P", "-m", "greenarrow.bin.hvmail_init", "run"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
            env=dict(os.environ, HVMAIL_ROOT=str(root.path)),
        )


def ready(root: Root) -> bool:
    """Every service runs, every worker socket and SMTP listener answers, and the
    bundled database (when it is a service) accepts connections."""
    services = supervisor.read_status(root)["services"]
    return bool(services) and all(supervisor.pid_alive(s["pid"]) for s in services) \
        and listeners_ready(root) and database_ready(root, services)


def wait_ready(root: Root, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not ready(root):
        time.sleep(0.05)


def database_ready(root: Root, services: list[dict]) -> bool:
    """The bundled PostgreSQL, when it is one of the services, accepts connections."""
    from greenarrow.lib.events import postgres

    if not any(s["name"] == POSTGRES_SERVICE for s in services):
        return True
    return postgres.ready(root)


def listeners_ready(root: Root) -> bool:
    """Every remote worker socket and SMTP listener answers (services take a moment to bind)."""
    workers = control.read_int(root.control, "remote.workers")
    if not all(root.remote_socket(n).exists() for n in range(workers)):
        return False
    for host, port in control.read(root.control, "smtp.listen"):
        target = "127.0.0.1" if host == "0.0.0.0" else ("::1" if host == "::" else host)
        try:
            with socket.create_connection((target, port), timeout=1):
                pass
        except OSError:
            return False
    return True


def stop(root: Root, say: Callable[[str], None], timeout: float = 90.0) -> dict[str, int]:
    """SIGTERM the supervisor and wait; the processes that did not stop (name -> pid)."""
    pid = supervisor.supervisor_pid(root)
    if pid is None:
        say("not running")
    else:
        say(f"stopping (supervise pid {pid}) ...")
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while supervisor.pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    leftovers = {n: p for n, p in supervisor.service_pids(root).items()
                 if supervisor.pid_alive(p)}
    if pid is not None and supervisor.pid_alive(pid):
        leftovers["supervise"] = pid
    return leftovers
