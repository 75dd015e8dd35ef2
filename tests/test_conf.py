"""greenarrow.conf: syntax, values, schema errors with line numbers, the check command."""

from __future__ import annotations

import re
import string
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from greenarrow.bin.greenarrow_config import main
from greenarrow.lib.config import conf
from greenarrow.lib.config.conf import (
    SCHEMA,
    Block,
    ConfError,
    Directive,
    dumps,
    load,
    parse,
    parse_bool,
    parse_domain_pattern,
    parse_duration,
    parse_host_port,
    parse_int,
    quote,
)
from greenarrow.lib.core.paths import Root

SHIPPED = Path(__file__).resolve().parent.parent / "control" / "greenarrow.conf"

SEED_ROUTE = """ip_address * {
  domain bounce-domain.example.com {
    smtp_route 10.0.55.2
  }
}
"""

SEED_REUSE = """ip_address * {
  domain bounce-domain.example.com {
      reuse_connections yes
  }
}
"""


def raw(text: str) -> Block:
    """Parse without the schema: syntax tests use made-up names."""
    return parse(text, "t.conf", check=False)


def one_value(text: str) -> str:
    """The single argument of the single directive in `x <text>`."""
    root = raw("x " + text)
    assert len(root.directives) == 1
    assert root.directives[0].args and len(root.directives[0].args) == 1
    return root.directives[0].args[0]


def error_of(text: str, *, check: bool = True) -> ConfError:
    with pytest.raises(ConfError) as info:
        parse(text, "t.conf", check=check)
    return info.value


def assert_error(text: str, line: int, pattern: str, *, check: bool = True) -> None:
    err = error_of(text, check=check)
    assert err.line == line, str(err)
    assert str(err).startswith(f"t.conf:{line}: "), str(err)
    assert re.search(pattern, err.what), str(err)


# --------------------------------------------------------------------------
# Seeds


def test_seed_smtp_route_example() -> None:
    root = parse(SEED_ROUTE, "greenarrow.conf")
    (ip,) = root.blocks
    assert (ip.name, ip.args, ip.line) == ("ip_address", ["*"], 1)
    (dom,) = ip.blocks
    assert (dom.name, dom.args, dom.line) == ("domain", ["bounce-domain.example.com"], 2)
    assert dom.directives == [Directive("smtp_route", ["10.0.55.2"], 3)]
    assert dom.directives[0].line == 3
    assert dom.directives[0].as_host_port() == ("10.0.55.2", 25)


def test_seed_reuse_connections_example() -> None:
    root = parse(SEED_REUSE, "greenarrow.conf")
    d = root.blocks[0].blocks[0].directive("reuse_connections")
    assert d is not None and d.as_bool() is True and d.line == 3


def test_spec_examples() -> None:
    root = parse(
        "general { system_max_smtp_connections 5000 }\n"
        "domain yahoo.com { reuse_connections yes }\n"
        "ip_address ipaddr-1, ipaddr-2 { smtp_source 10.0.0.1 }\n",
        "x",
    )
    general = root.block("general")
    assert general is not None and general.get_int("system_max_smtp_connections") == 5000
    assert root.blocks[1].args == ["yahoo.com"]
    assert root.blocks[2].args == ["ipaddr-1", "ipaddr-2"]


# --------------------------------------------------------------------------
# Strings


@pytest.mark.parametrize(
    "text",
    ["abc", "A-Z_0+9.*/[x]$:%|@", "10.0.55.2", "[*.]example.com", "[2001:db8::1]:25", "a;b"],
)
def test_bare_strings(text: str) -> None:
    assert one_value(text) == text


