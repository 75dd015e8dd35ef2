"""The supervisor that `hvmail_init` starts: runs every service and keeps it running.

One process per install root (its pid in `var/supervise.pid`). It starts the
services listed in `init/services`, captures each one's output into
`log/<service>/current` (rotated by size), restarts a service that exits
with a back-off, forwards SIGHUP (reload) to every service, and on SIGTERM
stops them in the reverse order of their start: injection first, so nothing
new arrives while the schedulers finish what is under way.

Its state, for `hvmail_init status`, is `var/supervise.status` (JSON,
rewritten on every change).

Started as root, it stays root (it mounts the ram disks and must start
services as other users) and runs each service as its user of
greenarrow.lib.core.users, in the engine group only, with umask 027; it
binds `smtp.listen` and `tracker.listen` itself and passes the sockets to `smtpd` and the tracker
(greenarrow.lib.core.listen_sockets), so that nothing listens as root.
Started as any other user, every service runs as that user.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field

from greenarrow.lib.config import control
from greenarrow.lib.core import listen_sockets, users
from greenarrow.lib.core.paths import SUPERVISE_PID, SUPERVISE_STATUS, Root
from greenarrow.lib.core.rotating_log import RotatingLog
from greenarrow.lib.ops.install_root import data_dir

log = logging.getLogger("supervise")

STATUS_FILE = SUPERVISE_STATUS
PID_FILE = SUPERVISE_PID
MIN_BACKOFF, MAX_BACKOFF, STABLE_SECONDS = 1.0, 60.0, 10.0  # a run of 10 s resets the back-off
STOP_GRACE = 30.0


@dataclass
class Service:
    """One line of `init/services`, expanded."""

    name: str
    program: str
    args: list[str]
    stop_signal: int = signal.SIGTERM
    pid: int | None = None
    started: float | None = None
    restarts: int = 0
    backoff: float = MIN_BACKOFF
    process: asyncio.subprocess.Process | None = field(default=None, repr=False)

    def command(self) -> list[str]:
        # -P: never import the greenarrow of the current folder (a source checkout
        # without its compiled modules) instead of the installed one.
        return [sys.executable, "-P", "-m", f"greenarrow.bin.{self.program}", *self.args]


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the supervisor dies, even by kill -9, so no
    service runs on unsupervised (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def _conditions(root: Root) -> dict[str, bool]:
    """The conditions an `init/services` line may name in `[if NAME]`: a service with
    nothing to do is not started (its polling would cost every message CPU)."""
    from greenarrow.lib.config import conf
    from greenarrow.lib.events import database
    from greenarrow.lib.routing import incoming

    try:
        loaded = conf.load_root(root)
        db = database.configured(root, loaded)
        destinations = bool(loaded.blocks_named("event_delivery_destination"))
        unsubscribe = any(b.kind == incoming.UNSUBSCRIBE
                          for b in incoming.mailboxes(str(root.path), loaded))
    except conf.ConfError as exc:
        # The services report the mistake themselves; start them as by default.
        log.error("%s", exc)
        return dict.fromkeys(("bundled_database", "database", "event_destinations",
                              "tracker", "unsubscribe_mailbox"), True)
    tracker = bool(control.read(root.control, "tracker.listen")
                   or control.read(root.control, "tracker.tls.listen"))
    return {"bundled_database": db.kind == database.BUNDLED,
            "database": db.kind != database.NONE,
            "event_destinations": destinations and db.kind != database.NONE,
            "tracker": tracker,
            "unsubscribe_mailbox": unsubscribe}


def _options(text: str, where: str, conditions: dict[str, bool]
             ) -> tuple[bool, int]:
    """`if CONDITION, stop SIGNAL` -> (whether the line applies, its stop signal)."""
    applies, stop_signal = True, signal.SIGTERM
    for option in filter(None, (o.strip() for o in text.split(","))):
        key, _, value = option.partition(" ")
        value = value.strip()
        if key == "if" and value in conditions:
            applies = applies and conditions[value]
        elif key == "stop" and value in signal.Signals.__members__:
            stop_signal = signal.Signals[value]
        else:
            raise ValueError(f"{where}: bad option {option!r}: expected 'if "
                             f"{'|'.join(conditions)}' or 'stop SIGNAL'")
    return applies, stop_signal


def tracker_processes(root: Root) -> int:
    """`control/tracker.processes`, 0 (the default) meaning one per CPU."""
    wanted = control.read_int(root.control, "tracker.processes")
    if wanted < 0:
        raise ValueError(f"{root.control / 'tracker.processes'}: must be 0 (one per CPU) or more")
    return wanted or os.cpu_count() or 1


def read_services(root: Root) -> list[Service]:
    """The services of `init/services`: `name program [args] [[options]]`; `{worker}`
    lines are repeated for each remote worker (`control/remote.workers`), `{process}`
    lines for each tracker process (`tracker_processes`); options in brackets:
    `if CONDITION` (start the line only then: `bundled_database`,
    `database`, `event_destinations`, `tracker`), `stop SIGINT` (the signal that
    stops it instead of SIGTERM)."""
    repeats = {"{worker}": control.read_int(root.control, "remote.workers"),
               "{process}": tracker_processes(root)}
    services = []
    conditions: dict[str, bool] | None = None
    text = (data_dir("init") / "services").read_text()
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        line, bracket, options = line.partition("[")
        applies, stop_signal = True, signal.SIGTERM
        if bracket:
            if not options.endswith("]"):
                raise ValueError(f"init/services:{number}: missing ']'")
            conditions = _conditions(root) if conditions is None else conditions
            applies, stop_signal = _options(options[:-1], f"init/services:{number}",
                                            conditions)
        words = line.split()
        if len(words) < 2:
            raise ValueError(f"init/services:{number}: expected 'name program [args]'")
        if not applies:
            continue
        marks = [mark for mark in repeats if mark in line]
        if len(marks) > 1:
            raise ValueError(f"init/services:{number}: both {' and '.join(marks)}")
        if not marks:
            services.append(Service(words[0], words[1], words[2:], stop_signal))
            continue
        for copy in range(repeats[marks[0]]):
            expand = [w.replace(marks[0], str(copy)) for w in words]
            services.append(Service(expand[0], expand[1], expand[2:], stop_signal))
    return services


class Supervisor:
    def __init__(self, root: Root) -> None:
        self.root = root
        self.services = read_services(root)
        self.stopping = False
        c = root.control
        self.log_max = control.read_int(c, "log.service.maxbytes")
        self.log_keep = control.read_int(c, "log.service.keep")
        self.accounts = users.service_accounts() if users.separated() else {}
        # control file -> its sockets, bound once, kept across the service's restarts
        self.listen: dict[str, list[socket.socket]] = {}

    def spawn_options(self, service: Service) -> dict:
        """create_subprocess_exec's arguments that set who a service runs as.

        Root-started: its user, the engine group alone, its umask, HOME and
        USER of that user; smtpd and the tracker get the sockets of their
        listen files (bound here, as root) instead of binding. OSError when a
        socket cannot be bound, ControlError for a bad listen file.
        """
        env = dict(os.environ, HVMAIL_ROOT=str(self.root.path), PYTHONUNBUFFERED="1")
        if not self.accounts:
            return {"env": env}
        acct = self.accounts[users.user_for(service.program)]
        env.update(HOME="/", USER=acct.name, LOGNAME=acct.name)
        options = {"user": acct.uid, "group": acct.gid, "extra_groups": [acct.gid],
                   "umask": users.umask_for(acct.name), "env": env}
        passed: list[socket.socket] = []
        for name, variable in listen_sockets.LISTEN_FILES.get(service.program, ()):
            if name not in self.listen:
                self.listen[name] = listen_sockets.bind(control.read(self.root.control, name))
            env[variable] = listen_sockets.env_value(self.listen[name])
            passed += self.listen[name]
        if passed:
            options["pass_fds"] = [s.fileno() for s in passed]
        return options

    def write_status(self) -> None:
        status = {
            "pid": os.getpid(),
            "services": [
                {"name": s.name, "pid": s.pid, "started": s.started, "restarts": s.restarts}
                for s in self.services
            ],
        }
        path = self.root.var / STATUS_FILE
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(status))
        os.replace(tmp, path)

    async def _run_one(self, service: Service) -> None:
        logdir = self.root.service_log(service.name)
        writer = RotatingLog(logdir, max_bytes=self.log_max, keep=self.log_keep)
        try:
            while not self.stopping:
                started = time.monotonic()
                try:
                    options = self.spawn_options(service)
                except (OSError, control.ControlError) as e:
                    reason = getattr(e, "strerror", None) or str(e)
                    log.error("%s: %s; trying again in %.0fs", service.name, reason,
                              service.backoff)
                    writer.write_bytes(f"supervise: {reason}; trying again in "
                                       f"{service.backoff:.0f}s\n".encode())
                    await asyncio.sleep(service.backoff)
                    service.backoff = min(service.backoff * 2, MAX_BACKOFF)
                    continue
                proc = await asyncio.create_subprocess_exec(
                    *service.command(),
                    preexec_fn=_die_with_parent,  # runs after the change of user
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True,
                    **options,
                )
                service.process, service.pid, service.started = proc, proc.pid, time.time()
                self.root.service_pid(service.name).write_text(f"{proc.pid}\n")
                self.write_status()
                assert proc.stdout is not None
                while True:
                    line = await proc.stdout.readline()
                    if not line:
                        break
                    writer.write_bytes(line if line.endswith(b"\n") else line + b"\n")
                code = await proc.wait()
                service.pid = None
                service.process = None
                self.write_status()
                if self.stopping:
                    break
                ran = time.monotonic() - started
                if ran > STABLE_SECONDS:
                    service.backoff = MIN_BACKOFF
                log.warning(
                    "%s exited with %s after %.1fs; restarting in %.0fs",
                    service.name,
                    code,
                    ran,
                    service.backoff,
                )
                writer.write_bytes(
                    f"supervise: exited with {code}; restarting in "
                    f"{service.backoff:.0f}s\n".encode()
                )
                service.restarts += 1
                await asyncio.sleep(service.backoff)
                service.backoff = min(service.backoff * 2, MAX_BACKOFF)
        finally:
            writer.close()

    def signal_all(self, sig: int) -> None:
        for service in self.services:
            if service.process is not None and service.process.returncode is None:
                try:
                    service.process.send_signal(sig)
                except ProcessLookupError:
                    pass

    async def stop(self) -> None:
        """Each service's stop signal (SIGTERM unless its line says otherwise) in reverse
        start order, each waited for; SIGKILL after the grace."""
        self.stopping = True
        for service in reversed(self.services):
            proc = service.process
            if proc is None or proc.returncode is not None:
                continue
            try:
                proc.send_signal(service.stop_signal)
            except ProcessLookupError:
                continue
            try:
                await asyncio.wait_for(proc.wait(), timeout=STOP_GRACE)
            except TimeoutError:
                log.error("%s did not stop in %.0fs; killing it", service.name, STOP_GRACE)
                proc.kill()
                await proc.wait()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self.signal_all(signal.SIGHUP))
        (self.root.var / PID_FILE).write_text(f"{os.getpid()}\n")
        tasks = [asyncio.create_task(self._run_one(s)) for s in self.services]
        await stop.wait()
        log.info("stopping")
        await self.stop()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for service in self.services:
            try:
                self.root.service_pid(service.name).unlink()
            except FileNotFoundError:
                pass
        for sockets in self.listen.values():
            for sock in sockets:
                sock.close()
        self.write_status()
        (self.root.var / PID_FILE).unlink(missing_ok=True)
        log.info("stopped")


# -- for hvmail_init (the client side) --------------------------------------


def pid_alive(pid: int | None) -> bool:
    """Whether `pid` runs; a zombie (exited, not yet reaped) does not."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != b"Z"


def supervisor_pid(root: Root) -> int | None:
    try:
        pid = int((root.var / PID_FILE).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    return pid if pid_alive(pid) else None


def read_status(root: Root) -> dict:
    try:
        return json.loads((root.var / STATUS_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return {"pid": None, "services": []}


def service_pids(root: Root) -> dict[str, int]:
    """Every `var/<service>.pid` left behind, for the check after a stop."""
    pids = {}
    for path in root.var.glob("*.pid"):
        if path.name == PID_FILE:
            continue
        try:
            pids[path.stem] = int(path.read_text().strip())
        except ValueError:
            continue
    return pids
