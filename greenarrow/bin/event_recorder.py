"""`event-recorder`: delivery logs and event spools into the events table (started by hvmail_init)."""

from __future__ import annotations

from greenarrow.lib.config.conf import ConfError
from greenarrow.lib.core import service
from greenarrow.lib.core.paths import root_from_env


def _recorder():  # noqa: ANN202 (imports psycopg: see service.run_blocking)
    from greenarrow.lib.events.recorder import Recorder

    return Recorder(root_from_env())


def main() -> None:
    service.run_blocking("event-recorder", _recorder, "record events", (ConfError,))


if __name__ == "__main__":
    main()