@pytest.mark.parametrize(
    ("source", "value"),
    [
        (r'"plain"', "plain"),
        (r'""', ""),
        (r'"with space, comma # hash { brace }"', "with space, comma # hash { brace }"),
        (r'"\""', '"'),
        (r'"\\"', "\\"),
        (r'"\/"', "/"),
        (r'"\b\f\n\r\t"', "\b\f\n\r\t"),
        (r'"\u00e9\u00E9"', "éé"),
        (r'"\ud83d\ude00"', "\U0001f600"),
        ('"raw é 😀\ttab"', "raw é 😀\ttab"),
        ("`back \\n ticks`", "back \\n ticks"),
        ('`a"b`', 'a"b'),
        ("``", ""),
    ],
)
def test_quoted_strings(source: str, value: str) -> None:
    assert one_value(source) == value


def test_backticks_span_lines_and_keep_line_numbers() -> None:
    root = raw("a `one\ntwo\nthree`\nb 1\n")
    assert root.directives[0].args == ["one\ntwo\nthree"]
    assert [d.line for d in root.directives] == [1, 4]


@pytest.mark.parametrize(
    ("text", "line", "pattern"),
    [
        ('x "abc', 1, "unterminated"),
        ('x 1\nx "abc\n"', 2, "unterminated"),
        ('x "abc\\', 1, "unterminated"),
        ("\n\nx `abc\n\n", 3, "unterminated"),
        (r'x "\q"', 1, r"bad escape '\\q'"),
        (r'x "\x41"', 1, "bad escape"),
        (r'x "\u12"', 1, "4 hex digits"),
        (r'x "\u12g4"', 1, "4 hex digits"),
        (r'x "\ud83d"', 1, "surrogate"),
        (r'x "\ud83d\u0041"', 1, "surrogate"),
        (r'x "\ude00"', 1, "surrogate"),
        ("\nx a#b", 2, "'#' touches a value"),
        ('x "a"#b', 1, "'#' touches a value"),
        ('x "a""b"', 1, "missing space"),
        ('x a"b"', 1, "missing space"),
        ('x "a"b', 1, "missing space"),
        ("x 'single'", 1, "unexpected character"),
        ("x café", 1, "unexpected character 'é'"),
        ("x a=b", 1, "unexpected character '='"),
        ("x \x00", 1, "unexpected character"),
    ],
)
def test_string_errors(text: str, line: int, pattern: str) -> None:
    assert_error(text, line, pattern, check=False)


# --------------------------------------------------------------------------
# Comments, terminators, layout


def test_comments() -> None:
    root = raw(
        "# a comment line\n"
        "   \t# indented comment\n"
        "a 1 # trailing comment\n"
        "b { # after a brace\n"
        "  c 2;# after a terminator\n"
        "} # after a closing brace\n"
        'd "# not a comment" `#nor this`\n'
        "#\n"
    )
    assert root.directives == [
        Directive("a", ["1"]),
        Directive("d", ["# not a comment", "#nor this"]),
    ]
    assert root.blocks[0].directives == [Directive("c", ["2"])]
    assert root.blocks[0].line == 4
    assert root.directives[1].line == 7


def test_semicolons() -> None:
    root = raw('a 1; b 2;; c 3\nd a;b\ne ;f 4\ng "q";h\n;;\ni 1;;2;\n')
    assert [(d.name, d.args) for d in root.directives] == [
        ("a", ["1"]),
        ("b", ["2"]),
        ("c", ["3"]),
        ("d", ["a;b"]),
        ("e", []),
        ("f", ["4"]),
        ("g", ["q"]),
        ("h", []),
        ("i", ["1;;2"]),  # a ';' between other characters is part of the value
    ]


def test_one_line_blocks_and_nesting() -> None:
    root = raw("a { b { c { d 1; e 2 } f 3 } }\n")
    a = root.blocks[0]
    b = a.blocks[0]
    c = b.blocks[0]
    assert (a.name, b.name, c.name) == ("a", "b", "c")
    assert c.directives == [Directive("d", ["1"]), Directive("e", ["2"])]
    assert b.directives == [Directive("f", ["3"])]


