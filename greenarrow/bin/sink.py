"""`greenarrow sink`: accept and discard mail, counting it.

For the demo, the tests and the benchmarks: point delivery at it and read the
count file (or send SIGUSR1) to learn exactly how much arrived. All the work
is in `greenarrow.lib.devtools.sink`; this module parses the command line.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import click
from setproctitle import setproctitle

from greenarrow.lib.config.control import parse_listen
from greenarrow.lib.devtools.sink import SinkOptions, serve


def _listen(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list[tuple[str, int]]:
    try:
        return [parse_listen(v) for v in values]
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


@click.command("sink")
@click.option(
    "--listen",
    multiple=True,
    default=("127.0.0.1:2525",),
    show_default=True,
    metavar="ADDR",
    callback=_listen,
    help="ip:port or [ipv6]:port to listen on; repeat for several.",
)
@click.option(
    "--count-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Keep 'messages=N recipients=N deferred=N failed=N sessions=N bytes=N' in this file.",
)
@click.option(
    "--maildir",
    type=click.Path(file_okay=False, path_type=Path),
    help="File each accepted message into this Maildir (created if missing).",
)
@click.option("--defer-rate", type=click.FloatRange(0, 1), default=0.0, help="Fraction answered 451 after DATA.")
@click.option("--fail-rate", type=click.FloatRange(0, 1), default=0.0, help="Fraction answered 554 after DATA.")
@click.option("--delay", type=click.FloatRange(min=0), default=0.0, metavar="SECONDS", help="Wait before the final DATA reply.")
@click.option("--seed", type=int, default=None, help="Seed for the defer/fail draws (deterministic runs).")
@click.option("--exit-after", type=click.IntRange(min=1), default=None, metavar="N", help="Exit 0 once N messages were accepted.")
def sink_command(
    listen: list[tuple[str, int]],
    count_file: Path | None,
    maildir: Path | None,
    defer_rate: float,
    fail_rate: float,
    delay: float,
    seed: int | None,
    exit_after: int | None,
) -> None:
    """Accept and discard mail, counting it; runs until SIGTERM/SIGINT.

    Prints the counters line on SIGUSR1 and on exit.
    """
    try:
        options = SinkOptions(
            defer_rate=defer_rate,
            fail_rate=fail_rate,
            delay=delay,
            seed=seed,
            maildir=maildir,
            count_file=count_file,
        )
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    shown = " ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in listen)
    setproctitle(f"greenarrow sink {shown}")
    try:
        asyncio.run(serve(listen, options, exit_after=exit_after))
    except OSError as e:
        raise click.ClickException(f"cannot listen on {shown}: {e}") from None
    sys.exit(0)


if __name__ == "__main__":
    sink_command()
