"""`greenarrow_config`: configuration commands for an install root.

A click group so that `reload` and `secret_constants` can be added as further
subcommands; the work itself lives in greenarrow.lib.
"""

from __future__ import annotations

from pathlib import Path

import click

from greenarrow.lib import conf
from greenarrow.lib.paths import root_from_env


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
    if path is None:
        path = conf.conf_path(root_from_env())
        if not path.exists():
            click.echo(f"{label}: OK (no file at {path}: empty configuration)")
            return
    try:
        conf.load(path)
    except conf.ConfError as exc:
        click.echo(str(exc), err=True)
        raise SystemExit(1) from None
    click.echo(f"{label}: OK")


if __name__ == "__main__":
    main()