def test_block_args_commas_and_continuations() -> None:
    for text in (
        "ip a, b, c {}",
        "ip a,b,c {}",
        "ip a ,b , c{}",
        "ip a,\n  b,\n\n  c\n{\n}",
        'ip a, "b", `c` {}',
        "ip a b c {}",
    ):
        assert raw(text).blocks == [Block("ip", ["a", "b", "c"])], text


def test_brace_on_next_line_opens_the_block() -> None:
    root = raw("general\n\n{\n  a 1\n}\nb 2\n")
    assert root.blocks[0].name == "general" and root.blocks[0].line == 1
    assert root.blocks[0].directives[0].line == 4
    assert root.directives == [Directive("b", ["2"])]


def test_star_block_arg() -> None:
    assert raw("ip_address * {}").blocks[0].args == ["*"]


def test_crlf_bom_and_empty_files() -> None:
    root = raw("\ufeffa 1\r\nb {\r\n c 2\r\n}\r\n")
    assert root.directives == [Directive("a", ["1"])]
    assert root.blocks[0].directives[0].line == 3
    assert raw("") == Block("")
    assert raw("\n\n  # only comments\n") == Block("")


def test_line_numbers() -> None:
    root = raw("\n\na 1\n  b {\n\n c 2\n }\n")
    assert root.directives[0].line == 3
    assert root.blocks[0].line == 4
    assert root.blocks[0].directives[0].line == 6


@pytest.mark.parametrize(
    ("text", "line", "pattern"),
    [
        ("a {\n b 1\n", 1, "never closed"),
        ("a {\n b {\n }\n", 1, "never closed"),
        ("a {\n b {\n c 1\n", 2, "never closed"),
        ("a 1\n}\n", 2, "unexpected '}'"),
        ("a {}\n}", 2, "unexpected '}'"),
        ("\n{ a 1 }", 2, "'{' without a block name"),
        ("a 1;\n{ }", 2, "'{' without a block name"),
        ("a 1,", 1, "',' must be followed by a value"),
        ("a 1, {}", 1, "',' must be followed by a value"),
        ("a 1,,2", 1, "unexpected ','"),
        ("a , 1", 1, "unexpected ','"),
        (", a", 1, "unexpected ','"),
        ('"a" 1', 1, "cannot be quoted"),
        ("1a 2", 1, "bad directive name '1a'"),
        ("a.b 2", 1, "bad directive name"),
        ("{" * 40 + "}" * 40, 1, "without a block name"),
        ("a {" * 40 + "}" * 40, 1, "nested more than"),
    ],
)
def test_structure_errors(text: str, line: int, pattern: str) -> None:
    assert_error(text, line, pattern, check=False)


# --------------------------------------------------------------------------
# Values


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90),
        ("0", 0),
        ("300s", 300),
        ("25h", 90000),
        ("4h15m", 15300),
        ("1d", 86400),
        ("1w", 604800),
        ("1w2d3h4m5s", 604800 + 2 * 86400 + 3 * 3600 + 4 * 60 + 5),
        ("1d12h", 129600),
        ("90m", 5400),
        ("007s", 7),
    ],
)
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text", ["", "h", "4x", "1.5h", "-1", "-1h", "15m4h", "1h1h", "4H", "4h 15m", "1h30", "s"]
)
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="bad duration"):
        parse_duration(text)


