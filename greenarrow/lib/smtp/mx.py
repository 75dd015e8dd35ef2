"""MX resolution for the `remote` worker: which hosts, in which order, at which addresses.

qmail-remote resolves the recipient domain's MX records on every delivery
attempt. At thousands of attempts per second that is thousands of DNS queries
for the same few big domains, so this module keeps its own TTL cache (one per
`MxResolver`) and lets concurrent lookups of the same name share one query.

Outcomes follow qmail-remote:

* MX records -> hosts sorted by preference, equal preferences shuffled so the
  load spreads over them (RFC 5321 section 5.1);
* no MX record -> the domain itself as an implicit MX of preference 0;
* NXDOMAIN, or no host that has an address -> permanent
  "Sorry, I couldn't find any host named {domain}. (#5.1.2)";
* SERVFAIL, timeouts, unreachable name servers -> temporary
  "CNAME lookup failed temporarily. (#4.4.3)" (qmail's wording for a
  temporary DNS error);
* a null MX (RFC 7505, `MX 0 .` as the only record) -> permanent
  "Sorry, {domain} does not accept mail (null MX). (#5.1.10)";
* an address literal `[127.0.0.1]` (or `[IPv6:::1]`) -> itself, no DNS.

One MX host whose own address lookup fails temporarily is skipped as long as
another host has an address; the whole lookup is temporary only when no
host has an address and at least one lookup failed temporarily. qmail gives up
on the first temporary error; skipping is kinder to domains whose backup MX
sits in a broken zone.

Addresses of a host list its A records before its AAAA records.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

__all__ = ["MxError", "MxHost", "MxResolver", "TEMPORARY_TEXT", "no_host_text"]

TEMPORARY_TEXT = "CNAME lookup failed temporarily. (#4.4.3)"

MAX_TTL = 3600.0
"""Positive answers are kept for their TTL, at most this long."""
MIN_TTL = 5.0
"""...and at least this long, so a zero-TTL zone does not cost a query per attempt."""
NEGATIVE_TTL = 60.0
"""NXDOMAIN and "no such record" are kept this long (or the SOA minimum, if shorter)."""
FAILURE_TTL = 2.0
"""Temporary failures are kept this long: a broken zone must not cost a query per attempt."""


def no_host_text(domain: str) -> str:
    """qmail-remote's permanent text for a domain without a usable host."""
    return f"Sorry, I couldn't find any host named {domain}. (#5.1.2)"


def null_mx_text(domain: str) -> str:
    """The permanent text for a domain that publishes a null MX (RFC 7505)."""
    return f"Sorry, {domain} does not accept mail (null MX). (#5.1.10)"


@dataclass(slots=True)
class MxHost:
    """One mail exchanger: its name, MX preference and addresses in the order to try them."""

    name: str
    preference: int
    addresses: list[str] = field(default_factory=list)


class MxError(Exception):
    """An MX lookup that ended without hosts; `permanent` tells failure from deferral."""

    def __init__(self, permanent: bool, text: str) -> None:
        super().__init__(text)
        self.permanent = permanent
        self.text = text

    def __repr__(self) -> str:
        return f"MxError(permanent={self.permanent!r}, text={self.text!r})"


# Cached outcomes besides a tuple of records (an empty tuple means "no such record").
_NXDOMAIN = "nxdomain"
_TEMPFAIL = "tempfail"

_Outcome = tuple | str
_MX = dns.rdatatype.MX
_A = dns.rdatatype.A
_AAAA = dns.rdatatype.AAAA


