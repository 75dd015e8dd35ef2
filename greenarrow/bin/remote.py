"""`remote N`: SMTP delivery worker number N (started by hvmail_init)."""

from __future__ import annotations

import asyncio
import sys

from greenarrow.lib.core import service
from greenarrow.lib.core.paths import root_from_env
from greenarrow.lib.deliver.remote_worker import RemoteWorker


def main() -> None:
    number = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    service.setup(f"remote {number}")

    async def _main(stop: asyncio.Event, reload: asyncio.Event) -> None:
        worker = RemoteWorker(root_from_env(), number)
        await worker.start()
        await service.wait_stop_or_reload(stop, reload, worker.reload)
        await worker.close()

    service.run(_main)
    sys.exit(0)


if __name__ == "__main__":
    main()
