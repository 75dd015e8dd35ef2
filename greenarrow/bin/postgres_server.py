"""`postgres_server`: the bundled PostgreSQL of the install root (started by hvmail_init).

On the first start it makes the cluster (initdb); on every start it writes
the settings from greenarrow.conf, then becomes the `postgres` server by exec,
so the supervisor's signals reach PostgreSQL itself: SIGHUP reloads its
settings, and the stop signal of its `init/services` line is SIGINT,
PostgreSQL's fast shutdown (clients are disconnected, a checkpoint is
written: seconds, and the next start needs no recovery). SIGTERM, PostgreSQL's
smart shutdown, would wait for every open session, an operator's `psql` too.
See greenarrow.lib.events.postgres for the layout and settings.
"""

from __future__ import annotations

import os
import sys

import click

from greenarrow.lib.config import conf as conflib
from greenarrow.lib.core.paths import root_from_env
from greenarrow.lib.events import postgres


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--print-command", is_flag=True,
              help="Set up (initdb on the first run), print the postgres command line, exit.")
def main(print_command: bool) -> None:
    """Run the install root's bundled PostgreSQL in the foreground (data in
    postgres/default/data, socket in var/postgres, no TCP unless postgres_listen)."""
    if os.geteuid() == 0:
        click.echo("postgres_server: PostgreSQL does not run as root: start the engine "
                   "as an unprivileged user", err=True)
        sys.exit(1)
    root = root_from_env()
    try:
        conf = conflib.load_root(root)
        args = postgres.prepare(root, conf)
    except (conflib.ConfError, postgres.PostgresError) as exc:
        click.echo(f"postgres_server: {exc}", err=True)
        sys.exit(1)
    except OSError as exc:
        click.echo(f"postgres_server: cannot set up the database: {exc}", err=True)
        sys.exit(1)
    if print_command:
        click.echo(" ".join(args))
        return
    sys.stderr.flush()
    os.execv(args[0], args)


if __name__ == "__main__":
    main()
