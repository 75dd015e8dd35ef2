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


def _program(process: int | None):
    async def run(stop: asyncio.Event, reload: asyncio.Event) -> None:
        tracker = Tracker(root_from_env(), process)
        await tracker.start()
        await service.wait_stop_or_reload(stop, reload, tracker.reload)
        await tracker.close()
    return run


def _process_number(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"process number {text!r}: expected 0, 1, 2, ...")
    return int(text)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m greenarrow.bin.tracker",
        description="Answer SimpleMH's click, open and unsubscribe URLs and record their "
                    "events in log/events/tracker-PROCESS/ (log/events/tracker/ without "
                    "PROCESS) of the install root named by HVMAIL_ROOT. "
                    "Listens on control/tracker.listen (HTTP) and tracker.tls.listen (HTTPS); "
                    "SIGHUP re-reads settings, certificates and MPP ranges; SIGTERM stops. "
                    "Started by hvmail_init, control/tracker.processes of them; see "
                    "docs/tracker.md.")
    parser.add_argument("process", nargs="?", type=_process_number,
                        help="this process's number among hvmail_init's tracker processes: "
                             "its own spool folder, and SO_REUSEPORT when it binds")
    process = parser.parse_args().process
    service.setup("tracker" if process is None else f"tracker-{process}")
    try:
        import uvloop
    except ImportError:
        pass
    else:
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        service.run(_program(process))
    except Exception as e:  # a bad control file, certificate or ranges file: say which, exit
        log.error("cannot run: %s", e)
        sys.exit(111)
    sys.exit(0)


if __name__ == "__main__":
    main()
