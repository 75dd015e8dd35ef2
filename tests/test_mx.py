"""MX resolution against a local dnslib server: order, fallbacks, errors, cache."""

from __future__ import annotations

import asyncio

import pytest
from dns_server import DnsServer, free_udp_port

from greenarrow.lib.smtp.mx import TEMPORARY_TEXT, MxError, MxHost, MxResolver, no_host_text

ZONE = {
    "example.test": [
        "MX 20 mx2.example.test",
        "MX 10 mx1.example.test",
        "MX 10 mx1b.example.test",
    ],
    "mx1.example.test": "A 127.0.0.2",
    "mx1b.example.test": ["A 127.0.0.3", "AAAA ::1"],
    "mx2.example.test": "A 127.0.0.4",
    "plain.test": ["A 127.0.0.9", "AAAA ::1"],
    "nullmx.test": ["MX 0 .", "A 127.0.0.9"],
    "noaddr.test": "MX 10 nowhere.test",
    "halfbroken.test": ["MX 10 broken.test", "MX 20 mx2.example.test"],
    "allbroken.test": "MX 10 broken.test",
    "short.test": "MX 10 shortmx.test",
    "shortmx.test": "30 A 127.0.0.7",
    "alias.test": "CNAME plain.test",
    "nameonly.test": "TXT hello",
}


def run(coro):
    """Run `coro` with a bound, so a hang fails the test instead of stalling the run."""
    return asyncio.run(asyncio.wait_for(coro, 30))


@pytest.fixture
def dns():
    server = DnsServer(ZONE)
    server.servfail.add("broken.test")
    server.drop.add("silent.test")
    with server:
        yield server


@pytest.fixture
def resolver(dns):
    return MxResolver(dns.nameservers, timeout=5)


def test_preference_order_and_addresses(resolver):
    hosts = run(resolver.hosts("example.test"))
    assert [h.preference for h in hosts] == [10, 10, 20]
    assert {h.name for h in hosts[:2]} == {"mx1.example.test", "mx1b.example.test"}
    assert hosts[2] == MxHost("mx2.example.test", 20, ["127.0.0.4"])
    by_name = {h.name: h.addresses for h in hosts}
    assert by_name["mx1.example.test"] == ["127.0.0.2"]
    assert by_name["mx1b.example.test"] == ["127.0.0.3", "::1"]  # A before AAAA


def test_equal_preferences_are_shuffled(resolver):
    async def orders():
        seen = set()
        for _ in range(60):
            hosts = await resolver.hosts("example.test")
            seen.add(tuple(h.name for h in hosts[:2]))
        return seen

    assert len(run(orders())) == 2


def test_ipv6_off_skips_aaaa(dns):
    hosts = run(MxResolver(dns.nameservers, timeout=5, ipv6=False).hosts("plain.test"))
    assert hosts == [MxHost("plain.test", 0, ["127.0.0.9"])]
    assert dns.count("plain.test", "AAAA") == 0


def test_no_mx_falls_back_to_address(resolver):
    assert run(resolver.hosts("plain.test")) == [MxHost("plain.test", 0, ["127.0.0.9", "::1"])]


def test_domain_is_normalised(resolver):
    assert run(resolver.hosts("Plain.TEST.")) == [MxHost("plain.test", 0, ["127.0.0.9", "::1"])]


def test_cname_is_followed(resolver):
    assert run(resolver.hosts("alias.test"))[0].addresses == ["127.0.0.9", "::1"]


def test_nxdomain_is_permanent(resolver):
    with pytest.raises(MxError) as info:
        run(resolver.hosts("nosuchdomain.test"))
    assert info.value.permanent
    assert info.value.text == no_host_text("nosuchdomain.test")
    assert info.value.text == "Sorry, I couldn't find any host named nosuchdomain.test. (#5.1.2)"


def test_name_without_mail_records_is_permanent(resolver):
    with pytest.raises(MxError) as info:
        run(resolver.hosts("nameonly.test"))
    assert info.value.permanent


def test_null_mx_is_permanent(resolver):
    with pytest.raises(MxError) as info:
        run(resolver.hosts("nullmx.test"))
    assert info.value.permanent
    assert "null MX" in info.value.text


def test_mx_without_addresses_is_permanent(resolver):
    with pytest.raises(MxError) as info:
        run(resolver.hosts("noaddr.test"))
    assert info.value.permanent
    assert info.value.text == no_host_text("noaddr.test")


