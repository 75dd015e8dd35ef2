"""`greenarrow`: the engine's command group (init, inject, sink, demo, ...)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from greenarrow.bin.bounce import bounce_command
from greenarrow.bin.queue import queue_command
from greenarrow.bin.sink import sink_command
from greenarrow.lib.core.paths import root_from_env
from greenarrow.lib.core.users import UsersError
from greenarrow.lib.ops.install_root import init_root


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """A GreenArrow-compatible email delivery engine.

    Every command works on the install root named by HVMAIL_ROOT (default /var/hvmail).
    """


@main.command("init")
@click.option("--me", help="This server's name, written to control/me if it has none.")
def init_command(me: str | None) -> None:
    """Create the install root: folders, default control files, bin/sendmail.

    Idempotent: it never overwrites a file that already exists. Run as root it
    also creates the engine's users and group (gaqueue, gasmtpd, garemote;
    greenarrow) and gives the root their owners and modes, for services that
    run unprivileged (docs/operations.md section 4b).
    """
    root = root_from_env()
    try:
        created = init_root(root, me)
    except UsersError as e:
        raise click.ClickException(str(e)) from None
    for path in created:
        click.echo(f"created {path}")
    click.echo(f"install root {root.path} is ready")


@main.command("inject", context_settings={"ignore_unknown_options": True,
                                          "allow_interspersed_args": False})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def inject_command(args: tuple[str, ...]) -> None:
    """Inject a message from stdin, with sendmail's arguments
    (-f SENDER, -t, -i, -F NAME, recipients). Exit 0, 100 or 111 as qmail-inject."""
    from greenarrow.bin.inject import run

    sys.exit(run(list(args), "greenarrow inject"))


@main.command("demo")
@click.option("--root", "root_path", default="demo-root", show_default=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Install root to create or reuse (HVMAIL_ROOT is ignored here).")
@click.option("--messages", default=300, show_default=True,
              help="Messages to send: half with sendmail, half over SMTP.")
def demo_command(root_path: Path, messages: int) -> None:
    """Run the engine end to end on loopback: start it, inject mail from the command
    line and over SMTP to the built-in sink, report, stop."""
    from greenarrow.lib.devtools.demo import run_demo

    ok = run_demo(root_path, messages, say=click.echo)
    click.echo("demo: OK" if ok else "demo: FAILED")
    sys.exit(0 if ok else 1)


@main.group("tracker")
def tracker_command() -> None:
    """The click, open and unsubscribe tracker (docs/tracker.md)."""


@tracker_command.command("refresh-mpp-ranges")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def refresh_mpp_ranges(file: Path) -> None:
    """Install FILE, Apple's iCloud Private Relay egress ranges (the CSV from
    https://mask-api.icloud.com/egress-ip-ranges.csv, or one CIDR a line), as the
    addresses whose opens are flagged is_privacy_open. The running tracker takes
    them on `greenarrow_config reload`."""
    from greenarrow.lib.tracker import privacy_open

    root = root_from_env()
    try:
        count, target = privacy_open.install(root.var, file)
    except privacy_open.RangesError as e:
        click.echo(f"{e}\nnothing installed: the tracker keeps its ranges", err=True)
        sys.exit(1)
    click.echo(f"installed {count} ranges in {target}; run `greenarrow_config reload` "
               "to use them in the running tracker")


@main.group("events")
def events_group() -> None:
    """The events queue: delivery destinations and the event recorder."""


@events_group.command("status")
def events_status_command() -> None:
    """Per destination: events waiting for their first attempt, events in retry,
    the age of the oldest and the last error; then the recorder's progress."""
    import psycopg

    from greenarrow.lib.events import schema
    from greenarrow.lib.events.database import conninfo
    from greenarrow.lib.events.status import format_status, read_status

    root = root_from_env()
    info = conninfo(root)
    if info is None:
        click.echo("greenarrow events status: no events database configured", err=True)
        sys.exit(1)
    try:
        with psycopg.connect(info, connect_timeout=10) as conn:
            schema.migrate(conn)
            status = read_status(conn, root)
    except psycopg.OperationalError as exc:
        click.echo(f"greenarrow events status: cannot reach the events database: "
                   f"{str(exc).strip()}", err=True)
        sys.exit(111)
    click.echo(format_status(status), nl=False)


main.add_command(sink_command)
main.add_command(queue_command)
main.add_command(bounce_command)


if __name__ == "__main__":
    main()
