"""The encoded bounce address (greenarrow.lib.simplemh.return_path, docs/simplemh.md).

What the bounce processor will rely on: the address decodes back to the
ListID, SendID and recipient exactly, also after a receiver lower-cased (or
upper-cased) its local part; the local part never passes 64 octets; the
short form decodes with the X-Mailer-Info of the returned message; and a
forged or altered address is refused.
"""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from greenarrow.lib.simplemh import return_path as ba
from greenarrow.lib.simplemh import tracking_url as tu

C = ("0123456789abcdef0123456789abcdef", "fedcba9876543210fedcba9876543210")
OTHER = ("0123456789abcdef0123456789abcdef", "00000000000000000000000000000000")
BOX = "bounce@bounces.example.com"


def mailer_info(recipient: str, listid: str, sendid: str) -> str:
    return tu.encode(C, tu.MAILER_INFO, recipient, listid, sendid, "news", "inst", "ct")


def test_full_form_shape() -> None:
    addr = ba.encode(BOX, "t100", "news0901220005", "r@d.example", C)
    local, domain = addr.split("@")
    assert domain == "bounces.example.com"
    assert local.startswith("bounce-t100-news0901220005-r=40d.example-5")
    assert len(local.rpartition("-")[2]) == 1 + ba.TAG_CHARS
    d = ba.decode(addr, C)
    assert (d.mailbox, d.listid, d.sendid, d.recipient, d.short, d.unsubscribe) == (
        BOX, "t100", "news0901220005", "r@d.example", False, False)


@pytest.mark.parametrize("case", [str.lower, str.upper, lambda s: s])
def test_survives_case_changes_of_the_local_part(case) -> None:
    """Upper-case letters are escaped, so the original case comes back whatever the receiver did."""
    addr = ba.encode("Bo-X@Bounces.example.com", "T1", "N-X", "Al.S@Ex.COM", C)
    local, _, domain = addr.rpartition("@")
    assert ba.is_full(addr)
    d = ba.decode(f"{case(local)}@{domain}", C)
    assert (d.listid, d.sendid, d.recipient) == ("T1", "N-X", "Al.S@Ex.COM")
    assert d.mailbox.lower() == "bo-x@bounces.example.com"


def test_angle_brackets_accepted() -> None:
    addr = ba.encode(BOX, "t1", "s", "r@d.example", C)
    assert ba.decode(f"<{addr}>", C).recipient == "r@d.example"


def test_local_part_is_a_dot_atom() -> None:
    addr = ba.encode(BOX, "l", 'we"ird..id', "a..b@x.example", C)
    local = addr.rpartition("@")[0]
    assert ".." not in local and '"' not in local
    assert ba.decode(addr, C).sendid == 'we"ird..id'


def test_short_form_when_too_long() -> None:
    rcpt = "firstname.lastname.with.a.long.name@subdomain.company-domain.example"
    addr = ba.encode(BOX, "t100", "newsletter-0901220005", rcpt, C)
    local = addr.rpartition("@")[0]
    assert len(local) <= 64
    assert local.startswith("bounce-t100-6")
    assert not ba.is_full(addr)
    with pytest.raises(ba.BounceAddressError, match="X-Mailer-Info"):
        ba.decode(addr, C)
    info = mailer_info(rcpt, "t100", "newsletter-0901220005")
    folded = info[:40] + "\r\n " + info[40:]  # as it sits, folded, in the returned headers
    d = ba.decode(addr.upper(), C, mailer_info=folded)
    assert (d.short, d.listid, d.sendid, d.recipient, d.mailclass) == (
        True, "t100", "newsletter-0901220005", rcpt, "news")


def test_short_form_rejects_another_messages_mailer_info() -> None:
    rcpt = "x" * 60 + "@example.com"
    addr = ba.encode(BOX, "t100", "s1", rcpt, C)
    for info in (mailer_info("y" * 60 + "@example.com", "t100", "s1"),
                 mailer_info(rcpt, "t100", "s2"), mailer_info(rcpt, "t200", "s1")):
        with pytest.raises(ba.BounceAddressError):
            ba.decode(addr, C, mailer_info=info)
    with pytest.raises(ba.BounceAddressError):  # a forged X-Mailer-Info
        ba.decode(addr, C, mailer_info=tu.encode(OTHER, tu.MAILER_INFO, rcpt, "t100", "s1"))


def test_short_form_without_room_for_the_listid() -> None:
    box = "b" * 40 + "@bounces.example.com"
    addr = ba.encode(box, "L" * 20, "s", "r" * 70 + "@x.example", C)
    local = addr.rpartition("@")[0]
    assert len(local) <= 64 and "--6" in local
    d = ba.decode(addr, C, mailer_info=mailer_info("r" * 70 + "@x.example", "L" * 20, "s"))
    assert d.listid == "L" * 20


