"""The relay allow-list `control/smtp.tcp` (tcprules syntax)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from greenarrow.lib.config.tcprules import TcpRule, TcpRulesError, load, parse

REPO = Path(__file__).resolve().parent.parent


def test_exact_address_and_variables() -> None:
    rules = parse('1.2.3.4:allow,RELAYCLIENT="",GREENARROW_MAILCLASS="news"\n')
    rule = rules.match("1.2.3.4")
    assert rule == TcpRule(
        address="1.2.3.4", allow=True, env={"RELAYCLIENT": "", "GREENARROW_MAILCLASS": "news"}, line=1
    )
    assert rules.match("1.2.3.5") is None
    assert rules.relay_allowed("1.2.3.4")
    assert not rules.relay_allowed("1.2.3.5")
    assert rules.env_for("1.2.3.4") == {"RELAYCLIENT": "", "GREENARROW_MAILCLASS": "news"}
    assert rules.env_for("9.9.9.9") == {}


def test_env_for_returns_a_copy() -> None:
    rules = parse('1.2.3.4:allow,A="1"')
    rules.env_for("1.2.3.4")["A"] = "changed"
    assert rules.env_for("1.2.3.4") == {"A": "1"}


def test_allow_without_relayclient_does_not_relay() -> None:
    rules = parse('1.2.3.4:allow,GREENARROW_MAILCLASS="x"')
    assert rules.allowed("1.2.3.4")
    assert not rules.relay_allowed("1.2.3.4")


def test_deny_rule_gives_no_env_and_no_relay() -> None:
    rules = parse('1.2.3.4:deny,RELAYCLIENT=""')
    assert rules.match("1.2.3.4").allow is False
    assert not rules.allowed("1.2.3.4")
    assert not rules.relay_allowed("1.2.3.4")
    assert rules.env_for("1.2.3.4") == {}


def test_prefixes_match_at_octet_boundaries() -> None:
    rules = parse('1.2.:allow,RELAYCLIENT=""\n10.:allow,X="ten"\n')
    assert rules.relay_allowed("1.2.0.1")
    assert rules.relay_allowed("1.2.255.255")
    assert not rules.relay_allowed("1.20.0.1")  # "1.2." is not a text prefix of "1.20."
    assert not rules.relay_allowed("11.2.0.1")
    assert rules.env_for("10.1.2.3") == {"X": "ten"}
    assert rules.match("100.1.2.3") is None


def test_last_octet_range() -> None:
    rules = parse('1.2.3.1-20:allow,RELAYCLIENT=""')
    assert [n for n in range(256) if rules.relay_allowed(f"1.2.3.{n}")] == list(range(1, 21))


def test_middle_octet_range_with_trailing_dot() -> None:
    rules = parse('1.2.3-5.:allow,RELAYCLIENT=""')
    assert not rules.relay_allowed("1.2.2.9")
    assert rules.relay_allowed("1.2.3.9")
    assert rules.relay_allowed("1.2.4.0")
    assert rules.relay_allowed("1.2.5.255")
    assert not rules.relay_allowed("1.2.6.1")


def test_range_in_first_octet_and_in_a_full_address() -> None:
    rules = parse("10-11.:allow,A=a\n1.2-3.4.5:allow,A=b\n")
    assert rules.env_for("10.9.9.9") == {"A": "a"}
    assert rules.env_for("11.0.0.0") == {"A": "a"}
    assert rules.match("12.0.0.0") is None
    assert rules.env_for("1.3.4.5") == {"A": "b"}
    assert rules.match("1.3.4.6") is None


def test_default_rule() -> None:
    rules = parse('127.0.0.1:allow,RELAYCLIENT=""\n:allow\n')
    assert rules.relay_allowed("127.0.0.1")
    assert rules.allowed("8.8.8.8")
    assert not rules.relay_allowed("8.8.8.8")
    assert parse(":deny").match("8.8.8.8").allow is False
    assert parse(":deny").match("::2").allow is False


def test_no_rules_means_deny() -> None:
    rules = parse("# nothing here\n\n")
    assert rules.rules == ()
    assert rules.match("127.0.0.1") is None
    assert not rules.allowed("127.0.0.1")


def test_most_specific_wins_whatever_the_order() -> None:
    text = "\n".join(
        [
            ":allow,WHO=default",
            "1.:allow,WHO=p1",
            "1.2.:allow,WHO=p2",
            "1.2.3-4.:allow,WHO=p3range",
            "1.2.3.:allow,WHO=p3",
            "1.2.3.1-9:allow,WHO=range",
            "1.2.3.4:allow,WHO=exact",
        ]
    )
    for order in (text, "\n".join(reversed(text.splitlines()))):
        rules = parse(order)
        assert rules.env_for("1.2.3.4") == {"WHO": "exact"}
        assert rules.env_for("1.2.3.5") == {"WHO": "range"}
        assert rules.env_for("1.2.3.10") == {"WHO": "p3"}  # exact prefix beats a range of prefixes
        assert rules.env_for("1.2.4.10") == {"WHO": "p3range"}
        assert rules.env_for("1.2.5.10") == {"WHO": "p2"}
        assert rules.env_for("1.3.0.0") == {"WHO": "p1"}
        assert rules.env_for("2.0.0.0") == {"WHO": "default"}


def test_exact_deny_beats_an_allowing_range() -> None:
    rules = parse('1.2.3.1-20:allow,RELAYCLIENT=""\n1.2.3.4:deny\n')
    assert not rules.allowed("1.2.3.4")
    assert rules.relay_allowed("1.2.3.5")


def test_same_address_twice_first_wins() -> None:
    rules = parse("1.2.3.4:allow,N=1\n1.2.3.4:deny\n1.2.3.1-9:allow,N=a\n1.2.3.5-6:allow,N=b\n")
    assert rules.env_for("1.2.3.4") == {"N": "1"}
    assert rules.env_for("1.2.3.5") == {"N": "a"}
    assert len(rules.rules) == 4


def test_ipv6_exact_and_separator_is_last_colon() -> None:
    rules = parse('::1:allow,RELAYCLIENT=""\n2001:db8::25:deny\n:deny\n')
    assert [r.address for r in rules.rules] == ["::1", "2001:db8::25", ""]
    assert rules.relay_allowed("::1")
    assert rules.relay_allowed("0:0:0:0:0:0:0:1")  # any spelling of the peer address
    assert not rules.allowed("2001:DB8:0::25")
    assert not rules.allowed("::2")
    assert rules.match("fe80::1%eth0").address == ""


def test_ipv6_spelt_long_in_the_file() -> None:
    rules = parse("2001:0db8:0000:0000:0000:0000:0000:0025:allow,A=1")
    assert rules.env_for("2001:db8::25") == {"A": "1"}


def test_ipv4_mapped_ipv6_peer_matches_ipv4_rules() -> None:
    rules = parse('127.:allow,RELAYCLIENT=""\n::ffff:10.0.0.1:allow,X=y\n')
    assert rules.relay_allowed("::ffff:127.0.0.1")
    assert rules.env_for("10.0.0.1") == {"X": "y"}


def test_action_word_is_not_mistaken_for_hex() -> None:
    # "a" and "de" are hex digits: the separator is still the colon before them.
    rules = parse("fe80::a:allow,A=1\nfe80::de:deny\n")
    assert rules.match("fe80::a").allow
    assert not rules.match("fe80::de").allow


def test_values_quoted_bare_and_with_commas_colons_and_hashes() -> None:
    rules = parse(
        "1.2.3.4:allow,A=\"x,y:deny\",B=bare,C='single \"q\"',D=\"#not a comment\",E=  # comment\n"
    )
    assert rules.env_for("1.2.3.4") == {
        "A": "x,y:deny",
        "B": "bare",
        "C": 'single "q"',
        "D": "#not a comment",
        "E": "",
    }


def test_name_given_twice_keeps_last_value() -> None:
    assert parse("1.2.3.4:allow,A=1,A=2").env_for("1.2.3.4") == {"A": "2"}


def test_comments_blank_lines_whitespace_and_line_numbers() -> None:
    text = '# header\n\n   \n  1.2.3.4:allow,RELAYCLIENT=""  \r\n# x\n:deny # default\n'
    rules = parse(text)
    assert [(r.address, r.allow, r.line) for r in rules.rules] == [("1.2.3.4", True, 4), ("", False, 6)]


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("1.2.3.256:allow", "bad octet '256'"),
        ("1.2.3.01:allow", "bad octet '01'"),
        ("1.2.x.4:allow", "bad address '1.2.x.4'"),
        ("1.2.3.4:alow", "expected 'allow' or 'deny'"),
        ("1.2.3.4:Allow", "expected 'allow' or 'deny'"),
        ("1.2.3.4:dead", "expected 'allow' or 'deny'"),
        ("1.2.3.4 allow", "expected ADDRESS:allow"),
        ("1.2.3.4:allow extra", "expected 'allow' or 'deny'"),
        ('1.2.3.4:allow,RELAYCLIENT="', "unterminated quote in the value of RELAYCLIENT"),
        ("1.2.3.4:allow,RELAYCLIENT='x", "unterminated quote"),
        ('1.2.3.4:allow,A="x"y', "after the quoted value of A"),
        ("1.2.3.4:allow,A=x\"y", "stray quote"),
        ("1.2.3.4:allow,RELAYCLIENT", "expected NAME=value"),
        ("1.2.3.4:allow,=x", "expected NAME=value"),
        ("1.2.3.4:allow,A=1,", "trailing comma"),
        ("1.2.3.4:allow,", "expected NAME=value"),
        ("1.2.3.20-1:allow", "upside down"),
        ("1.2.5-3.:allow", "upside down"),
        ("1.2.3.1-256:allow", "bad octet '256'"),
        ("1.2-3.4-5.:allow", "only one octet may be a range"),
        ("1.2.3:allow", "neither a full address"),
        ("1.2.3.4.:allow", "at most 3 octets"),
        ("1.2.3.4.5:allow", "neither a full address"),
        ("1..3.4:allow", "bad octet ''"),
        ("::1::allow", "bad IPv6 address"),
        ("2001:db8::/32:allow", "bad address '2001:db8::/32'"),
        ("2001:db8::1-5:allow", "ranges are not supported in IPv6"),
        ("gg::1:allow", "bad address 'gg::1'"),
        ("=mail.example.com:allow", "host name rules"),
        ("user@1.2.3.4:allow", "remote-info rules"),
        ("allow", "expected ADDRESS:allow"),
    ],
)
def test_malformed_lines_raise_with_file_and_line(line: str, fragment: str) -> None:
    with pytest.raises(TcpRulesError) as caught:
        parse(f"# ok\n127.0.0.1:allow\n{line}\n", "smtp2.tcp")
    message = str(caught.value)
    assert message.startswith("smtp2.tcp:3: "), message
    assert fragment in message, message


def test_error_is_a_value_error_and_default_filename() -> None:
    with pytest.raises(ValueError, match=r"^smtp\.tcp:1: "):
        parse("1.2.3.4:maybe")


def test_shadowed_bad_line_still_fails() -> None:
    with pytest.raises(TcpRulesError):
        parse("1.2.3.4:allow\n1.2.3.4:allow,X=\"oops\n")


def test_shipped_default_file(tmp_path: Path) -> None:
    rules = load(REPO / "control" / "smtp.tcp")
    assert [(r.address, r.allow, r.env) for r in rules.rules] == [
        ("127.0.0.1", True, {"RELAYCLIENT": ""}),
        ("::1", True, {"RELAYCLIENT": ""}),
        ("", False, {}),
    ]
    assert rules.relay_allowed("127.0.0.1")
    assert rules.relay_allowed("::1")
    assert not rules.allowed("127.0.0.2")
    assert not rules.allowed("192.0.2.1")
    assert not rules.allowed("2001:db8::1")


def test_load_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "smtp3.tcp"
    path.write_text("1.2.3.4:allow\nbogus\n")
    with pytest.raises(TcpRulesError, match=r"^smtp3\.tcp:2: "):
        load(path)


# A reference matcher written straight from the rule of precedence, compared
# with the compiled dictionary on random rules and addresses.

_octets = st.integers(0, 7)  # a small space so that rules and addresses meet often


@st.composite
def _rule_lines(draw: st.DrawFn) -> str:
    length = draw(st.integers(0, 4))
    octs = [str(draw(_octets)) for _ in range(length)]
    if length and draw(st.booleans()):
        i = draw(st.integers(0, length - 1))
        a, b = sorted((draw(_octets), draw(_octets)))
        octs[i] = f"{a}-{b}"
    if length == 0:
        address = ""
    elif length == 4:
        address = ".".join(octs)
    else:
        address = ".".join(octs) + "."
    action = draw(st.sampled_from(["allow", "deny"]))
    return f"{address}:{action}"


def _reference(lines: list[str], ip: str) -> int | None:
    """Index of the winning line: longest match, then no range, then first."""
    ip_octs = ip.split(".")
    best: tuple[int, int, int] | None = None
    for index, line in enumerate(lines):
        address = line.rsplit(":", 1)[0]
        if address == "":
            length, ranged, ok = 0, 0, True
        else:
            octs = address.rstrip(".").split(".")
            length = len(octs)
            ranged = int(any("-" in o for o in octs))
            ok = True
            for o, value in zip(octs, ip_octs, strict=False):
                if "-" in o:
                    lo, hi = (int(x) for x in o.split("-"))
                    ok = ok and lo <= int(value) <= hi
                else:
                    ok = ok and o == value
        if ok:
            key = (-length, ranged, index)
            if best is None or key < best:
                best = key
    return None if best is None else best[2]


@settings(max_examples=300, deadline=None)
@given(st.lists(_rule_lines(), max_size=12), st.lists(_octets, min_size=4, max_size=4))
def test_compiled_match_agrees_with_reference(lines: list[str], octs: list[int]) -> None:
    ip = ".".join(map(str, octs))
    rules = parse("\n".join(lines))
    expected = _reference(lines, ip)
    got = rules.match(ip)
    if expected is None:
        assert got is None
    else:
        assert got is not None and got.line == expected + 1
