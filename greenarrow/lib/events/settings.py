"""The events settings of greenarrow.conf: this server's id and which types are recorded."""

from __future__ import annotations

from greenarrow.lib.config import control
from greenarrow.lib.config.conf import Block
from greenarrow.lib.core.paths import Root
from greenarrow.lib.events.types import EVENT_TYPES

ALL = "all"


def server_id(root: Root, conf: Block) -> str:
    """`general { server_id }`, else this server's name (control/me)."""
    general = conf.block("general")
    value = general.get_str("server_id") if general is not None else None
    if value:
        return value
    return control.read_text(root.control, "me")


def recorded_types(conf: Block) -> frozenset[str]:
    """The event types to record: those of `general { record_events }` and of
    every `event_delivery_destination { event_delivery_events }`.

    Declaring a destination turns its types on; `record_events` turns types on
    without one (they wait in the events table until a destination takes them).
    Raises conf.ConfError naming the file and line of an unknown type.
    """
    wanted: set[str] = set()
    general = conf.block("general")
    sources = [general.directive("record_events")] if general is not None else []
    for destination in conf.blocks_named("event_delivery_destination"):
        sources.append(destination.directive("event_delivery_events"))
    for directive in sources:
        if directive is None:
            continue
        for name in directive.args:
            name = name.strip().rstrip(",")
            if name == ALL:
                wanted.update(EVENT_TYPES)
            elif name in EVENT_TYPES:
                wanted.add(name)
            elif name:
                raise directive.error(f"{directive.name}: unknown event type {name!r}; "
                                      f"expected {ALL} or one of {', '.join(EVENT_TYPES)}")
    return frozenset(wanted)
