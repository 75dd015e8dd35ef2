"""Command-line injection: `sendmail`, `qmail-inject` and `greenarrow inject`.

The message comes on stdin; the recipients from the arguments or, with -t,
from the To, Cc and Bcc headers; the sender from -f. Exit codes are
qmail-inject's: 0 accepted, 100 permanent error (the message says what is
wrong), 111 temporary error (queue full, disk error).

Start-up cost is per message, so this module imports nothing it does not
need: no click, no email package unless -t asks for header parsing.
"""

from __future__ import annotations

import os
import sys

from greenarrow.lib.inject.command_line import (  # noqa: F401 (the API tests and callers use)
    EXIT_OK,
    EXIT_PERMANENT,
    EXIT_TEMPORARY,
    USAGE,
    Options,
    UsageError,
    add_from,
    cut_at_dot,
    default_sender,
    header_recipients,
    inject,
    outcome,
    parse_args,
)


def run(argv: list[str], program: str, qmail_inject: bool = False) -> int:
    """Inject from stdin; print errors as `<program>: fatal: ...`; return the exit code."""
    if argv[:1] in (["--help"], ["-help"]):
        sys.stdout.write(USAGE)
        return EXIT_OK
    try:
        smtp = parse_args(argv, qmail_inject).smtp
    except UsageError:
        smtp = False  # reported below, as for any other bad arguments
    if smtp:
        from greenarrow.lib.core.paths import Root, root_path_from_env
        from greenarrow.lib.inject import smtp_stdio

        root = Root(root_path_from_env(dict(os.environ)))
        return smtp_stdio.run(root, dict(os.environ), os.getuid())
    code, error = outcome(argv, sys.stdin.buffer.read(), dict(os.environ), program, qmail_inject)
    sys.stderr.write(error)
    return code


def sendmail_main() -> None:
    sys.exit(run(sys.argv[1:], "sendmail"))


def qmail_inject_main() -> None:
    sys.exit(run(sys.argv[1:], "qmail-inject", qmail_inject=True))


if __name__ == "__main__":
    sendmail_main()
