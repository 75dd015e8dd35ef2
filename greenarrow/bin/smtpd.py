"""`smtpd`: the SMTP injection service (started by hvmail_init)."""

from __future__ import annotations

import asyncio
import logging
import sys

from greenarrow.lib.core import service
from greenarrow.lib.core.paths import root_from_env
from greenarrow.lib.inject.smtp_injection import SmtpServer


async def _main(stop: asyncio.Event, reload: asyncio.Event) -> None:
    server = SmtpServer(root_from_env())
    await server.start()
    await service.wait_stop_or_reload(stop, reload, server.reload)
    await server.close()


def main() -> None:
    service.setup("smtpd")
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd logs every command
    service.run(_main)
    sys.exit(0)


if __name__ == "__main__":
    main()