def test_booleans_and_integers() -> None:
    assert parse_bool("yes") is True
    assert parse_bool("no") is False
    for bad in ("Yes", "true", "1", "", "NO"):
        with pytest.raises(ValueError, match="expected yes or no"):
            parse_bool(bad)
    assert parse_int("5000") == 5000
    assert parse_int("0") == 0
    for bad in ("-1", "1_000", "+1", "1.0", "", "one", "1e3"):
        with pytest.raises(ValueError, match="non-negative integer"):
            parse_int(bad)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.55.2", ("10.0.55.2", 25)),
        ("10.0.55.2:2525", ("10.0.55.2", 2525)),
        ("mx.example.com", ("mx.example.com", 25)),
        ("MX.Example.com.:587", ("MX.Example.com", 587)),
        ("localhost:1", ("localhost", 1)),
        ("[2001:db8::1]", ("2001:db8::1", 25)),
        ("[2001:DB8:0::1]:65535", ("2001:db8::1", 65535)),
    ],
)
def test_host_port(text: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(text) == expected


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("host:0", "bad port"),
        ("host:65536", "bad port"),
        ("host:", "bad port"),
        ("host:abc", "bad port"),
        ("host:-1", "bad port"),
        ("[::1]:", "bad port"),
        ("[::1]:99999", "bad port"),
        ("2001:db8::1", "in brackets"),
        ("[2001:db8::1", "missing"),
        ("[1.2.3.4]", "bad IPv6"),
        ("[::1]x", "expected"),
        ("10.0.55", "bad host"),
        ("-bad-.com", "bad host"),
        ("", "bad host"),
        ("a..b", "bad host"),
    ],
)
def test_bad_host_port(text: str, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        parse_host_port(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("example.com", ("exact", "example.com")),
        ("Example.COM.", ("exact", "example.com")),
        ("[*.]example.com", ("self_and_subdomains", "example.com")),
        ("*.example.com", ("subdomains", "example.com")),
        ("*.com", ("subdomains", "com")),
        ("*", ("all", "")),
        ("bücher.de", ("exact", "xn--bcher-kva.de")),
    ],
)
def test_domain_patterns(text: str, expected: tuple[str, str]) -> None:
    assert parse_domain_pattern(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "*.", "[*.]", "**.com", "a.*.com", "*example.com", "a..b", "[*]x"],
)
def test_bad_domain_patterns(text: str) -> None:
    with pytest.raises(ValueError, match="bad domain pattern"):
        parse_domain_pattern(text)


def test_typed_accessors_report_file_and_line() -> None:
    root = raw("a 1\nb maybe\nc 4h15m\nd x:0\ne 1 2\n")
    assert root.get_int("a") == 1
    assert root.get_duration("c") == 15300
    assert root.get_str("missing", "dflt") == "dflt"
    assert root.get_bool("missing") is None
    with pytest.raises(ConfError, match=r"^t\.conf:2: b: expected yes or no"):
        root.get_bool("b")
    d = root.directive("d")
    assert d is not None
    with pytest.raises(ConfError, match=r"^t\.conf:4: d: bad port"):
        d.as_host_port()
    with pytest.raises(ConfError, match=r"^t\.conf:5: e takes 1 argument, got 2"):
        root.get_str("e")
    a = root.directive("a")
    assert a is not None
    with pytest.raises(ConfError, match="expected x or y"):
        a.as_choice("x", "y")


# --------------------------------------------------------------------------
# Schema


