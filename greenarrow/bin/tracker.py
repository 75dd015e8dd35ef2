"""`tracker`: the click, open and unsubscribe tracker (started by hvmail_init; docs/tracker.md)."""

from __future__ import annotations

import asyncio
import logging
import sys

from greenarrow.lib import service
from greenarrow.lib.paths import root_from_env
from greenarrow.lib.tracker.listeners import Tracker

log = logging.getLogger("tracker")


async def _main(stop: asyncio.Event, reload: asyncio.Event) -> None:
    tracker = Tracker(root_from_env())
    await tracker.start()
    await service.wait_stop_or_reload(stop, reload, tracker.reload)
    await tracker.close()


def main() -> None:
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
