"""VirtualMTAs: which IP address (or relay server) an attempt is sent from.

Three kinds, defined in greenarrow.conf (docs/configuration.md):

    ip_address NAME {            an IP address: the source address to bind and the
      smtp_source 127.0.0.2      HELO name; its own `domain` blocks are its throttle
      hostname mta2.example.test overrides, `throttle_template` names its template
      id 2                       (optional numeric id; default: order of definition)
    }
    relay_server NAME {          a smarthost: every message goes to relay_host,
      relay_host HOST[:PORT]     with optional SMTP AUTH and limits of its own
      smtp_auth_username U
      smtp_auth_password P
      max_concurrent_connections N
      max_messages_per_hour N
    }
    routing_rule NAME {          a weighted mix of the others (rules may nest)
      route ip1 3
      route relay1 1
      randomization fully_random | message_constant | email_address_constant
    }

`general { default_virtual_mta NAME }` names the default; without one the
default is the machine's own address with `me` as HELO. The MtaID of a
message (an `X-GreenArrow-MtaID`, `GREENARROW_MTAID`, ...) names a VirtualMTA
by name (case-insensitively) or by numeric id; a blank or unknown MtaID means
the default. It is resolved at each attempt, so a renamed or
deleted VirtualMTA changes where queued mail goes, as in GreenArrow.

Randomization of a routing rule: `fully_random` draws at every attempt;
`message_constant` draws from a hash of the msguid, so every attempt of a
message (and all its recipients) goes the same way; `email_address_constant`
from a hash of the recipient address, so an address always gets the same IP
while the weights are unchanged.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from greenarrow.lib.config.conf import Block, ConfError

DEFAULT_NAME = "default"


@dataclass(frozen=True)
class Sender:
    """A VirtualMTA that sends: an IP address or a relay server."""

    name: str
    id: int
    kind: str  # "ip" | "relay"
    source_ip: str | None
    hostname: str | None  # HELO; None: control/me
    relay: tuple[str, int] | None = None
    auth: tuple[str, str] | None = None
    max_concurrent_connections: int = 0
    max_messages_per_hour: int = 0


@dataclass(frozen=True)
class RoutingRule:
    name: str
    id: int
    routes: tuple[tuple[str, int], ...]  # (member name lower-cased, weight)
    randomization: str


Vmta = Sender | RoutingRule

DEFAULT = Sender(DEFAULT_NAME, 0, "ip", None, None)


def _fraction(text: str) -> float:
    """A stable number in [0, 1) from `text` (the same on every server and run)."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


