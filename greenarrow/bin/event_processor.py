"""`event-processor`: delivers the events table to the greenarrow.conf destinations
(HTTP POSTs of JSON arrays, or JSON-lines log folders). Started by hvmail_init;
SIGHUP re-reads greenarrow.conf. See docs/events.md."""

from __future__ import annotations

import logging
import sys

from greenarrow.lib import service
from greenarrow.lib.conf import ConfError
from greenarrow.lib.events.processor import Processor
from greenarrow.lib.paths import root_from_env


def main() -> None:
    service.setup("event-processor")
    processor = Processor(root_from_env())
    try:
        processor.configure()
    except ConfError as exc:
        logging.getLogger("greenarrow.events.processor").error("cannot start: %s", exc)
        sys.exit(111)
    service.run(processor.run)
    sys.exit(0)


if __name__ == "__main__":
    main()
