"""`greenarrow_config`: check and reload the configuration, manage the secret constants."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import click

from greenarrow.lib.config import conf
from greenarrow.lib.config import secret_constants as constants
from greenarrow.lib.core.paths import root_from_env
from greenarrow.lib.ops import supervisor
from greenarrow.lib.ops.config_check import ConfigProblem, check_root


@click.group()
def main() -> None:
    """Check and manage the GreenArrow configuration ($HVMAIL_ROOT/control)."""


@main.command()
@click.option(
    "--file",
    "path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Check this file instead of $HVMAIL_ROOT/control/greenarrow.conf.",
)
def check(path: Path | None) -> None:
    """Validate greenarrow.conf; print `file:line: problem` and exit 1 if it is wrong.

    The install root's file may be missing (an empty configuration); a file
    named with --file must exist.
    """
    label = str(path) if path is not None else conf.CONF_NAME
    root = root_from_env()
    if path is None and not conf.conf_path(root).exists():
        click.echo(f"{label}: OK (no file at {conf.conf_path(root)}: empty configuration)")
        return
    try:
        check_root(root, path)
    except ConfigProblem as exc:
        click.echo(str(exc), err=True)
        raise SystemExit(1) from None
    click.echo(f"{label}: OK")


@main.command()
def reload() -> None:
    """Check greenarrow.conf, then make the running services take it (and the control
    files) without a restart. A file with errors is rejected and changes nothing."""
    root = root_from_env()
    try:
        check_root(root)
    except ConfigProblem as exc:
        click.echo(f"{exc}\nnot reloaded: the running services keep their configuration", err=True)
        raise SystemExit(1) from None
    pid = supervisor.supervisor_pid(root)
    if pid is None:
        click.echo("greenarrow.conf: OK; the engine is not running, nothing to reload")
        return
    os.kill(pid, signal.SIGHUP)
    click.echo("greenarrow.conf: OK; reload signalled to every service")


WARNING = """\
WARNING: new secret constants invalidate every click, open and unsubscribe
link and every bounce address already sent from this server, and every
server of a fleet must hold the same constants.
"""


@main.command("secret_constants")
@click.option("--view", is_flag=True, help="Print the two constants.")
@click.option("--constant1", help="Set constant 1 (32 hexadecimal digits); needs --constant2.")
@click.option("--constant2", help="Set constant 2 (32 hexadecimal digits); needs --constant1.")
@click.option("--make-new-random", is_flag=True, help="Replace both with new random values.")
@click.option("--no-delay", is_flag=True, hidden=True, help="Skip the 5 s pause (tests).")
def secret_constants(view: bool, constant1: str | None, constant2: str | None,
                     make_new_random: bool, no_delay: bool) -> None:
    """View, set or regenerate the secret constants that sign links and bounce addresses."""
    control_dir = root_from_env().control
    try:
        if constant1 is not None or constant2 is not None:
            if constant1 is None or constant2 is None:
                raise click.UsageError("--constant1 and --constant2 go together")
            constants.write(control_dir, constant1, constant2)
            click.echo("secret constants set")
        elif make_new_random:
            old = constants.read(control_dir) if constants.path(control_dir).exists() else ("", "")
            click.echo(WARNING)
            if not no_delay:
                time.sleep(5)
            answer = click.prompt("Type YES to continue", default="", show_default=False)
            if answer != "YES":
                click.echo("nothing changed")
                sys.exit(1)
            new = constants.random_pair()
            constants.write(control_dir, *new)
            click.echo(f"Old constant 1: {old[0]}\nOld constant 2: {old[1]}")
            click.echo(f"New constant 1: {new[0]}\nNew constant 2: {new[1]}")
        elif view:
            c1, c2 = constants.read(control_dir)
            click.echo(f"Constant 1: {c1}\nConstant 2: {c2}")
        else:
            raise click.UsageError("give --view, --constant1/--constant2 or --make-new-random")
    except constants.SecretConstantsError as exc:
        click.echo(str(exc), err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
