"""`hvmail_report`: report on delivery attempts from the processed delivery log.

A thin click front end; the logic lives in `greenarrow.lib.ops.delivery_report`
so it is testable without a command line.
"""

from __future__ import annotations

import json
import os
import sys

import click

from greenarrow.lib.core.delivery_log import STATUSES
from greenarrow.lib.core.paths import QUEUES, root_from_env
from greenarrow.lib.ops.delivery_report import (
    PERIOD_HELP,
    TIME_HELP,
    Filter,
    Summary,
    iter_matching,
    queue_names,
    resolve_range,
)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-q",
    "--queue",
    required=True,
    type=click.Choice([*QUEUES, "all"]),
    help="Queue whose delivery log to read.",
)
@click.option("-s", "--start", metavar="TIME", help=f"Start of the time range: {TIME_HELP}.")
@click.option("-e", "--end", metavar="TIME", help="End of the time range (same forms as --start).")
@click.option("-l", "--last", metavar="PERIOD", help=f"From PERIOD ago to now: {PERIOD_HELP}.")
@click.option(
    "-f",
    "-S",
    "--sender",
    "senders",
    multiple=True,
    metavar="ADDRESS",
    help="Envelope sender; * and ? are wildcards; case-insensitive. Repeat to OR.",
)
@click.option(
    "-r",
    "--recipient",
    "recipients",
    multiple=True,
    metavar="ADDRESS",
    help="Recipient; * and ? are wildcards; case-insensitive. Repeat to OR.",
)
@click.option("--sendid", "sendids", multiple=True, help="SendID (case-insensitive). Repeat to OR.")
@click.option("--listid", "listids", multiple=True, help="ListID (case-insensitive). Repeat to OR.")
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice(STATUSES),
    help="Attempt status. Repeat to OR.",
)
@click.option(
    "--processed-logfile",
    "processed",
    is_flag=True,
    help="Print the matching lines in the processed logfile format, as stored.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def main(
    queue: str,
    start: str | None,
    end: str | None,
    last: str | None,
    senders: tuple[str, ...],
    recipients: tuple[str, ...],
    sendids: tuple[str, ...],
    listids: tuple[str, ...],
    statuses: tuple[str, ...],
    processed: bool,
    as_json: bool,
) -> None:
    """Report on SMTP delivery attempts. Different filters AND together;
    repeats of the same filter OR together."""
    if processed and as_json:
        raise click.UsageError("--processed-logfile and --json cannot be combined")
    try:
        start_at, end_at = resolve_range(start, end, last)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    queues = queue_names(queue)
    record_filter = Filter(senders, recipients, sendids, listids, statuses)
    entries = iter_matching(root_from_env(), queues, start_at, end_at, record_filter)

    if processed:
        out = click.get_binary_stream("stdout")
        try:
            for raw, _ in entries:
                out.write(raw if raw.endswith(b"\n") else raw + b"\n")
            out.flush()
        except BrokenPipeError:
            # `hvmail_report ... | head`: stop quietly, and keep Python from
            # complaining again when it flushes stdout at exit.
            os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
        return

    summary = Summary(start_at, end_at, queues)
    for _, record in entries:
        summary.add(record)
    if as_json:
        click.echo(json.dumps(summary.to_json(), indent=2))
    else:
        click.echo(summary.render(), nl=False)


if __name__ == "__main__":
    sys.exit(main())
