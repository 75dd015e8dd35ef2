"""`queue-send QUEUE`: the scheduler of the ram-, bounce- or disk-queue (started by hvmail_init)."""

from __future__ import annotations

import asyncio
import sys

from greenarrow.lib.core import service
from greenarrow.lib.core.paths import QUEUES, root_from_env
from greenarrow.lib.queue.scheduler import Scheduler


def main() -> None:
    queue = sys.argv[1] if len(sys.argv) > 1 else "ram"
    if queue not in QUEUES:
        sys.stderr.write(f"queue-send: unknown queue {queue!r}; expected one of {', '.join(QUEUES)}\n")
        sys.exit(100)
    service.setup(f"queue-send {queue}")

    async def _main(stop: asyncio.Event, reload: asyncio.Event) -> None:
        await Scheduler(root_from_env(), queue).run(stop, reload)

    service.run(_main)
    sys.exit(0)


if __name__ == "__main__":
    main()
