"""Throttle programs from greenarrow.conf, in the form the remote workers take them.

    throttle_program careful {
      deferral_rate 50                       trigger: this percent of attempts deferred ...
      failure_rate 30                        ... or this percent failed (at least one trigger)
      backoff_max_concurrent_connections 50% limits in backoff: N or N% of the normal one
      backoff_max_messages_per_hour 100
      return_after 1h                        how long backoff lasts
      window 5m                              the outcomes considered
      min_attempts 20                        fewer attempts than this never trigger
    }

A `domain` block's `throttle_program NAME` attaches one to that throttle rule.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from greenarrow.lib.config.conf import Block


@dataclass(frozen=True)
class Program:
    """A throttle program's backoff rule (greenarrow.conf `throttle_program` block)."""

    name: str
    deferral_rate: int = 0  # percent; 0: not a trigger
    failure_rate: int = 0
    backoff_max_concurrent_connections: str = "50%"
    backoff_max_messages_per_hour: str = "50%"
    return_after: float = 3600.0
    window: float = 300.0
    min_attempts: int = 10

    @classmethod
    def from_job(cls, data: dict | None) -> Program | None:
        return cls(**data) if data else None


def throttle_programs(conf: Block) -> dict[str, dict]:
    """Every throttle_program by lower-cased name, as a dict for the job (see Program)."""
    programs: dict[str, dict] = {}
    for block in conf.blocks_named("throttle_program"):
        name = block.args[0]
        deferral = block.get_int("deferral_rate", 0)
        failure = block.get_int("failure_rate", 0)
        if not deferral and not failure:
            raise block.error(f"throttle_program {name}: give deferral_rate or failure_rate")
        program = Program(
            name=name,
            deferral_rate=deferral,
            failure_rate=failure,
            backoff_max_concurrent_connections=block.get_str("backoff_max_concurrent_connections", "50%"),
            backoff_max_messages_per_hour=block.get_str("backoff_max_messages_per_hour", "50%"),
            return_after=float(block.get_duration("return_after", 3600)),
            window=float(block.get_duration("window", 300)),
            min_attempts=block.get_int("min_attempts", 10),
        )
        programs[name.lower()] = asdict(program)
    for domain in conf.walk():
        if domain.name != "domain":
            continue
        d = domain.directive("throttle_program")
        if d is not None and d.as_str().lower() not in programs:
            raise d.error(f"no throttle_program named {d.as_str()!r}")
    return programs
