"""When a deferred entry is tried again (spec section 9.3).

Attempt n (attempt 1 at t=0) is due `((n-1)*20)^2` seconds after the first
attempt: 0, 400, 1600, 3600, 6400, ... Each retry is jittered by up to 10%
so that a burst of deferrals does not come back as a burst.
"""

from __future__ import annotations

import random


def retry_offset(attempt: int) -> int:
    """Seconds after the first attempt at which attempt number `attempt` is due."""
    return ((attempt - 1) * 20) ** 2


def next_due(
    first_attempt: float,
    attempts_made: int,
    now: float,
    scale: float = 1.0,
    jitter: float = 0.1,
    rng: random.Random | None = None,
) -> int:
    """Epoch second of the next attempt after `attempts_made` attempts.

    `scale` shrinks the whole schedule (`control/queue.retry.scale`, for tests
    and drills); the result is never earlier than `now`.
    """
    offset = retry_offset(attempts_made + 1) * scale
    offset += offset * jitter * (rng or random).random()
    return int(max(now, first_attempt + offset) + 0.999)