def test_unsubscribe_purpose() -> None:
    addr = ba.encode(BOX, "t1", "s", "r@d.example", C, unsubscribe=True)
    assert ba.decode(addr, C).unsubscribe
    bounce = ba.encode(BOX, "t1", "s", "r@d.example", C)
    assert addr != bounce
    # the version digit is signed: a bounce cannot be turned into an unsubscribe request
    local, _, domain = bounce.rpartition("@")
    forged = local[: -ba.TAG_CHARS - 1] + ba.UNSUBSCRIBE + local[-ba.TAG_CHARS:] + "@" + domain
    with pytest.raises(ba.BounceAddressError):
        ba.decode(forged, C)


def test_forged_and_tampered_rejected() -> None:
    addr = ba.encode(BOX, "t100", "news1", "r@d.example", C)
    with pytest.raises(ba.BounceAddressError):
        ba.decode(addr, OTHER)
    for old, new in (("t100", "t101"), ("news1", "news2"), ("r=40d", "s=40d"),
                     ("bounce-", "bounced-")):
        with pytest.raises(ba.BounceAddressError):
            ba.decode(addr.replace(old, new, 1), C)
    local, _, domain = addr.rpartition("@")
    for i in range(len(local)):
        ch = local[i]
        changed = local[:i] + ("a" if ch != "a" else "b") + local[i + 1:]
        if changed.lower() == local.lower():
            continue
        with pytest.raises(ba.BounceAddressError):
            ba.decode(changed + "@" + domain, C)


@pytest.mark.parametrize("bad", [
    "", "plain@example.com", "a-b-c-d-1abcdefgh", "x-1-2-3-9abcdefgh@example.com",
    "x-1-2-3-1abc@example.com", "bounce-t1-s-r=zz-1aaaaaaaa@example.com", "-t-s-r-1aaaaaaaa@e.x",
    "b\u00e9-t-s-r-1aaaaaaaa@example.com",
])
def test_not_encoded_addresses_rejected(bad: str) -> None:
    with pytest.raises(ba.BounceAddressError):
        ba.decode(bad, C)


@pytest.mark.parametrize(("mailbox", "ok"), [
    ("bounce@bounces.example.com", True),
    ("bounce-handler@example.com", True),
    ("b@localhost", True),
    ("no-at-sign", False),
    ("@example.com", False),
    ("b@", False),
    (".b@example.com", False),
    ("b..c@example.com", False),
    ("b c@example.com", False),
    ("x" * 41 + "@example.com", False),
    ("b@exa mple.com", False),
    ("b@-example.com", False),
])
def test_mailbox_problem(mailbox: str, ok: bool) -> None:
    assert (ba.mailbox_problem(mailbox) is None) == ok


_field = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=30)
_local = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-+_="),
                 min_size=1, max_size=40)


@settings(max_examples=300, deadline=None)
@given(listid=st.text(st.sampled_from("abcXYZ019_+"), min_size=1, max_size=20), sendid=_field,
       local=_local, domain=st.sampled_from(["d.example", "EXAMPLE.com", "x-y.example.org"]),
       lower=st.booleans(), unsubscribe=st.booleans())
def test_round_trip_property(listid, sendid, local, domain, lower, unsubscribe) -> None:
    """Any identifiers and recipient come back exactly, lower-cased in transit or not,
    and the local part stays within 64 octets."""
    recipient = f"{local}@{domain}"
    addr = ba.encode(BOX, listid, sendid, recipient, C, unsubscribe)
    loc, _, dom = addr.rpartition("@")
    assert len(loc) <= 64
    assert all(c.isalnum() or c in "-_.+=" for c in loc) and ".." not in loc
    if lower:
        addr = loc.lower() + "@" + dom
    info = tu.encode(C, tu.MAILER_INFO, recipient, listid, sendid)
    d = ba.decode(addr, C, mailer_info=info)
    assert (d.listid, d.sendid, d.recipient, d.unsubscribe) == (listid, sendid, recipient,
                                                               unsubscribe)


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=120))
def test_decode_fuzz(text: str) -> None:
    """Random addresses are refused with BounceAddressError, never anything else."""
    assume("@" in text or True)
    with pytest.raises(ba.BounceAddressError):
        ba.decode(text, C, mailer_info=text)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=40))
def test_escape_remembered_is_escape(text: str) -> None:
    """escape() remembers recent fields (a message's ListID and SendID, each recipient twice)."""
    assert ba.escape(text) == ba._escape(text) == ba.escape(text)
    assert len(ba._escaped) <= 4096


# --------------------------------------------------------------------------- the domain (issue 10)

LONG_RECIPIENT = "a-very-long-recipient-local-part-that-does-not-fit@d.example"
# Made by the encoder of versions 1-4 (before the domain was signed), kept as they were
# sent: mail out before an upgrade bounces to these for days.
LEGACY = {
    "full": "bounce-t100-news0901220005-r=40d.example-1v2kjwmsm@bounces.example.com",
    "unsubscribe": "bounce-t100-news0901220005-r=40d.example-3w24hvgu2@bounces.example.com",
    "short": "bounce-t100-2j6kwfhy3@bounces.example.com",
}


