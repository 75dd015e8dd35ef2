"""`event-recorder`: delivery logs and event spools into the events table (started by hvmail_init)."""

from __future__ import annotations

import logging
import signal
import sys
import threading

from greenarrow.lib.config.conf import ConfError
from greenarrow.lib.core import service
from greenarrow.lib.core.paths import root_from_env

log = logging.getLogger("greenarrow.events.recorder")


def main() -> None:
    service.setup("event-recorder")
    stop = threading.Event()
    reload = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: reload.set())
    try:
        from greenarrow.lib.events.recorder import Recorder
    except ImportError as exc:  # psycopg without libpq: say so once, do not restart-loop
        log.error("cannot record events: %s (install libpq5); waiting for stop", exc)
        while not stop.wait(60):
            pass
        sys.exit(0)
    recorder = Recorder(root_from_env())
    try:
        recorder.configure()
    except ConfError as exc:
        log.error("cannot start: %s", exc)
        sys.exit(111)
    recorder.run(stop, reload)
    sys.exit(0)


if __name__ == "__main__":
    main()
