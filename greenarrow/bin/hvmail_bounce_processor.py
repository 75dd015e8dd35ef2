"""`hvmail_bounce_processor`: bounces and spam complaints into events (started by hvmail_init).

    python -m greenarrow.bin.hvmail_bounce_processor                 the service
    python -m greenarrow.bin.hvmail_bounce_processor --check-config  check bounce_processor.conf

One service processes every bounce, spam complaint and lite mailbox of
greenarrow.conf and the synchronous bounces of the delivery logs
(greenarrow.lib.feedback.mailbox_processor; docs/bounces.md).
"""

from __future__ import annotations

import argparse
import sys

from greenarrow.lib.config.conf import ConfError
from greenarrow.lib.core import service
from greenarrow.lib.core.paths import root_from_env
from greenarrow.lib.feedback import processor_config


def check_config() -> int:
    path = root_from_env().control / processor_config.FILE
    try:
        processor_config.load(path)
    except processor_config.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{path}: OK" if path.exists() else f"{path}: absent, the defaults apply")
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="hvmail_bounce_processor",
        description="Process the bounce, spam complaint and lite mailboxes into events.")
    parser.add_argument("--check-config", action="store_true",
                        help=f"check control/{processor_config.FILE} and exit "
                             "(0: valid or absent, 1: invalid, the error on stderr)")
    args = parser.parse_args(argv)
    if args.check_config:
        sys.exit(check_config())
    service.run_blocking("bounce-processor", _processor, "process bounces", (ConfError,))


def _processor():  # noqa: ANN202 (imports psycopg: see service.run_blocking)
    from greenarrow.lib.feedback.mailbox_processor import BounceProcessor

    return BounceProcessor(root_from_env())


if __name__ == "__main__":
    main()