def test_servfail_is_temporary(dns, resolver):
    dns.servfail.add("example.test")
    with pytest.raises(MxError) as info:
        run(resolver.hosts("example.test"))
    assert not info.value.permanent
    assert info.value.text == TEMPORARY_TEXT == "CNAME lookup failed temporarily. (#4.4.3)"


def test_timeout_is_temporary(dns):
    resolver = MxResolver(dns.nameservers, timeout=0.5)
    with pytest.raises(MxError) as info:
        run(resolver.hosts("silent.test"))
    assert not info.value.permanent


def test_unreachable_server_is_temporary():
    resolver = MxResolver([("127.0.0.1", free_udp_port())], timeout=0.5)
    with pytest.raises(MxError) as info:
        run(resolver.hosts("example.test"))
    assert not info.value.permanent


def test_host_with_broken_dns_is_skipped(resolver):
    hosts = run(resolver.hosts("halfbroken.test"))
    assert [h.name for h in hosts] == ["mx2.example.test"]


def test_only_broken_hosts_is_temporary(resolver):
    with pytest.raises(MxError) as info:
        run(resolver.hosts("allbroken.test"))
    assert not info.value.permanent


def test_address_literal_needs_no_dns(dns, resolver):
    assert run(resolver.hosts("[127.0.0.1]")) == [MxHost("127.0.0.1", 0, ["127.0.0.1"])]
    assert run(resolver.hosts("[IPv6:::1]")) == [MxHost("::1", 0, ["::1"])]
    with pytest.raises(MxError) as info:
        run(resolver.hosts("[not.an.ip]"))
    assert info.value.permanent
    assert dns.count() == 0


def test_cache_answers_second_lookup(dns, resolver):
    async def twice():
        first = await resolver.hosts("example.test")
        queries = dns.count()
        second = await resolver.hosts("example.test")
        return first, queries, second

    first, queries, second = run(twice())
    assert dns.count("example.test", "MX") == 1
    assert dns.count() == queries  # nothing new asked the second time
    assert sorted(h.name for h in first) == sorted(h.name for h in second)


def test_cache_expires_with_ttl():
    now = [1000.0]
    with DnsServer(ZONE) as dns:
        resolver = MxResolver(dns.nameservers, timeout=5, clock=lambda: now[0])
        run(resolver.hosts("short.test"))
        now[0] += 20  # within shortmx.test's TTL of 30
        run(resolver.hosts("short.test"))
        assert dns.count("shortmx.test", "A") == 1
        now[0] += 20  # past it; the MX (TTL 300) is still cached
        run(resolver.hosts("short.test"))
        assert dns.count("shortmx.test", "A") == 2
        assert dns.count("short.test", "MX") == 1


def test_negative_answers_are_cached(dns, resolver):
    for _ in range(3):
        with pytest.raises(MxError):
            run(resolver.hosts("nosuchdomain.test"))
    assert dns.count("nosuchdomain.test", "MX") == 1


def test_concurrent_lookups_share_one_query(dns, resolver):
    async def many():
        return await asyncio.gather(*(resolver.hosts("example.test") for _ in range(20)))

    results = run(many())
    assert all(len(hosts) == 3 for hosts in results)
    assert dns.count("example.test", "MX") == 1
    assert dns.count("mx1.example.test", "A") == 1


def test_cache_is_bounded(dns):
    resolver = MxResolver(dns.nameservers, timeout=5, cache_size=3)

    async def lookups():
        for name in ("plain.test", "example.test", "short.test", "alias.test"):
            await resolver.hosts(name)

    run(lookups())
    assert len(resolver._cache) <= 3


def test_clear_cache(dns, resolver):
    run(resolver.hosts("plain.test"))
    resolver.clear_cache()
    run(resolver.hosts("plain.test"))
    assert dns.count("plain.test", "MX") == 2


def test_route_hosts_resolves_the_host_itself(dns, resolver):
    assert run(resolver.route_hosts("mx2.example.test")) == [
        MxHost("mx2.example.test", 0, ["127.0.0.4"])
    ]
    assert dns.count(qtype="MX") == 0
    assert run(resolver.route_hosts("[127.0.0.8]")) == [MxHost("127.0.0.8", 0, ["127.0.0.8"])]
    with pytest.raises(MxError) as info:
        run(resolver.route_hosts("example.test"))  # MX records only, no address
    assert info.value.permanent
    with pytest.raises(MxError) as info:
        run(resolver.route_hosts("broken.test"))
    assert not info.value.permanent
