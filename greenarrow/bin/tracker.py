"""`tracker`: the click, open and unsubscribe tracker (started by hvmail_init; docs/tracker.md)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from greenarrow.lib.core import service
from greenarrow.lib.core.paths import root_from_env
from greenarrow.lib.tracker.listeners import Tracker

log = logging.getLogger("tracker")


async def _main(stop: asyncio.Event, reload: asyncio.Event) -> None:
    tracker = Tracker(root_from_env())
    await tracker.start()
    await service.wait_stop_or_reload(stop, reload, tracker.reload)
    await tracker.close()


def main() -> None:
    argparse.ArgumentParser(
        prog="python -m greenarrow.bin.tracker",
        description="Answer SimpleMH's click, open and unsubscribe URLs and record their "
                    "events in log/events/tracker/ of the install root named by HVMAIL_ROOT. "
                    "Listens on control/tracker.listen (HTTP) and tracker.tls.listen (HTTPS); "
                    "SIGHUP re-reads settings, certificates and MPP ranges; SIGTERM stops. "
                    "Started by hvmail_init; see docs/tracker.md.").parse_args()
    service.setup("tracker")
    try:
        import uvloop
    except ImportError:
        pass
    else:
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        service.run(_main)
    except Exception as e:  # a bad control file, certificate or ranges file: say which, exit
        log.error("cannot run: %s", e)
        sys.exit(111)
    sys.exit(0)


if __name__ == "__main__":
    main()