FULL = """\
general {
    system_max_smtp_connections 5000
    queue_lifetime 7d
    events_database_url "postgresql://greenarrow:pw@db1.example.com:5432,db2.example.com/ga"
    postgres_max_connections 80
    postgres_listen 127.0.0.1:5432
    postgres_bin_dir /usr/lib/postgresql/16/bin
    server_id mta1
    record_events delivery_attempt, engine_open
}
domain [*.]example.org, *.example.net {
    queue_lifetime 1h
}
ip_address * {
    domain bounce-domain.example.com {
        smtp_route 10.0.55.2
        reuse_connections yes
        starttls_use never
        queue_lifetime 90
    }
}
ip_address ipaddr-1, "ip addr 2" {
    smtp_source 2001:db8::7
    hostname mta1.example.com
    domain * { starttls_use required }
}
mail_class newsletter {
    listid newsletter
    virtual_mta ipaddr-1
    track_clicks_and_opens yes
    url_domain links.example.com
    bounce_address bounces@example.com
    list_unsubscribe no
    statistic_report_grouping "by list"
    track_text_links no
    handle_bounce_and_fbl yes
    bad_address_suppression yes
}
mail_class transactional {}
general {
    default_virtual_mta ipaddr-1
    default_mail_class transactional
    process_x_job_header yes
    process_x_virtual_mta_header no
    default_event_tracking_metadata_storage stateless
    simplemh_validate_bounce_address no
    simplemh_bad_address_dev_null_domain badaddress.discardallmail.drh.net
}
ip_address ipaddr-1 {
    id 7
    throttle_template standard
}
relay_server smarthost {
    relay_host relay.example.com:587
    smtp_auth_username user
    smtp_auth_password "secret"
    smtp_source 192.0.2.1
    hostname relay-client.example.com
    max_concurrent_connections 5
    max_messages_per_hour 1000
}
routing_rule mixed {
    route ipaddr-1 3
    route smarthost 1
    randomization email_address_constant
}
throttle_template standard {
    domain [*.]yahoo.com {
        max_concurrent_connections 10
        max_messages_per_hour 5000
        throttle_program careful
        reuse_connections_max_messages 50
        reuse_connections_idle_timeout 30s
    }
}
throttle_program careful {
    deferral_rate 50
    failure_rate 30
    backoff_max_concurrent_connections 50%
    backoff_max_messages_per_hour 100
    return_after 1h
    window 5m
    min_attempts 20
}
incoming_email_domain bounces.example.com {
    bounce_mailbox return
    spam_complaint_mailbox fbl
    unsubscribe_mailbox unsub
    mailbox postmaster
}
lite_bounce_processor_address lite-bounces@bounces.example.com
lite_fbl_processor_address lite-fbl@bounces.example.com
event_delivery_destination primary {
    event_delivery_url "https://app.example.com/greenarrow-events"
    event_delivery_events all
    event_delivery_max_batch_size 100
    event_delivery_timeout 30s
    event_delivery_signing_secret "whsec_MDEyMzQ1Njc4OWFiY2RlZg=="
    event_delivery_new_destination leave_in_queue
}
event_delivery_destination archive {
    event_delivery_logfile events-archive
    event_delivery_events delivery_attempt bounce_all
}
lite_fbl_processor_headers X-Campaign, Message-ID
lite_bounce_processor_include_report_text no
lite_fbl_processor_include_report_text yes
"""


def test_every_known_entry_is_accepted() -> None:
    root = parse(FULL, "t.conf")
    used = {d.name for b in root.walk() for d in b.directives} | {
        b.name for b in root.walk() if b.name
    }
    assert used == {rule.name for rule in SCHEMA}


