"""`unsubscribe_processor`: mailto: unsubscribe requests into engine_unsub events (docs/tracker.md)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys

from greenarrow.lib.core import service
from greenarrow.lib.core.paths import root_from_env
from greenarrow.lib.tracker.unsubscribe_mailbox import UnsubscribeProcessor

log = logging.getLogger("unsubscribe-processor")

POLL_SECONDS = 1.0


async def _main(stop: asyncio.Event, reload: asyncio.Event) -> None:
    processor = UnsubscribeProcessor(root_from_env())
    log.info("reading the unsubscribe mailboxes: %s",
             ", ".join(b.address for b in processor.mailboxes()) or "none configured")
    failing = ""
    try:
        while not stop.is_set():
            reload.clear()  # configuration and constants are read on every pass anyway
            try:
                handled = processor.run_once()
                failing = ""
            except Exception as e:  # a bad greenarrow.conf or secret_constants: say it once, retry
                if str(e) != failing:
                    log.error("cannot process unsubscribe requests (they wait in new/): %s", e)
                    failing = str(e)
                handled = 0
            if not handled:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), POLL_SECONDS)
    finally:
        processor.close()


def main() -> None:
    argparse.ArgumentParser(
        prog="python -m greenarrow.bin.unsubscribe_processor",
        description="Turn the mailto: unsubscribe requests delivered to the "
                    "unsubscribe_mailbox of each incoming_email_domain (greenarrow.conf) "
                    "into engine_unsub events, written to log/events/unsubscribe-mailbox/ "
                    "for the event recorder, of the install root named by HVMAIL_ROOT. "
                    "Started by hvmail_init when an unsubscribe mailbox is configured; "
                    "SIGTERM stops. See docs/tracker.md.").parse_args()
    service.setup("unsubscribe-processor")
    try:
        service.run(_main)
    except Exception as e:
        log.error("cannot run: %s", e)
        sys.exit(111)
    sys.exit(0)


if __name__ == "__main__":
    main()
