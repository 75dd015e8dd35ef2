"""`hvmail_init start|stop|restart|status|run`: start and stop the engine's services."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import click

from greenarrow.lib import ramdisk, service, supervisor
from greenarrow.lib.install_root import init_root
from greenarrow.lib.paths import Root, root_from_env


def _root() -> Root:
    return root_from_env()


def _format_uptime(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def print_status(root: Root) -> bool:
    """Print each service up or down; True when the supervisor and every service are up."""
    pid = supervisor.supervisor_pid(root)
    status = supervisor.read_status(root)
    click.echo(f"install root {root.path}")
    if pid is None:
        click.echo("supervise: down")
        return False
    click.echo(f"supervise: up (pid {pid})")
    all_up = True
    now = time.time()
    for s in status["services"]:
        if supervisor.pid_alive(s["pid"]):
            uptime = _format_uptime(now - (s["started"] or now))
            click.echo(f"{s['name']}: up (pid {s['pid']}) {uptime}, {s['restarts']} restarts")
        else:
            all_up = False
            click.echo(f"{s['name']}: down, {s['restarts']} restarts")
    for queue in ramdisk.RAM_QUEUES:
        click.echo(ramdisk.describe(root, queue))
    return all_up


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Start, stop and inspect the services of the install root named by HVMAIL_ROOT
    (default /var/hvmail): the remote delivery workers, queue-send and smtpd."""


@main.command()
@click.option("--wait", "wait_seconds", default=15.0, show_default=True,
              help="Seconds to wait for every service to come up.")
def start(wait_seconds: float) -> None:
    """Start the supervisor and every service (creating the install root if needed)."""
    root = _root()
    init_root(root)
    if supervisor.supervisor_pid(root):
        click.echo("already running")
        print_status(root)
        return
    for line in ramdisk.setup(root):
        click.echo(line)
    (root.var / supervisor.STATUS_FILE).unlink(missing_ok=True)
    logdir = root.service_log("supervise")
    logdir.mkdir(parents=True, exist_ok=True)
    with open(logdir / "current", "ab") as out:
        subprocess.Popen(
            [sys.executable, "-P", "-m", "greenarrow.bin.hvmail_init", "run"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
            env=dict(os.environ, HVMAIL_ROOT=str(root.path)),
        )
    deadline = time.monotonic() + wait_seconds
    while time.monotonic() < deadline:
        status = supervisor.read_status(root)
        names = status["services"]
        if names and all(supervisor.pid_alive(s["pid"]) for s in names) and \
                _listeners_ready(root):
            break
        time.sleep(0.05)
    if not print_status(root):
        click.echo("some services did not start: see log/<service>/current", err=True)
        sys.exit(1)


def _listeners_ready(root: Root) -> bool:
    """Every remote worker socket, the local agent's and each SMTP listener answers."""
    import socket

    from greenarrow.lib import control

    workers = int(control.read(root.control, "remote.workers"))
    if not all(root.remote_socket(n).exists() for n in range(workers)):
        return False
    if not root.local_socket().exists():
        return False
    for host, port in control.read(root.control, "smtp.listen"):
        target = "127.0.0.1" if host == "0.0.0.0" else ("::1" if host == "::" else host)
        try:
            with socket.create_connection((target, port), timeout=1):
                pass
        except OSError:
            return False
    return True


def stop_root(root: Root, timeout: float = 90.0) -> bool:
    """SIGTERM the supervisor, wait, and report any process that did not stop."""
    pid = supervisor.supervisor_pid(root)
    if pid is None:
        click.echo("not running")
        leftovers = {n: p for n, p in supervisor.service_pids(root).items() if supervisor.pid_alive(p)}
    else:
        click.echo(f"stopping (supervise pid {pid}) ...")
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while supervisor.pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        leftovers = {n: p for n, p in supervisor.service_pids(root).items() if supervisor.pid_alive(p)}
        if supervisor.pid_alive(pid):
            leftovers["supervise"] = pid
    if leftovers:
        for name, p in sorted(leftovers.items()):
            click.echo(f"did not stop: {name} (pid {p})", err=True)
        return False
    click.echo("stopped")
    return True


@main.command()
def stop() -> None:
    """Stop every service: injection first, then the schedulers, then the workers."""
    if not stop_root(_root()):
        sys.exit(1)


@main.command()
@click.pass_context
def restart(ctx: click.Context) -> None:
    """Stop, then start."""
    if not stop_root(_root()):
        sys.exit(1)
    ctx.invoke(start)


@main.command()
def status() -> None:
    """Show each service up or down, with pid and uptime."""
    if not print_status(_root()):
        sys.exit(1)


@main.command()
def run() -> None:
    """Run the supervisor in the foreground (what `start` runs in the background;
    systemd's unit runs this)."""
    root = _root()
    init_root(root)
    for line in ramdisk.setup(root):
        print(line, flush=True)
    service.setup("supervise")
    asyncio.run(supervisor.Supervisor(root).run())


if __name__ == "__main__":
    main()