@pytest.mark.parametrize(
    ("text", "line", "pattern"),
    [
        ("general {\n  bogus 1\n}", 2, "unknown directive bogus in general block"),
        ("\nbogus 1", 2, "unknown directive bogus at top level"),
        ("bogus {\n}", 1, "unknown block bogus at top level"),
        ("general {}\nsmtp_route 1.2.3.4", 2, r"not allowed at top level \(allowed in: domain\)"),
        ("general {\n smtp_route 1.2.3.4 }", 2, "not allowed in general block"),
        ("mail_class m {\n domain x.com {} }", 2, "domain is not allowed in mail_class block"),
        ("ip_address * {\n domain x.com {\n  domain y.com {} } }", 3, "not allowed in domain"),
        ("general 1", 1, "general is a block"),
        ("domain x.com {\n smtp_route { } }", 2, "smtp_route is a directive, not a block"),
        ("general x {}", 1, "takes no arguments, got 1"),
        ("domain {}", 1, r"takes at least 1 argument \(PATTERN"),
        ("mail_class a b {}", 1, r"takes 1 argument \(NAME\), got 2"),
        ("general {\n system_max_smtp_connections\n}", 2, "takes 1 argument"),
        (
            "general {\n system_max_smtp_connections 1 2 }",
            2,
            r"takes 1 argument \(INTEGER\), got 2",
        ),
        ("general {\n system_max_smtp_connections -5 }", 2, "non-negative integer"),
        ("general {\n\n queue_lifetime 4x }", 3, "queue_lifetime: bad duration"),
        ("domain a.com {\n reuse_connections maybe }", 2, "reuse_connections: expected yes or no"),
        ("domain a.com {\n starttls_use always }", 2, "never or opportunistic or required"),
        ("domain a.com {\n smtp_route 1.2.3.4:0 }", 2, "smtp_route: bad port"),
        ("domain a.com {\n smtp_route 1.2.3.4:70000 }", 2, "bad port '70000'"),
        ("domain a.com {\n smtp_route [::1 }", 2, "missing"),
        ("domain *.*.com {}", 1, "bad domain pattern"),
        ("ip_address *, a {}", 1, "'\\*' cannot be listed with other names"),
        ("ip_address a@b {}", 1, "bad name"),
        ("ip_address 123 {}", 1, "not an integer"),
        ("ip_address a {\n smtp_source 1.2.3 }", 2, "bad IP address"),
        ("ip_address a {\n hostname 'x' }", 2, "unexpected character"),
        ('ip_address a {\n hostname "a b" }', 2, "bad host name"),
        ('mail_class " m" {}', 1, "bad name"),
        ("mail_class m {\n list_unsubscribe 1 }", 2, "expected yes or no"),
        ("general {}\n\ngeneral {\n bogus 1 }", 4, "unknown directive bogus"),
        (
            "general { queue_lifetime 1 }\n\ngeneral {\n queue_lifetime 2 }",
            4,
            r"duplicate directive queue_lifetime in general \(first at line 1\)",
        ),
        ("general {\n queue_lifetime 1\n queue_lifetime 2 }", 3, r"duplicate directive .*line 2"),
        ("\nsmtp_route 1.2.3.4", 2, "not allowed at top level"),
        (
            "domain a.com { smtp_route x }\ndomain A.com. {\n smtp_route y }",
            3,
            r"duplicate directive smtp_route in domain A.com. \(first at line 1\)",
        ),
        (
            "domain a.com, b.com { reuse_connections yes }\ndomain b.com { reuse_connections no }",
            2,
            r"in domain b.com \(first at line 1\)",
        ),
        (
            "ip_address x { domain *.a.com { starttls_use never } }\n"
            "ip_address X {\n domain *.A.COM { starttls_use never } }",
            3,
            r"duplicate directive starttls_use in ip_address X / domain \*.A.COM",
        ),
        (
            "ip_address a { hostname x.com }\nip_address b, A {\n hostname y.com }",
            3,
            r"duplicate directive hostname in ip_address A \(first at line 1\)",
        ),
        ("mail_class m { listid 1 }\nmail_class M { listid 2 }", 2, "listid in mail_class M"),
        ("ip_address a, b, A {}", 1, "ip_address: A is listed twice"),
        ("domain a.com, [*.]b.com, A.COM. {}", 1, "domain: A.COM. is listed twice"),
    ],
)
def test_schema_errors(text: str, line: int, pattern: str) -> None:
    assert_error(text, line, pattern)


def test_same_pattern_in_different_contexts_is_fine() -> None:
    parse(
        "domain a.com { smtp_route x }\n"
        "ip_address * { domain a.com { smtp_route y } }\n"
        "ip_address x { domain a.com { smtp_route z } }\n",
        "t.conf",
    )
    # exact and [*.] forms of one domain are different patterns
    parse("domain a.com {}\ndomain [*.]a.com {}\ndomain *.a.com {}", "t.conf")