class VirtualMtas:
    """The VirtualMTAs of a parsed greenarrow.conf; `resolve` picks the sender of an attempt."""

    def __init__(self, conf: Block) -> None:
        self.by_name: dict[str, Vmta] = {}
        self.by_id: dict[int, Vmta] = {}
        next_id = 1
        kinds = ("ip_address", "relay_server", "routing_rule")
        taken = {b.directive("id").as_int() for k in kinds for b in conf.blocks_named(k)
                 if b.directive("id") is not None}
        for kind in kinds:
            names = list(dict.fromkeys(n.lower() for b in conf.blocks_named(kind) for n in b.args))
            for lowered in names:
                if lowered == "*":
                    continue
                block = conf.block(kind, lowered)  # merged when written in pieces
                name = next(n for n in block.args if n.lower() == lowered)
                explicit = block.directive("id")
                number = explicit.as_int() if explicit is not None else None
                if number is None:
                    while next_id in self.by_id or next_id in taken:
                        next_id += 1
                    number = next_id
                vmta = self._make(kind, name, number, block)
                key = name.lower()
                if key in self.by_name and self.by_name[key] != vmta:
                    raise block.error(f"VirtualMTA name {name!r} is used twice")
                if number in self.by_id and self.by_id[number].name.lower() != key:
                    raise block.error(f"VirtualMTA id {number} is used twice")
                self.by_name[key] = vmta
                self.by_id[number] = vmta
        self._check_routes(conf)
        general = conf.block("general")
        default = general.directive("default_virtual_mta") if general is not None else None
        self.default: Vmta = DEFAULT
        if default is not None:
            found = self.by_name.get(default.as_str().lower())
            if found is None:
                raise default.error(f"default_virtual_mta: no VirtualMTA named {default.as_str()!r}")
            self.default = found

    @staticmethod
    def _make(kind: str, name: str, number: int, block: Block) -> Vmta:
        source = block.directive("smtp_source")
        hostname = block.directive("hostname")
        common = (source.as_str() if source else None, hostname.as_str() if hostname else None)
        if kind == "ip_address":
            return Sender(name, number, "ip", *common)
        if kind == "relay_server":
            host = block.directive("relay_host")
            if host is None:
                raise block.error(f"relay_server {name}: relay_host is required")
            user = block.get_str("smtp_auth_username", None)
            password = block.get_str("smtp_auth_password", None)
            if (user is None) != (password is None):
                raise block.error(f"relay_server {name}: smtp_auth_username and "
                                  "smtp_auth_password go together")
            return Sender(name, number, "relay", *common, relay=host.as_host_port(25),
                          auth=(user, password) if user is not None else None,
                          max_concurrent_connections=block.get_int("max_concurrent_connections", 0),
                          max_messages_per_hour=block.get_int("max_messages_per_hour", 0))
        routes = []
        for d in block.directives_named("route"):
            routes.append((d.args[0].lower(), int(d.args[1])))
        if not routes:
            raise block.error(f"routing_rule {name}: at least one route is required")
        return RoutingRule(name, number, tuple(routes),
                           block.get_str("randomization", "fully_random"))

    def _check_routes(self, conf: Block) -> None:
        for block in conf.blocks_named("routing_rule"):
            for d in block.directives_named("route"):
                if d.args[0].lower() not in self.by_name:
                    raise d.error(f"route: no VirtualMTA named {d.args[0]!r}")
        for vmta in self.by_name.values():
            if isinstance(vmta, RoutingRule):
                self._senders(vmta, set(), conf)

    def _senders(self, rule: RoutingRule, seen: set[str], conf: Block) -> None:
        if rule.name.lower() in seen:
            raise ConfError(conf.filename, None, f"routing_rule {rule.name}: routes loop back to it")
        for member, _ in rule.routes:
            target = self.by_name[member]
            if isinstance(target, RoutingRule):
                self._senders(target, seen | {rule.name.lower()}, conf)

    def lookup(self, mtaid: str) -> Vmta:
        """The VirtualMTA named (or numbered) `mtaid`; the default when blank or unknown."""
        mtaid = (mtaid or "").strip()
        if not mtaid:
            return self.default
        if mtaid.isdigit():
            return self.by_id.get(int(mtaid), self.default)
        return self.by_name.get(mtaid.lower(), self.default)

    def resolve(self, vmta: Vmta, msguid: str, recipient: str,
                rng: random.Random | None = None) -> Sender:
        """The IP address or relay that sends this attempt, following routing rules."""
        depth = 0
        while isinstance(vmta, RoutingRule):
            total = sum(weight for _, weight in vmta.routes)
            if vmta.randomization == "message_constant":
                point = _fraction(f"{vmta.name}|{msguid}")
            elif vmta.randomization == "email_address_constant":
                point = _fraction(f"{vmta.name}|{recipient.lower()}")
            else:
                point = (rng or random).random()
            point *= total
            chosen = vmta.routes[-1][0]
            for member, weight in vmta.routes:
                if point < weight:
                    chosen = member
                    break
                point -= weight
            vmta = self.by_name[chosen]
            depth += 1
            if depth > 32:  # loops are refused at load; this is a belt and braces bound
                return self.default if isinstance(self.default, Sender) else DEFAULT
        return vmta
