"""`injectd`: the command-line injection daemon (started by hvmail_init)."""

from __future__ import annotations

import asyncio
import sys

from greenarrow.lib import service
from greenarrow.lib.inject_daemon import InjectDaemon
from greenarrow.lib.paths import root_from_env


async def _main(stop: asyncio.Event, reload: asyncio.Event) -> None:
    daemon = InjectDaemon(root_from_env())
    await daemon.start()
    await service.wait_stop_or_reload(stop, reload, lambda: None)
    await daemon.close()


def main() -> None:
    service.setup("injectd")
    service.run(_main)
    sys.exit(0)


if __name__ == "__main__":
    main()