def test_repeated_blocks_merge() -> None:
    """The documented snippets, each "added to greenarrow.conf", make one valid file."""
    root = parse(SEED_ROUTE + SEED_REUSE + "general { queue_lifetime 1 }\ngeneral {}\n", "t.conf")
    general = root.block("general")
    assert general is not None and general.get_duration("queue_lifetime") == 1
    star = root.block("ip_address", "*")
    assert star is not None
    domain = star.block("domain", "BOUNCE-domain.example.com")
    assert domain is not None and domain.line == 2
    assert [d.name for d in domain.directives] == ["smtp_route", "reuse_connections"]
    assert root.block("ip_address", "other") is None
    assert root.block("nothing") is None


def test_schema_table_is_consistent() -> None:
    names = [(ctx, rule.name) for rule in SCHEMA for ctx in rule.contexts]
    assert len(names) == len(set(names))
    blocks = {rule.name for rule in SCHEMA if rule.is_block} | {conf.ROOT}
    for rule in SCHEMA:
        assert set(rule.contexts) <= blocks, rule


def test_custom_schema() -> None:
    extra = (*SCHEMA, conf.directive("made_up_setting", "general", conf.INT))
    root = parse("general { made_up_setting 50 }", "t.conf", check=False)
    conf.validate(root, extra)
    with pytest.raises(ConfError, match="unknown directive made_up_setting"):
        conf.validate(root)


def test_equality_ignores_line_numbers() -> None:
    assert raw("a 1\nb { c 2 }") == raw("\n\n a 1; b {\n\n c 2\n}")
    assert raw("a 1") != raw("a 2")


# --------------------------------------------------------------------------
# Files


def test_load(tmp_path: Path) -> None:
    path = tmp_path / "greenarrow.conf"
    path.write_text(SEED_ROUTE, encoding="utf-8")
    root = load(path)
    assert root.blocks[0].blocks[0].directives[0].filename == str(path)
    path.write_text("general {\n  nope 1\n}\n")
    with pytest.raises(ConfError, match=rf"^{re.escape(str(path))}:2: unknown directive nope"):
        load(path)
    path.write_bytes(b"a 1\nb \xff\n")
    with pytest.raises(ConfError, match=r":2: not valid UTF-8"):
        load(path, check=False)
    with pytest.raises(ConfError, match="no such file"):
        load(tmp_path / "missing.conf")
    with pytest.raises(ConfError, match="cannot read"):
        load(tmp_path)


def test_load_root(tmp_path: Path) -> None:
    root = Root(tmp_path)
    assert conf.conf_path(root) == tmp_path / "control" / "greenarrow.conf"
    assert conf.load_root(root) == Block("")
    (tmp_path / "control").mkdir()
    conf.conf_path(root).write_text(SEED_REUSE)
    assert conf.load_root(root).blocks[0].args == ["*"]


def test_shipped_file_configures_nothing_but_its_example_is_valid() -> None:
    text = SHIPPED.read_text(encoding="utf-8")
    assert parse(text, str(SHIPPED)) == Block("")
    # the example: from the first commented-out block on, lines like "#name" or "#    name"
    lines = text.splitlines()
    first = next(i for i, line in enumerate(lines) if re.match("#[a-z]", line))
    example = "\n".join(line[1:] for line in lines[first:] if re.match("#[a-z}]|#    ", line))
    root = parse(example, "example")
    assert {b.name for b in root.blocks} == {"general", "ip_address", "mail_class"}
    route = root.blocks[1].blocks[0].directive("smtp_route")
    assert route is not None and route.as_host_port() == ("10.0.55.2", 25)


# --------------------------------------------------------------------------
# greenarrow_config check


@pytest.fixture
def install_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "control").mkdir()
    monkeypatch.setenv("HVMAIL_ROOT", str(tmp_path))
    return tmp_path


def test_check_good_file(install_root: Path) -> None:
    (install_root / "control" / "greenarrow.conf").write_text(SEED_ROUTE)
    result = CliRunner().invoke(main, ["check"])
    assert result.exit_code == 0, result.output
    assert result.stdout == "greenarrow.conf: OK\n"


