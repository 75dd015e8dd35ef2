"""`event-processor`: delivers the events table to the greenarrow.conf destinations
(HTTP POSTs of JSON arrays, or JSON-lines log folders). Started by hvmail_init;
SIGHUP re-reads greenarrow.conf. See docs/events.md."""

from __future__ import annotations

import logging
import signal
import sys
import threading

from greenarrow.lib.config.conf import ConfError
from greenarrow.lib.core import service
from greenarrow.lib.core.paths import root_from_env

log = logging.getLogger("greenarrow.events.processor")


def main() -> None:
    service.setup("event-processor")
    try:
        from greenarrow.lib.events.processor import Processor
    except ImportError as exc:  # psycopg without libpq: say so once, do not restart-loop
        log.error("cannot deliver events: %s (install libpq5); waiting for stop", exc)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        while not stop.wait(60):
            pass
        sys.exit(0)
    processor = Processor(root_from_env())
    try:
        processor.configure()
    except ConfError as exc:
        log.error("cannot start: %s", exc)
        sys.exit(111)
    service.run(processor.run)
    sys.exit(0)


if __name__ == "__main__":
    main()
