"""Connection reuse (`reuse_connections yes`): SMTP sessions kept open for further messages.

A session that delivered a message to a domain with reuse on is kept, idle,
under a key of (destination, source IP, HELO, STARTTLS mode, port). The
next attempt with the same key sends on it after RSET instead of connecting
again. A session serves at most `reuse_connections_max_messages` messages
and is closed after `reuse_connections_idle_timeout` seconds idle; one that
broke is dropped. Every domain's attempts with a throttle or reuse go to
the same worker (queue-send picks the worker by key), so its sessions are
found here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from greenarrow.lib.smtp.client import SUCCESS, Attempt, Result, Session

PoolKey = tuple


@dataclass
class Kept:
    session: Session
    used: int
    max_messages: int
    idle_timeout: float
    idle_since: float


class SessionPool:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.idle: dict[PoolKey, list[Kept]] = {}
        self.opened = 0  # sessions kept after their first message (for tests and status)

    def keeper(self, key: PoolKey, reuse: dict) -> Callable[[Session, Result], bool]:
        """The `keep` callback for `deliver`: keep a fresh session that may serve again."""
        max_messages = int(reuse.get("max_messages") or 100)
        idle_timeout = float(reuse.get("idle_timeout") or 30)

        def keep(session: Session, result: Result) -> bool:
            if result.status != SUCCESS or not session.reusable or max_messages <= 1:
                return False
            self.opened += 1
            self.idle.setdefault(key, []).append(
                Kept(session, 1, max_messages, idle_timeout, self.clock()))
            return True

        return keep

    async def send(self, key: PoolKey, attempt: Attempt) -> Result | None:
        """Send on a kept session of `key`; None when there is none that works."""
        sessions = self.idle.get(key)
        while sessions:
            kept = sessions.pop()
            if self.clock() - kept.idle_since > kept.idle_timeout or not kept.session.reusable:
                await kept.session.quit()
                continue
            result = await kept.session.send(attempt, reset=True)
            if result is None:  # the RSET was refused or the session had died
                continue
            kept.used += 1
            if kept.session.reusable and kept.used < kept.max_messages:
                kept.idle_since = self.clock()
                self.idle.setdefault(key, []).append(kept)
            else:
                await kept.session.quit()
            return result
        return None

    def count(self) -> int:
        return sum(len(v) for v in self.idle.values())

    async def expire(self) -> None:
        """Close sessions idle for longer than their timeout."""
        now = self.clock()
        for key, sessions in list(self.idle.items()):
            keep = []
            for kept in sessions:
                if now - kept.idle_since > kept.idle_timeout or not kept.session.reusable:
                    await kept.session.quit()
                else:
                    keep.append(kept)
            if keep:
                self.idle[key] = keep
            else:
                del self.idle[key]

    async def close_all(self) -> None:
        for sessions in self.idle.values():
            for kept in sessions:
                await kept.session.quit()
        self.idle.clear()