def test_check_bad_file(install_root: Path) -> None:
    path = install_root / "control" / "greenarrow.conf"
    path.write_text("general {\n  system_max_smtp_connections lots\n}\n")
    result = CliRunner().invoke(main, ["check"])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.strip() == (
        f"{path}:2: system_max_smtp_connections: expected a non-negative integer, got 'lots'"
    )


def test_check_unbalanced_braces(install_root: Path) -> None:
    (install_root / "control" / "greenarrow.conf").write_text(SEED_ROUTE + "}\n")
    result = CliRunner().invoke(main, ["check"])
    assert result.exit_code == 1
    assert "greenarrow.conf:6: unexpected '}'" in result.stderr


def test_check_missing_file(install_root: Path) -> None:
    result = CliRunner().invoke(main, ["check"])
    assert result.exit_code == 0
    assert result.stdout.startswith("greenarrow.conf: OK")
    assert "empty configuration" in result.stdout


def test_check_shipped_file(install_root: Path) -> None:
    (install_root / "control" / "greenarrow.conf").write_text(SHIPPED.read_text())
    result = CliRunner().invoke(main, ["check"])
    assert result.exit_code == 0 and result.stdout == "greenarrow.conf: OK\n"


def test_check_explicit_file(tmp_path: Path, install_root: Path) -> None:
    good = tmp_path / "good.conf"
    good.write_text(SEED_REUSE)
    result = CliRunner().invoke(main, ["check", "--file", str(good)])
    assert result.exit_code == 0 and result.stdout == f"{good}: OK\n"
    bad = tmp_path / "bad.conf"
    bad.write_text("ip_address * {\n  domain x.com {\n    smtp_route x.com:0\n  }\n}\n")
    result = CliRunner().invoke(main, ["check", "--file", str(bad)])
    assert result.exit_code == 1
    assert f"{bad}:3: smtp_route: bad port '0'" in result.stderr
    result = CliRunner().invoke(main, ["check", "--file", str(tmp_path / "nope.conf")])
    assert result.exit_code == 1
    assert "no such file" in result.stderr


def test_help_lists_check() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0 and "check" in result.output


# --------------------------------------------------------------------------
# Properties

NAMES = st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True)
VALUES = st.one_of(
    st.text(
        alphabet=string.ascii_letters + string.digits + "-_+.*/[]$:;%|@", min_size=1, max_size=8
    ),
    st.text(max_size=8).filter(lambda s: not any(0xD800 <= ord(c) <= 0xDFFF for c in s)),
)


ARGS = st.lists(VALUES, max_size=3)
DIRECTIVES = st.lists(st.builds(Directive, NAMES, ARGS), max_size=3)
TREES = st.recursive(
    st.builds(Block, NAMES, ARGS, DIRECTIVES),
    lambda children: st.builds(Block, NAMES, ARGS, DIRECTIVES, st.lists(children, max_size=3)),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(TREES)
def test_dumps_parse_round_trip(tree: Block) -> None:
    root = Block("", [], tree.directives, tree.blocks)
    assert parse(dumps(root), "p.conf", check=False) == root


@settings(max_examples=300, deadline=None)
@given(VALUES)
def test_quote_round_trip(value: str) -> None:
    assert one_value(quote(value)) == value


CONF_ALPHABET = st.sampled_from(list('ab yes1:;,{}#"`\\\n\t*.[]u0') + ["\\u", "é", "\r", "domain"])


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(), st.lists(CONF_ALPHABET, max_size=40).map("".join)))
def test_parser_raises_only_conf_errors(text: str) -> None:
    for check in (False, True):
        try:
            parse(text, "fuzz.conf", check=check)
        except ConfError as exc:
            assert str(exc).startswith("fuzz.conf:")
