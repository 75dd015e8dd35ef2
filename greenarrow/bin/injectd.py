"""`injectd`: the command-line injection daemon (started by hvmail_init)."""

from __future__ import annotations

import asyncio
import sys

from greenarrow.lib.core import service
from greenarrow.lib.core.paths import root_from_env
from greenarrow.lib.inject.daemon import InjectDaemon


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
