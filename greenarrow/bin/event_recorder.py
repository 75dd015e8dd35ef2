"""`event-recorder`: delivery logs and event spools into the events table (started by hvmail_init)."""

from __future__ import annotations

import logging
import signal
import sys
import threading

from greenarrow.lib import service
from greenarrow.lib.conf import ConfError
from greenarrow.lib.events.recorder import Recorder
from greenarrow.lib.paths import root_from_env


def main() -> None:
    service.setup("event-recorder")
    recorder = Recorder(root_from_env())
    try:
        recorder.configure()
    except ConfError as exc:
        logging.getLogger("greenarrow.events.recorder").error("cannot start: %s", exc)
        sys.exit(111)
    stop = threading.Event()
    reload = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: reload.set())
    recorder.run(stop, reload)
    sys.exit(0)


if __name__ == "__main__":
    main()
