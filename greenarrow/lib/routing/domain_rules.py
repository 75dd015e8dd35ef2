"""Per-recipient-domain delivery settings from greenarrow.conf `domain` blocks.

queue-send asks for the settings of every delivery attempt, thousands of
times a second, so the answer is computed once per (domain, ip_name) and
kept in an LRU cache. Every value is converted when DomainRules is built: a bad
`smtp_route` fails `greenarrow_config check` and the reload, not a delivery.

Patterns (case-insensitive): `example.com` (that domain), `[*.]example.com`
(it and all its subdomains), `*.example.com` (subdomains only), `*` (all).
For `foo.example.com` the patterns are tried in GreenArrow's order:
`foo.example.com`, `[*.]foo.example.com`, `*.example.com`, `[*.]example.com`,
`*.com`, `[*.]com`, then `*`.

Contexts, most specific first, like GreenArrow's throttle precedence (the
sending IP is more specific than the domain):
  1. `domain` blocks inside `ip_address NAME` naming this ip_name
     (case-insensitive, as VirtualMTA names are): the IP's throttle overrides,
  2. `domain` blocks of the `throttle_template` that `ip_address NAME` names,
  3. `domain` blocks inside `ip_address *`,
  4. `domain` blocks at top level.
Each setting is taken from the first block that sets it: contexts in that
order, and within a context the patterns in lookup order. So
`ip_address * { domain * { reuse_connections yes } }` beats a top-level
`domain example.com { reuse_connections no }`.

`queue_lifetime` not set by any domain block falls back to
`general { queue_lifetime }`, then None (= the control file `queuelifetime`).

Throttles: `max_concurrent_connections` and `max_messages_per_hour` (0: no
limit) count per sending IP and per rule: every domain that a rule's pattern
matches shares that rule's counters. `throttle_rule` names the rule found
(`<context>:<pattern>`), which is the throttle's key with the IP's name.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from fnmatch import fnmatchcase
from functools import lru_cache
from typing import Any

from greenarrow.lib.config.conf import (
    ALL,
    EXACT,
    MX,
    SELF_AND_SUBDOMAINS,
    STARTTLS_CHOICES,
    SUBDOMAINS,
    Block,
    Directive,
    ascii_domain,
    parse_domain_pattern,
)

CACHE_SIZE = 8192


@dataclass(frozen=True, slots=True)
class DomainSettings:
    """How to deliver to one recipient domain."""

    smtp_route: tuple[str, int] | None = None  # (host, port) instead of the MX lookup
    reuse_connections: bool = False
    starttls_use: str = "opportunistic"  # never | opportunistic | required
    queue_lifetime: int | None = None  # seconds; None: the control file queuelifetime
    max_concurrent_connections: int = 0  # per sending IP and rule; 0: no limit
    max_messages_per_hour: int = 0  # per sending IP and rule; 0: no limit
    throttle_program: str | None = None  # the backoff program (throttle_program block)
    throttle_rule: str = ""  # where the throttle limits were found: "<context>:<pattern>"
    reuse_connections_max_messages: int = 100
    reuse_connections_idle_timeout: int = 30  # seconds


DEFAULT_SETTINGS = DomainSettings()
_FIELDS = tuple(f.name for f in fields(DomainSettings))


def _convert(d: Directive) -> Any:
    """The typed value of one domain directive."""
    if d.name == "smtp_route":
        return d.as_host_port(25)
    if d.name == "reuse_connections":
        return d.as_bool()
    if d.name == "starttls_use":
        return d.as_choice(*STARTTLS_CHOICES)
    if d.name in ("max_concurrent_connections", "max_messages_per_hour",
                  "reuse_connections_max_messages"):
        return d.as_int()
    if d.name == "throttle_program":
        return d.as_str()
    return d.as_duration()  # queue_lifetime, reuse_connections_idle_timeout


# A context: pattern key -> the settings that pattern's blocks set.
_Table = dict[tuple[str, str], dict[str, Any]]


_THROTTLES = ("max_concurrent_connections", "max_messages_per_hour")


def _table(parent: Block, context: str = "") -> _Table:
    """The `domain` blocks directly inside `parent`, by pattern; first setting wins."""
    table: _Table = {}
    for block in parent.blocks_named("domain"):
        values: dict[str, Any] = {}
        for d in block.directives:
            if d.name in _FIELDS and d.name not in values:
                values[d.name] = _convert(d)
        for arg in block.args:
            if any(name in values for name in _THROTTLES):
                values = dict(values, throttle_rule=f"{context}:{arg.lower()}")
            try:
                key = parse_domain_pattern(arg)
            except ValueError as exc:
                raise block.error(f"domain: {exc}") from None
            merged = table.setdefault(key, {})
            for name, value in values.items():
                merged.setdefault(name, value)
    return table


def candidate_patterns(domain: str) -> list[tuple[str, str]]:
    """The pattern keys that match `domain` (already lower-case ASCII), in lookup order."""
    keys = [(EXACT, domain), (SELF_AND_SUBDOMAINS, domain)]
    if not domain.startswith("["):  # an address literal has no parent domains
        rest = domain
        while "." in rest:
            rest = rest.split(".", 1)[1]
            keys += [(SUBDOMAINS, rest), (SELF_AND_SUBDOMAINS, rest)]
    keys.append((ALL, ""))
    return keys


class DomainRules:
    """Answers "how do I deliver to this domain from this IP?" from a parsed config."""

    def __init__(self, conf: Block, cache_size: int = CACHE_SIZE) -> None:
        self._named: dict[str, list[_Table]] = {}
        self._star: list[_Table] = []
        templates = {b.args[0].lower(): _table(b, f"template {b.args[0]}")
                     for b in conf.blocks_named("throttle_template")}
        for ip_block in conf.blocks_named("ip_address"):
            for name in ip_block.args:
                table = _table(ip_block, f"ip_address {name}")
                if name == "*":
                    self._star.append(table)
                    continue
                tables = self._named.setdefault(name.lower(), [])
                tables.append(table)
                template = ip_block.directive("throttle_template")
                if template is not None:
                    if template.as_str().lower() not in templates:
                        raise template.error(f"no throttle_template named {template.as_str()!r}")
                    tables.append(templates[template.as_str().lower()])
        self._root = _table(conf, "domain")
        general = conf.block("general")  # merged, if written in pieces
        lifetime = general.get_duration("queue_lifetime") if general is not None else None
        self._default = DomainSettings(queue_lifetime=lifetime)
        self.has_mx_rules = any(key[0] == MX for t in self._all_tables() for key in t)
        self._cached = lru_cache(maxsize=cache_size)(self._compute)

    def _all_tables(self) -> list[_Table]:
        return [t for ts in self._named.values() for t in ts] + self._star + [self._root]

    def settings(self, domain: str, ip_name: str | None = None, mx: str = "") -> DomainSettings:
        """The settings for recipient `domain` sent from `ip_address` `ip_name` (cached).

        `mx` is the domain's MX host name when known (queue-send learns it from
        earlier attempts): `mx:PATTERN` blocks match on it, after the domain
        patterns and before `*`.
        """
        return self._cached(domain, ip_name, mx.lower() if self.has_mx_rules else "")

    def _compute(self, domain: str, ip_name: str | None = None, mx: str = "") -> DomainSettings:
        try:
            name = ascii_domain(domain.strip())
        except ValueError:
            name = domain.strip().lower()
        tables: list[_Table] = []
        if ip_name is not None:
            tables += self._named.get(ip_name.lower(), ())
        tables += self._star
        tables.append(self._root)
        found: dict[str, Any] = {}
        keys = candidate_patterns(name)
        if mx:
            mx_keys = [k for t in tables for k in t if k[0] == MX and fnmatchcase(mx, k[1])]
            keys = keys[:-1] + list(dict.fromkeys(mx_keys)) + keys[-1:]
        for table in tables:
            if not table:
                continue
            for key in keys:
                values = table.get(key)
                if values:
                    for field_name, value in values.items():
                        found.setdefault(field_name, value)
        if not found:
            return self._default
        if "queue_lifetime" not in found:
            found["queue_lifetime"] = self._default.queue_lifetime
        return DomainSettings(**found)

    def cache_info(self) -> Any:
        """Hits and misses of the settings cache (for benchmarks and tests)."""
        return self._cached.cache_info()
