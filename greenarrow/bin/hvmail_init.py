"""`hvmail_init start|stop|restart|status|run`: start and stop the engine's services.

Thin: the work is in greenarrow.lib.ops.engine_control and .supervisor.
"""

from __future__ import annotations

import asyncio
import os
import sys

import click

from greenarrow.lib.core import service, users
from greenarrow.lib.core.paths import Root, root_from_env
from greenarrow.lib.ops import engine_control, ramdisk, supervisor


def _root() -> Root:
    return root_from_env()


def _prepare(root: Root) -> None:
    try:
        engine_control.prepare(root)
    except engine_control.StartError as e:
        for line in str(e).splitlines():
            click.echo(f"hvmail_init: {line}", err=True)
        sys.exit(1)


def print_status(root: Root) -> bool:
    """Print each service up or down; True when the supervisor and every service are up."""
    lines, all_up = engine_control.status_lines(root)
    for line in lines:
        click.echo(line)
    return all_up


def stop_root(root: Root, timeout: float = 90.0) -> bool:
    """Stop the engine, saying so; False when a process did not stop."""
    leftovers = engine_control.stop(root, click.echo, timeout)
    if leftovers:
        for name, p in sorted(leftovers.items()):
            click.echo(f"did not stop: {name} (pid {p})", err=True)
        return False
    click.echo("stopped")
    return True


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Start, stop and inspect the services of the install root named by HVMAIL_ROOT
    (default /var/hvmail): the bundled PostgreSQL, the remote delivery workers, queue-send,
    injectd and smtpd."""


@main.command()
@click.option("--wait", "wait_seconds", default=15.0, show_default=True,
              help="Seconds to wait for every service to come up.")
def start(wait_seconds: float) -> None:
    """Start the supervisor and every service (creating the install root if needed)."""
    root = _root()
    _prepare(root)
    if supervisor.supervisor_pid(root):
        click.echo("already running")
        print_status(root)
        return
    for line in ramdisk.setup(root):
        click.echo(line)
    engine_control.launch(root)
    engine_control.wait_ready(root, wait_seconds)
    if not print_status(root):
        click.echo("some services did not start: see log/<service>/current", err=True)
        sys.exit(1)


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
    _prepare(root)
    for line in ramdisk.setup(root):
        print(line, flush=True)
    if users.separated():
        os.umask(0o027)  # its own files (service logs, pid files) are root's alone
    service.setup("supervise")
    asyncio.run(supervisor.Supervisor(root).run())


if __name__ == "__main__":
    main()