class MxResolver:
    """Resolves domains to ordered `MxHost` lists, with a per-instance TTL cache.

    `nameservers` None reads the system's resolv.conf; otherwise it is a list of
    (ip, port) pairs, which is how tests point the resolver at a local server.
    `timeout` bounds one whole lookup (all retries of one query).
    """

    def __init__(
        self,
        nameservers: list[tuple[str, int]] | None = None,
        timeout: float = 10.0,
        *,
        ipv6: bool = True,
        cache_size: int = 10000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if nameservers is None:
            resolver = dns.asyncresolver.Resolver()
        else:
            resolver = dns.asyncresolver.Resolver(configure=False)
            # Nameserver objects carry their own port, so servers may differ.
            resolver.nameservers = [
                dns.nameserver.Do53Nameserver(ip, port) for ip, port in nameservers
            ]
        resolver.cache = None  # our own cache below also keeps negative answers
        resolver.lifetime = timeout
        # Retry a lost UDP packet well before the whole lookup times out.
        resolver.timeout = min(2.0, timeout)
        self._resolver = resolver
        self._timeout = timeout
        self._ipv6 = ipv6
        self._cache_size = max(1, cache_size)
        self._clock = clock
        self._cache: dict[tuple[str, int], tuple[float, _Outcome]] = {}
        self._inflight: dict[tuple[str, int], asyncio.Task[tuple[float, _Outcome]]] = {}

    def clear_cache(self) -> None:
        """Forget every cached answer (tests, and a reload of the DNS configuration)."""
        self._cache.clear()

    async def hosts(self, domain: str) -> list[MxHost]:
        """The hosts to try for `domain`, most preferred first; raises `MxError`."""
        domain = domain.strip().rstrip(".").lower()
        if domain.startswith("[") and domain.endswith("]"):
            return [_literal(domain)]
        if not domain:
            raise MxError(True, no_host_text(domain))
        try:
            dns.name.from_text(domain)
        except dns.exception.DNSException:
            raise MxError(True, no_host_text(domain)) from None

        mx = await self._lookup(domain, _MX)
        if mx == _NXDOMAIN:
            raise MxError(True, no_host_text(domain))
        if mx == _TEMPFAIL:
            raise MxError(False, TEMPORARY_TEXT)
        assert isinstance(mx, tuple)
        if not mx:
            exchanges: list[tuple[int, str]] = [(0, domain)]
        else:
            exchanges = [rec for rec in mx if rec[1]]
            if not exchanges:
                # Only null MX records ("MX 0 ."): the domain takes no mail.
                raise MxError(True, null_mx_text(domain))
            # Sort by preference, shuffling within a preference (random key, stable tie-break).
            exchanges = sorted(exchanges, key=lambda rec: (rec[0], random.random()))

        results = await asyncio.gather(*(self._addresses(name) for _, name in exchanges))
        hosts: list[MxHost] = []
        temporary = False
        for (preference, name), (addresses, temp) in zip(exchanges, results, strict=True):
            temporary = temporary or temp
            if addresses:
                hosts.append(MxHost(name, preference, addresses))
        if hosts:
            return hosts
        if temporary:
            raise MxError(False, TEMPORARY_TEXT)
        raise MxError(True, no_host_text(domain))

    async def route_hosts(self, host: str) -> list[MxHost]:
        """The one host of an explicit route (`smtp_route`): its own addresses, no MX lookup.

        Same errors and cache as `hosts`: no address -> permanent, a temporary
        DNS error and no address -> temporary.
        """
        host = host.strip().rstrip(".").lower()
        if host.startswith("[") and host.endswith("]"):
            return [_literal(host)]
        if not host:
            raise MxError(True, no_host_text(host))
        try:
            dns.name.from_text(host)
        except dns.exception.DNSException:
            raise MxError(True, no_host_text(host)) from None
        addresses, temporary = await self._addresses(host)
        if addresses:
            return [MxHost(host, 0, addresses)]
        if temporary:
            raise MxError(False, TEMPORARY_TEXT)
        raise MxError(True, no_host_text(host))

    async def _addresses(self, name: str) -> tuple[list[str], bool]:
        """A then AAAA addresses of `name`, and whether a lookup failed temporarily."""
        if self._ipv6:
            a, aaaa = await asyncio.gather(self._lookup(name, _A), self._lookup(name, _AAAA))
            outcomes: tuple[_Outcome, ...] = (a, aaaa)
        else:
            outcomes = (await self._lookup(name, _A),)
        addresses: list[str] = []
        temporary = False
        for outcome in outcomes:
            if isinstance(outcome, tuple):
                addresses.extend(outcome)
            elif outcome == _TEMPFAIL:
                temporary = True
        return addresses, temporary

    async def _lookup(self, name: str, rdtype: int) -> _Outcome:
        """One (name, type) answer, from the cache, a query already on its way, or a new query."""
        key = (name, rdtype)
        entry = self._cache.get(key)
        now = self._clock()
        if entry is not None:
            if entry[0] > now:
                return entry[1]
            del self._cache[key]
        task = self._inflight.get(key)
        if task is None or task.get_loop() is not asyncio.get_running_loop():
            # (a task of another, finished event loop would never complete here)
            task = asyncio.ensure_future(self._query(name, rdtype))
            self._inflight[key] = task
            task.add_done_callback(lambda _t: self._inflight.pop(key, None))
        # shield: one cancelled caller must not cancel the query the others wait for
        ttl, outcome = await asyncio.shield(task)
        if key not in self._cache:
            if len(self._cache) >= self._cache_size:
                # Evict the oldest insertion: O(1), and old entries are the likeliest to expire.
                del self._cache[next(iter(self._cache))]
            self._cache[key] = (self._clock() + ttl, outcome)
        return outcome

    async def _query(self, name: str, rdtype: int) -> tuple[float, _Outcome]:
        """Ask the name servers; returns (seconds to cache, outcome) and never raises."""
        try:
            answer = await self._resolver.resolve(
                name, rdtype, search=False, raise_on_no_answer=False, lifetime=self._timeout
            )
        except dns.resolver.NXDOMAIN:
            return NEGATIVE_TTL, _NXDOMAIN
        except (dns.resolver.YXDOMAIN, dns.name.NameTooLong):
            return NEGATIVE_TTL, _NXDOMAIN
        except (dns.exception.DNSException, OSError, ValueError):
            # SERVFAIL/REFUSED (NoNameservers), timeouts, sockets that would not open
            return FAILURE_TTL, _TEMPFAIL
        ttl = float(answer.chaining_result.minimum_ttl)
        rrset = answer.rrset
        if rrset is None:
            return min(max(ttl, MIN_TTL), NEGATIVE_TTL), ()
        ttl = min(max(ttl, MIN_TTL), MAX_TTL)
        if rdtype == _MX:
            # The root exchange of a null MX becomes "" (and is filtered out by `hosts`).
            return ttl, tuple(
                (int(r.preference), r.exchange.to_text().rstrip(".").lower()) for r in rrset
            )
        return ttl, tuple(r.address for r in rrset)


def _literal(domain: str) -> MxHost:
    """The host of an address literal such as `[127.0.0.1]` or `[IPv6:::1]` (RFC 5321 4.1.3)."""
    inner = domain[1:-1]
    if inner[:5].lower() == "ipv6:":
        inner = inner[5:]
    try:
        address = str(ipaddress.ip_address(inner))
    except ValueError:
        raise MxError(True, no_host_text(domain)) from None
    return MxHost(address, 0, [address])
