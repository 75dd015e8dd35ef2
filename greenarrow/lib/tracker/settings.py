"""What the tracker reads from the install root: secret constants, server id, switches, ranges.

Everything here is re-read on SIGHUP (`greenarrow_config reload`), except
the listen addresses, which need a restart.
"""

from __future__ import annotations

from dataclasses import dataclass

from greenarrow.lib.config import conf, control, secret_constants
from greenarrow.lib.core.paths import Root
from greenarrow.lib.tracker import privacy_open


@dataclass(slots=True)
class TrackerSettings:
    constants: tuple[str, str]
    server_id: str
    include_user_agent: bool
    ranges: privacy_open.EgressRanges
    timeout: float = 10.0


def server_id(root: Root) -> str:
    """The `server_id` of every event this server records.

    greenarrow.conf's `general { server_id }` when the schema has that
    directive and the file sets it, else control/me. The one place that
    decides it for the tracker.
    """
    if any(rule.name == "server_id" for rule in conf.SCHEMA):
        general = conf.load_root(root).block("general")
        value = general.get_str("server_id") if general is not None else None
        if value:
            return value
    return control.read_text(root.control, "me")


def load(root: Root) -> TrackerSettings:
    """The settings of `root`; SecretConstantsError, ControlError or RangesError name the file."""
    return TrackerSettings(
        constants=secret_constants.read(root.control),
        server_id=server_id(root),
        include_user_agent=control.read_bool(root.control,
                                             "opt.simplemh_tracking_include_user_agent"),
        ranges=privacy_open.load(root.var),
        timeout=control.read_float(root.control, "tracker.timeout"),
    )
