"""Per-domain settings: pattern kinds, lookup order, context precedence, routes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from greenarrow.lib.config.conf import Block, ConfError, parse, parse_domain_pattern
from greenarrow.lib.routing.domain_rules import (
    DEFAULT_SETTINGS,
    DomainRules,
    DomainSettings,
    candidate_patterns,
)


def rules(text: str, *, check: bool = True) -> DomainRules:
    return DomainRules(parse(text, "t.conf", check=check))


def route_for(r: DomainRules, domain: str, ip_name: str | None = None) -> str | None:
    route = r.settings(domain, ip_name).smtp_route
    return None if route is None else route[0]


def test_defaults() -> None:
    assert DEFAULT_SETTINGS == DomainSettings(None, False, "opportunistic", None)
    r = DomainRules(Block(""))
    assert r.settings("example.com") == DEFAULT_SETTINGS
    assert r.settings("example.com", "ip-1") == DEFAULT_SETTINGS


def test_seed_examples() -> None:
    r = rules(
        "ip_address * {\n  domain bounce-domain.example.com {\n    smtp_route 10.0.55.2\n  }\n}\n"
        "ip_address * {\n  domain bounce-domain.example.com {\n      reuse_connections yes\n  }\n}\n"
    )
    s = r.settings("bounce-domain.example.com")
    assert s == DomainSettings(("10.0.55.2", 25), True, "opportunistic", None)
    assert r.settings("bounce-domain.example.com", "any-ip") == s
    assert r.settings("other.example.com") == DEFAULT_SETTINGS
    assert r.settings("x.bounce-domain.example.com") == DEFAULT_SETTINGS


def test_all_fields() -> None:
    r = rules(
        "domain example.com {\n"
        "  smtp_route [2001:db8::1]:2525\n"
        "  reuse_connections yes\n"
        "  starttls_use required\n"
        "  queue_lifetime 4h15m\n"
        "}\n"
    )
    assert r.settings("example.com") == DomainSettings(
        ("2001:db8::1", 2525), True, "required", 15300
    )


@pytest.mark.parametrize(
    ("route", "expected"),
    [
        ("10.0.55.2", ("10.0.55.2", 25)),
        ("10.0.55.2:2525", ("10.0.55.2", 2525)),
        ("relay.example.net", ("relay.example.net", 25)),
        ("relay.example.net:587", ("relay.example.net", 587)),
        ("[::1]", ("::1", 25)),
        ("[::1]:26", ("::1", 26)),
    ],
)
def test_routes(route: str, expected: tuple[str, int]) -> None:
    assert rules(f"domain a.com {{ smtp_route {route} }}").settings("a.com").smtp_route == expected


@pytest.mark.parametrize("route", ["a.com:0", "a.com:65536", "a.com:x", "1.2.3.4:", "[::1]:99999"])
def test_bad_route_port_is_a_conf_error_with_line(route: str) -> None:
    text = f"ip_address * {{\n  domain a.com {{\n    smtp_route {route}\n  }}\n}}\n"
    with pytest.raises(ConfError, match=r"^t\.conf:3: smtp_route: bad port"):
        rules(text)  # the schema check
    with pytest.raises(ConfError, match=r"^t\.conf:3: smtp_route: bad port"):
        rules(text, check=False)  # DomainRules itself, on an unchecked tree


PATTERNS = """\
domain example.com         { smtp_route exact }
domain [*.]example.org     { smtp_route self-and-sub }
domain *.example.net       { smtp_route sub-only }
"""


@pytest.mark.parametrize(
    ("domain", "route"),
    [
        ("example.com", "exact"),
        ("EXAMPLE.Com", "exact"),
        ("example.com.", "exact"),
        ("www.example.com", None),
        ("xexample.com", None),
        ("example.org", "self-and-sub"),
        ("a.example.org", "self-and-sub"),
        ("a.b.c.Example.ORG", "self-and-sub"),
        ("badexample.org", None),
        ("example.net", None),
        ("a.example.net", "sub-only"),
        ("a.b.example.net", "sub-only"),
        ("net", None),
        ("", None),
    ],
)
def test_pattern_kinds(domain: str, route: str | None) -> None:
    assert route_for(rules(PATTERNS), domain) == route


def test_star_matches_everything() -> None:
    r = rules("domain * { smtp_route any }")
    for domain in ("a.com", "com", "x.y.z.example", "[1.2.3.4]", ""):
        assert route_for(r, domain) == "any"


def test_pattern_case_insensitive() -> None:
    r = rules("domain [*.]Example.COM { smtp_route hit }")
    assert route_for(r, "WWW.EXAMPLE.com") == "hit"


def test_idn_domains() -> None:
    r = rules('domain "bücher.de" { smtp_route idn }')
    assert route_for(r, "bücher.de") == "idn"
    assert route_for(r, "xn--bcher-kva.de") == "idn"
    assert route_for(r, "BÜCHER.DE") == "idn"


def test_candidate_order_matches_spec() -> None:
    assert candidate_patterns("foo.example.com") == [
        ("exact", "foo.example.com"),
        ("self_and_subdomains", "foo.example.com"),
        ("subdomains", "example.com"),
        ("self_and_subdomains", "example.com"),
        ("subdomains", "com"),
        ("self_and_subdomains", "com"),
        ("all", ""),
    ]
    assert candidate_patterns("[1.2.3.4]") == [
        ("exact", "[1.2.3.4]"),
        ("self_and_subdomains", "[1.2.3.4]"),
        ("all", ""),
    ]


# Each pattern of the spec's lookup list, most specific first.
ORDERED = [
    "foo.example.com",
    "[*.]foo.example.com",
    "*.example.com",
    "[*.]example.com",
    "*.com",
    "[*.]com",
    "*",
]


@pytest.mark.parametrize("winner", range(len(ORDERED)))
def test_lookup_order(winner: int) -> None:
    """With the patterns from `winner` on present, the first of them decides."""
    text = "".join(f"domain {pattern} {{ smtp_route p{i} }}\n" for i, pattern in enumerate(ORDERED))
    # write them in reverse so file order cannot be what decides
    lines = text.splitlines()[winner:]
    r = rules("\n".join(reversed(lines)))
    assert route_for(r, "foo.example.com") == f"p{winner}"


def test_first_match_wins_per_directive() -> None:
    r = rules(
        "domain foo.example.com { reuse_connections yes }\n"
        "domain [*.]example.com { smtp_route parent; reuse_connections no; starttls_use never }\n"
        "domain * { queue_lifetime 1h; starttls_use required }\n"
    )
    assert r.settings("foo.example.com") == DomainSettings(("parent", 25), True, "never", 3600)
    assert r.settings("bar.example.com") == DomainSettings(("parent", 25), False, "never", 3600)
    assert r.settings("other.org") == DomainSettings(None, False, "required", 3600)


def test_multiple_patterns_in_one_block() -> None:
    r = rules("domain a.com, [*.]b.com, *.c.com { smtp_route multi }")
    assert [route_for(r, d) for d in ("a.com", "x.b.com", "b.com", "x.c.com", "c.com")] == [
        "multi",
        "multi",
        "multi",
        "multi",
        None,
    ]


CONTEXTS = """\
domain example.com { smtp_route root; starttls_use never; queue_lifetime 10 }
ip_address * {
    domain [*.]example.com { smtp_route star; reuse_connections yes }
}
ip_address ip-1, IP-2 {
    smtp_source 192.0.2.1
    domain * { smtp_route named }
}
ip_address ip-3 {
    domain other.com { smtp_route named3 }
}
"""


def test_context_precedence() -> None:
    r = rules(CONTEXTS)
    # ip_address NAME beats ip_address *, even with a less specific pattern
    assert r.settings("example.com", "ip-1") == DomainSettings(("named", 25), True, "never", 10)
    assert r.settings("example.com", "ip-2") == r.settings("example.com", "ip-1")
    assert route_for(r, "example.com", "Ip-2") == "named"  # names are case-insensitive
    # ip_address * beats the top level
    assert r.settings("example.com") == DomainSettings(("star", 25), True, "never", 10)
    assert r.settings("example.com", "unknown-ip") == r.settings("example.com")
    # a named block without a match falls back to * and the top level
    assert r.settings("example.com", "ip-3") == r.settings("example.com")
    assert route_for(r, "other.com", "ip-3") == "named3"
    assert route_for(r, "other.com") is None
    assert route_for(r, "anything.org", "ip-1") == "named"
    assert route_for(r, "anything.org") is None


def test_general_queue_lifetime_is_the_default() -> None:
    r = rules(
        "general { queue_lifetime 2d }\n"
        "domain slow.com { queue_lifetime 1w }\n"
        "domain fast.com { reuse_connections yes }\n"
    )
    assert r.settings("slow.com").queue_lifetime == 604800
    assert r.settings("fast.com") == DomainSettings(None, True, "opportunistic", 172800)
    assert r.settings("other.com") == DomainSettings(queue_lifetime=172800)


def test_cache() -> None:
    r = DomainRules(parse(CONTEXTS, "t.conf"), cache_size=2)
    first = r.settings("example.com", "ip-1")
    assert r.settings("example.com", "ip-1") is first
    info = r.cache_info()
    assert (info.hits, info.misses, info.maxsize) == (1, 1, 2)
    for domain in ("a.com", "b.com", "c.com"):
        r.settings(domain)
    assert r.cache_info().currsize == 2
    assert r.settings("example.com", "ip-1") == first


def test_settings_are_frozen() -> None:
    s = rules("domain * { reuse_connections yes }").settings("x.com")
    with pytest.raises(AttributeError):
        s.reuse_connections = False  # type: ignore[misc]
    assert hash(s) == hash(DomainSettings(reuse_connections=True))


LABELS = st.sampled_from(["a", "b", "example", "com", "net"])
DOMAINS = st.lists(LABELS, min_size=1, max_size=4).map(".".join)
KINDS = st.sampled_from(["{}", "[*.]{}", "*.{}", "*"])


def matches(pattern: str, domain: str) -> bool:
    """The pattern semantics written plainly, to check the indexed lookup against."""
    if pattern == "*":
        return True
    if pattern.startswith("[*.]"):
        base = pattern[4:]
        return domain == base or domain.endswith("." + base)
    if pattern.startswith("*."):
        return domain.endswith(pattern[1:])
    return domain == pattern


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(KINDS, DOMAINS), min_size=1, max_size=6, unique=True), DOMAINS)
def test_lookup_agrees_with_plain_matching(specs: list[tuple[str, str]], domain: str) -> None:
    patterns = list(dict.fromkeys(kind.format(base) for kind, base in specs))
    text = "".join(f"domain {p} {{ smtp_route r{i} }}\n" for i, p in enumerate(patterns))
    got = route_for(rules(text), domain)
    matching = [i for i, p in enumerate(patterns) if matches(p, domain)]
    assert (got is None) == (not matching)
    if matching:
        # the winner matches, and no matching pattern is more specific
        order = {key: n for n, key in enumerate(candidate_patterns(domain))}
        rank = {i: order[parse_domain_pattern(patterns[i])] for i in matching}
        assert got == f"r{min(matching, key=rank.__getitem__)}"


def test_mx_patterns_match_the_learned_mx_host() -> None:
    """`mx:*.yahoodns.net` applies to any domain whose MX host matches, after the
    domain's own patterns and before `*`; without a known MX it does not apply."""
    rules = DomainRules(parse(
        "ip_address * {\n"
        "  domain mx:*.yahoodns.net {\n    max_concurrent_connections 3\n    reuse_connections yes\n  }\n"
        "  domain aol.com {\n    max_concurrent_connections 9\n  }\n"
        "  domain * {\n    max_messages_per_hour 50\n  }\n"
        "}\n", "t.conf"))
    yahoo_mx = "mta5.am0.yahoodns.net"
    aol = rules.settings("aol.com", None, yahoo_mx)
    assert aol.max_concurrent_connections == 9  # the domain's own rule first
    assert aol.reuse_connections is True  # then the MX rule
    other = rules.settings("ymail.com", None, yahoo_mx)
    assert other.max_concurrent_connections == 3
    assert other.throttle_rule == "ip_address *:mx:*.yahoodns.net"
    assert other.max_messages_per_hour == 50
    assert rules.settings("ymail.com").max_concurrent_connections == 0
    assert rules.settings("ymail.com", None, "mx.example.net").max_concurrent_connections == 0
    with pytest.raises(ConfError):
        parse("domain mx:bad/pattern {\n}\n", "t.conf")