@pytest.mark.parametrize("unsubscribe", [False, True])
@pytest.mark.parametrize("recipient", ["r@d.example", LONG_RECIPIENT])
def test_domain_is_signed(recipient: str, unsubscribe: bool) -> None:
    """The tag covers the bounce domain: the same local part at another domain is refused;
    the domain's case and a final dot do not matter."""
    addr = ba.encode(BOX, "t100", "news0901220005", recipient, C, unsubscribe)
    info = mailer_info(recipient, "t100", "news0901220005")
    local, _, domain = addr.rpartition("@")
    decoded = ba.decode(addr, C, mailer_info=info)
    assert decoded.domain_bound and decoded.mailbox == BOX and decoded.recipient == recipient
    for other in ("attacker.example", "bounces.example.com.evil.example", "example.com"):
        with pytest.raises(ba.BounceAddressError, match="verification"):
            ba.decode(f"{local}@{other}", C, mailer_info=info)
    assert ba.decode(f"{local}@{domain.upper()}.", C, mailer_info=info).recipient == recipient


def test_legacy_versions_still_decode() -> None:
    """Addresses of versions 1-4 decode as before, marked as not binding their domain."""
    d = ba.decode(LEGACY["full"], C)
    assert (d.listid, d.sendid, d.recipient, d.unsubscribe, d.short) == (
        "t100", "news0901220005", "r@d.example", False, False)
    assert (d.version, d.domain_bound) == ("1", False)
    assert ba.decode(LEGACY["unsubscribe"], C).unsubscribe
    info = mailer_info(LONG_RECIPIENT, "t100", "news0901220005")
    d = ba.decode(LEGACY["short"], C, mailer_info=info)
    assert (d.recipient, d.short, d.version, d.domain_bound) == (LONG_RECIPIENT, True, "2", False)
    # not signed, so another domain decodes too: the caller checks domain_bound
    assert ba.decode(LEGACY["full"].replace("bounces.example.com", "x.example"), C).mailbox \
        == "bounce@x.example"
    # new addresses never use versions 1-4
    assert ba.encode(BOX, "t100", "news0901220005", "r@d.example", C).rpartition("-")[2][0] == "5"


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=120), info=st.one_of(st.none(), st.binary(max_size=80)))
def test_decode_bytes_fuzz(data: bytes, info: bytes | None) -> None:
    """Any bytes, as address and X-Mailer-Info: BounceAddressError and nothing else."""
    with pytest.raises(ba.BounceAddressError):
        ba.decode(data, C, mailer_info=info)


def _valid_addresses() -> list[tuple[str, str, bool]]:
    """(address, the X-Mailer-Info that decodes it, unsubscribe) of every version."""
    out = []
    for box, listid, sendid in ((BOX, "t100", "news0901220005"), ("b-x@Bounce.Example", "", "s")):
        for recipient in ("r@d.example", "Alice.B@Example.com", LONG_RECIPIENT):
            for unsub in (False, True):
                out.append((ba.encode(box, listid, sendid, recipient, C, unsub),
                            mailer_info(recipient, listid, sendid), unsub))
    info = mailer_info(LONG_RECIPIENT, "t100", "news0901220005")
    out.extend((addr, info, what == "unsubscribe") for what, addr in LEGACY.items())
    return out


VALID = _valid_addresses()


@settings(max_examples=600, deadline=None)
@given(pick=st.integers(0, len(VALID) - 1), pos=st.integers(0, 200),
       action=st.sampled_from(["replace", "insert", "delete", "swapcase", "truncate", "repeat"]),
       char=st.characters(max_codepoint=0x2FF), info_cut=st.integers(0, 3))
def test_decode_near_valid_mutations(pick, pos, action, char, info_cut) -> None:
    """Valid addresses changed by one character (or cut, or their X-Mailer-Info cut): either
    BounceAddressError, or (for changes of case) the same fields as the original."""
    addr, info, unsubscribe = VALID[pick]
    original = ba.decode(addr, C, mailer_info=info)
    assert original.unsubscribe == unsubscribe
    pos = pos % (len(addr) + 1)
    mutated = {
        "replace": addr[:pos] + char + addr[pos + 1:],
        "insert": addr[:pos] + char + addr[pos:],
        "delete": addr[:pos] + addr[pos + 1:],
        "swapcase": addr[:pos] + addr[pos:].swapcase(),
        "truncate": addr[:pos],
        "repeat": addr + addr[pos:],
    }[action]
    info = info[: len(info) * info_cut // 4] if info_cut else info
    try:
        got = ba.decode(mutated, C, mailer_info=info)
    except ba.BounceAddressError:
        return
    assert (got.listid, got.sendid, got.recipient, got.unsubscribe, got.short) == (
        original.listid, original.sendid, original.recipient, original.unsubscribe,
        original.short)
    if got.domain_bound:
        assert got.mailbox.lower().rstrip(".") == original.mailbox.lower()
