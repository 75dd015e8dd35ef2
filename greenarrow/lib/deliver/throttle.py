"""Throttles: concurrent connections and messages per hour, per sending IP and rule.

queue-send sends every attempt that a throttle rule covers to the same
remote worker (chosen by the throttle key), so that worker sees all of that
key's traffic, from every queue, and enforces its limits here: an attempt
over a limit is not made and comes back as `connmaxout`, which
queue-send logs and moves to the disk-queue.

Backoff mode (throttle programs): each key remembers the outcomes
of its recent attempts (`window` seconds). When at least `min_attempts` were
made and the share of deferrals reaches `deferral_rate` percent, or that of
failures `failure_rate`, the limits drop to `backoff_max_*` (a fixed value
`N`, or `N%` of the normal limit) for `return_after` seconds; then they come
back and the window starts afresh.

The clock is injectable so that tests drive an hour in microseconds.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from greenarrow.lib.core.remote_link import DEFERRAL, FAILURE
from greenarrow.lib.routing.throttle_config import Program

HOUR = 3600.0


def reduced(limit: int, rule: str) -> int:
    """The backoff value of a limit: `N` or `N%` of it (a limit of 0, no limit, stays 0
    unless the rule is a fixed value)."""
    if rule.endswith("%"):
        return 0 if limit == 0 else max(1, limit * int(rule[:-1]) // 100)
    return int(rule)


@dataclass
class KeyState:
    max_connections: int = 0
    max_per_hour: int = 0
    program: Program | None = None
    active: int = 0
    started: deque = field(default_factory=deque)  # attempt start times within the hour
    outcomes: deque = field(default_factory=deque)  # (time, status) within the window
    backoff_until: float = 0.0
    backoff_reason: str = ""
    connmaxouts: int = 0

    def limits(self, now: float) -> tuple[int, int]:
        if self.program is not None and now < self.backoff_until:
            p = self.program
            return (reduced(self.max_connections, p.backoff_max_concurrent_connections),
                    reduced(self.max_per_hour, p.backoff_max_messages_per_hour))
        return self.max_connections, self.max_per_hour


class Throttles:
    """The throttle state of every key this worker owns."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.keys: dict[str, KeyState] = {}

    def acquire(self, key: str, max_connections: int, max_per_hour: int,
                program: Program | None = None) -> str | None:
        """Take a connection slot for an attempt; None when granted, else why not (connmaxout)."""
        now = self.clock()
        state = self.keys.get(key)
        if state is None:
            state = self.keys[key] = KeyState()
        state.max_connections, state.max_per_hour, state.program = (
            max_connections, max_per_hour, program)
        if state.backoff_until and now >= state.backoff_until:
            state.backoff_until, state.backoff_reason = 0.0, ""
            state.outcomes.clear()
        while state.started and state.started[0] <= now - HOUR:
            state.started.popleft()
        conn_limit, hour_limit = state.limits(now)
        mode = " (backoff)" if now < state.backoff_until else ""
        if conn_limit and state.active >= conn_limit:
            state.connmaxouts += 1
            return f"max concurrent connections ({conn_limit}{mode}) reached for {key}"
        if hour_limit and len(state.started) >= hour_limit:
            state.connmaxouts += 1
            return f"max messages per hour ({hour_limit}{mode}) reached for {key}"
        state.active += 1
        state.started.append(now)
        return None

    def release(self, key: str, status: str) -> None:
        """The attempt that took a slot is over; `status` feeds backoff mode."""
        state = self.keys.get(key)
        if state is None:
            return
        state.active = max(0, state.active - 1)
        program = state.program
        if program is None:
            return
        now = self.clock()
        state.outcomes.append((now, status))
        while state.outcomes and state.outcomes[0][0] <= now - program.window:
            state.outcomes.popleft()
        if now < state.backoff_until or len(state.outcomes) < max(1, program.min_attempts):
            return
        total = len(state.outcomes)
        deferred = sum(1 for _, s in state.outcomes if s == DEFERRAL)
        failed = sum(1 for _, s in state.outcomes if s == FAILURE)
        reason = ""
        if program.deferral_rate and deferred * 100 >= program.deferral_rate * total:
            reason = f"{deferred} of {total} attempts deferred"
        elif program.failure_rate and failed * 100 >= program.failure_rate * total:
            reason = f"{failed} of {total} attempts failed"
        if reason:
            state.backoff_until = now + program.return_after
            state.backoff_reason = f"{reason} within {program.window:.0f}s (program {program.name})"

    def snapshot(self) -> dict:
        """The state of every key, for `greenarrow queue status` and `explain`."""
        now = self.clock()
        out = {}
        for key, state in self.keys.items():
            conn_limit, hour_limit = state.limits(now)
            out[key] = {
                "active": state.active,
                "last_hour": sum(1 for t in state.started if t > now - HOUR),
                "max_concurrent_connections": state.max_connections,
                "max_messages_per_hour": state.max_per_hour,
                "effective_max_concurrent_connections": conn_limit,
                "effective_max_messages_per_hour": hour_limit,
                "backoff_until": state.backoff_until if now < state.backoff_until else None,
                "backoff_reason": state.backoff_reason if now < state.backoff_until else "",
                "connmaxouts": state.connmaxouts,
            }
        return out
