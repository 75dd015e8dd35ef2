"""`local`: the delivery agent for the engine's own mailboxes (started by hvmail_init)."""

from __future__ import annotations

import asyncio
import sys

from greenarrow.lib.core import service
from greenarrow.lib.core.paths import root_from_env
from greenarrow.lib.local.agent import LocalAgent


def main() -> None:
    if len(sys.argv) > 1:
        print("usage: python -m greenarrow.bin.local  (no arguments; HVMAIL_ROOT names the "
              "install root)\nDelivers queue entries for incoming_email_domain mailboxes into "
              "their Maildirs under maildata/, on var/local.sock.", file=sys.stderr)
        sys.exit(0 if sys.argv[1] in ("-h", "--help") else 2)
    service.setup("local")

    async def _main(stop: asyncio.Event, reload: asyncio.Event) -> None:
        agent = LocalAgent(root_from_env())
        await agent.start()
        await service.wait_stop_or_reload(stop, reload, lambda: None)
        await agent.close()

    service.run(_main)
    sys.exit(0)


if __name__ == "__main__":
    main()
