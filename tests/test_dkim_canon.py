"""The compiled DKIM canonicalization (pyx/dkim_canon) and the signatures made with it.

1. `greenarrow.pyx.dkim_canon` is the C extension and gives byte for byte
   what dkimpy's `rfc822_parse` and canonicalization give for CRLF messages
   (corpus messages and generated ones).
2. Every signature `DkimSigner` makes verifies with dkimpy and with
   OpenDKIM's own verifier (the milter's test mode), for relaxed/relaxed and
   simple/simple, RSA-2048 and Ed25519, across the MIME corpus in
   shared/corpus (stalwart-mail-parser, cpython-test-email) and messages with
   8-bit bytes, long lines, odd folding and no final CRLF; and fails with
   both once the message is changed.

OpenDKIM runs as a milter in verify mode and is fed each message over the
milter protocol, as Postfix feeds it (tests/dkim_verifiers.py).
"""

from __future__ import annotations

import importlib.machinery
import json
import shutil
import smtplib
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from dkim.canonicalization import Relaxed, Simple
from dkim_verifiers import NO_OPENDKIM, OPENDKIM, OpenDkimMilter, dkimpy_results, txt_records
from engine import Engine, route_conf, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from smtp_receivers import Receiver

from greenarrow.lib.config import control
from greenarrow.lib.core import users
from greenarrow.lib.core.message import to_crlf
from greenarrow.lib.dkim.signing import CANONICALIZATIONS, DkimKeys, DkimSigner
from greenarrow.pyx import dkim_canon

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"
if not CORPUS.is_dir():
    CORPUS = Path("/work/shared/corpus")
MIME_SOURCES = ("stalwart-mail-parser", "cpython-test-email")
DOMAIN = "origin.test"
REQUEST = f"{DOMAIN}:rsa,{DOMAIN}:ed"  # both keys on every message

EDGE_CASES = {
    "8-bit": (b"From: J\xc3\xb6rg <j@origin.test>\r\nSubject: caf\xc3\xa9 \xff\xfe\r\n"
              b"Content-Transfer-Encoding: 8bit\r\n\r\n\xe9t\xe9  \xe0 la  plage \t\r\n\x80\x81\r\n"),
    "long lines": (b"From: a@origin.test\r\nSubject: " + b"long " * 300 + b"\r\n"
                   b"X-Long: " + b"y" * 3000 + b"\r\n\r\n" + b"z" * 12000 + b"\r\n"
                   + b"w  " * 4000 + b"\r\n"),
    "odd folding": (b"From:\r\n \t a@origin.test \r\nSubject:   folded \r\n\t\t over\r\n   \r\n"
                    b"  three lines  \r\nTo:b@dest.test\r\nX-Empty:\r\nX-Spaces:    \r\n"
                    b"SUBJECT: second subject\r\nDate: Sun, 22 Nov 2026 10:00:00 +0000\r\n\r\n"
                    b"body\r\n"),
    "no final CRLF": b"From: a@origin.test\r\nSubject: no end\r\n\r\nlast line without CRLF  ",
    "LF only": b"From: a@origin.test\nSubject: unix\n\nline one\n\n\n",
    "empty body": b"From: a@origin.test\r\nSubject: empty\r\n\r\n",
    "no body at all": b"From: a@origin.test\r\nSubject: headers only\r\n",
    "blank lines only": b"From: a@origin.test\r\n\r\n\r\n \r\n\t\r\n\r\n",
    "dots and spaces": b"From: a@origin.test\r\n\r\n.\r\n..x\r\n \r\n a  b \r\n\r\n",
}


# --------------------------------------------------------------------------- the extension


def test_is_compiled_extension() -> None:
    assert dkim_canon.__file__.endswith(".so")
    assert isinstance(dkim_canon.__loader__, importlib.machinery.ExtensionFileLoader)


def corpus_messages() -> list[tuple[str, bytes]]:
    """Every message file of the MIME corpora (30), by path."""
    found = []
    for source in MIME_SOURCES:
        for line in (CORPUS / source / "index.jsonl").read_text().splitlines():
            name = json.loads(line)["file"]
            found.append((f"{source}/{name}", (CORPUS / source / name).read_bytes()))
    return found


def same_as_dkimpy(message: bytes) -> None:
    """dkim_canon on a CRLF message equals dkimpy's parse and both canonicalizations."""
    try:
        theirs, body = dkim.rfc822_parse(message)
    except (dkim.MessageFormatError, IndexError):  # IndexError: a continuation line first
        with pytest.raises(ValueError):
            dkim_canon.parse(message)
        return
    ours, offset = dkim_canon.parse(message)
    assert ours == [tuple(h) for h in theirs]
    assert message[offset:] == body
    for name, value in ours:
        relaxed = Relaxed.canonicalize_headers([(name, value)])[0]
        assert dkim_canon.relaxed_header(name, value) == relaxed[0] + b":" + relaxed[1][:-2]
    assert dkim_canon.body(message, offset, True) == Relaxed.canonicalize_body(body)
    assert dkim_canon.body(message, offset, False) == Simple.canonicalize_body(body)


def test_corpus_canonicalization_matches_dkimpy() -> None:
    messages = corpus_messages() + list(EDGE_CASES.items())
    assert len(messages) >= 35
    for _, raw in messages:
        same_as_dkimpy(to_crlf(raw))


_piece = st.sampled_from([b"a", b"B", b" ", b"\t", b"\r\n", b"\r\n ", b"\r\n\t", b":", b"\xe9",
                          b"\r\n\r\n", b"x-y", b"From ", b"\x00", b"\r", b"\n"])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(head=st.lists(st.tuples(st.sampled_from([b"From", b"Subject", b"X-A", b"to"]),
                               st.lists(_piece, max_size=12)), max_size=6),
       body=st.lists(_piece, max_size=30))
def test_generated_canonicalization_matches_dkimpy(head: list, body: list) -> None:
    raw = b"".join(name + b":" + b"".join(value) + b"\r\n" for name, value in head)
    same_as_dkimpy(to_crlf(raw + b"\r\n" + b"".join(body)))
    same_as_dkimpy(to_crlf(b"".join(body)))  # anything: mostly not a message


def test_body_offset_checked() -> None:
    with pytest.raises(ValueError, match="outside the message"):
        dkim_canon.body(b"abc", 4, True)
    with pytest.raises(ValueError, match="continuation"):
        dkim_canon.parse(b" folded first\r\n\r\n")


# --------------------------------------------------------------------------- signatures


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> DkimKeys:
    control = tmp_path_factory.mktemp("control")
    folder = control / "dkim" / DOMAIN
    folder.mkdir(parents=True)
    for selector, key in (("rsa", rsa.generate_private_key(65537, 2048)),
                          ("ed", ed25519.Ed25519PrivateKey.generate())):
        (folder / f"{selector}.pem").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        users.restrict(folder / f"{selector}.pem")  # a key others may read is refused
    return DkimKeys.from_control(control)


def with_from(raw: bytes) -> bytes:
    """The message with a From address: DKIM signs From, and OpenDKIM refuses to verify a
    message whose From has no address (`From: Moderator-Address`). A From without an
    `@` is renamed X-Original-From and one with an address added at the top."""
    try:
        headers, _ = dkim_canon.parse(to_crlf(raw))
    except ValueError:
        return raw
    froms = [value for name, value in headers if name.lower() == b"from"]
    if len(froms) == 1 and b"@" in froms[0]:
        return raw
    for name, value in headers:
        if name.lower() == b"from":
            raw = raw.replace(name + b":" + value.rstrip(b"\r\n"),
                              b"X-Original-From:" + value.rstrip(b"\r\n"), 1)
    return b"From: corpus@origin.test\r\n" + raw


@pytest.fixture(scope="module")
def milter(keys: DkimKeys, tmp_path_factory: pytest.TempPathFactory):
    if OPENDKIM is None:
        pytest.skip(NO_OPENDKIM)
    running = OpenDkimMilter(txt_records(keys), tmp_path_factory.mktemp("opendkim"))
    yield running
    running.stop()


@pytest.mark.parametrize("canonicalization", ["relaxed/relaxed", "simple/simple"])
def test_every_signature_verifies(milter: OpenDkimMilter, keys: DkimKeys,
                                  canonicalization: str) -> None:
    """Each corpus and edge-case message, signed with RSA-2048 and Ed25519: dkimpy and
    OpenDKIM both pass both signatures. Unparseable messages go out unsigned."""
    signer = DkimSigner(keys, canonicalization=canonicalization)
    records = txt_records(keys)
    signed = unsigned = 0
    for name, raw in corpus_messages() + list(EDGE_CASES.items()):
        message = with_from(raw)
        result = signer.sign(message, REQUEST)
        if not result.keys:
            with pytest.raises(dkim.MessageFormatError):
                dkim.rfc822_parse(to_crlf(message))
            assert result.message == message
            unsigned += 1
            continue
        signed += 1
        assert result.keys == [(DOMAIN, "rsa"), (DOMAIN, "ed")], name
        assert f"c={canonicalization};".encode() in result.message.replace(b"\r\n ", b"")
        assert dkimpy_results(result.message, records) == [True, True], name
        verdict = milter.verify(result.message)
        assert verdict == {"rsa": "pass", "ed": "pass"}, (name, verdict)
    assert signed >= 33 and unsigned <= 5, (signed, unsigned)


@pytest.mark.parametrize("canonicalization", ["relaxed/relaxed", "simple/simple"])
def test_changed_message_fails_both_verifiers(milter: OpenDkimMilter, keys: DkimKeys,
                                              canonicalization: str) -> None:
    records = txt_records(keys)
    signed = DkimSigner(keys, canonicalization=canonicalization).sign(EDGE_CASES["8-bit"], REQUEST)
    for changed in (signed.message.replace(b"plage", b"plagE"),
                    signed.message.replace(b"Subject: caf", b"Subject: cof")):
        assert dkimpy_results(changed, records) == [False, False]
        assert milter.verify(changed) == {"rsa": "fail", "ed": "fail"}


@pytest.mark.parametrize("canonicalization", CANONICALIZATIONS)
def test_every_canonicalization_verifies_with_dkimpy(keys: DkimKeys, canonicalization: str) -> None:
    signer = DkimSigner(keys, canonicalization=canonicalization)
    for raw in EDGE_CASES.values():
        result = signer.sign(raw, REQUEST)
        assert dkimpy_results(result.message, txt_records(keys)) == [True, True]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(head=st.lists(st.tuples(st.sampled_from([b"Subject", b"To", b"X-A", b"Date"]),
                               st.lists(_piece.filter(lambda p: b"\r\n\r\n" not in p), max_size=8)),
                     max_size=5),
       body=st.lists(_piece, max_size=30), canonicalization=st.sampled_from(CANONICALIZATIONS))
def test_generated_messages_verify(keys: DkimKeys, head: list, body: list,
                                   canonicalization: str) -> None:
    raw = b"From: g@origin.test\r\n" + b"".join(
        n + b":" + b"".join(v) + b"\r\n" for n, v in head) + b"\r\n" + b"".join(body)
    result = DkimSigner(keys, canonicalization=canonicalization).sign(raw, f"{DOMAIN}:ed")
    try:
        dkim.rfc822_parse(to_crlf(raw))
    except (dkim.MessageFormatError, IndexError):
        assert result.keys == []
        return
    assert dkimpy_results(result.message, txt_records(keys)) == [True]


def relaxed_probe(engine: Engine, rx: Receiver) -> bool:
    """Send one probe message and wait for it; whether it came signed relaxed/relaxed
    (the workers re-read control/ on SIGHUP, a moment after the reload command)."""
    before = len(rx.messages)
    with smtplib.SMTP("127.0.0.1", engine.smtp_port, timeout=30) as smtp:
        smtp.sendmail("a@origin.test", ["probe@dest.test"],
                      b"From: a@origin.test\r\nSubject: probe\r\n\r\nprobe\r\n")
    wait_until(lambda: len(rx.messages) > before, 60, "the probe message")
    probe = rx.messages[before].content.replace(b"\r\n ", b"")
    del rx.messages[before:]
    return b"c=relaxed/relaxed;" in probe


def test_engine_signatures_verify_with_both(tmp_path: Path, keys: DkimKeys) -> None:
    """Real services: mail with 8-bit bytes, odd folding and no final CRLF, injected over
    SMTP From origin.test (an RSA-2048 `default` key) and From ed.origin.test (an Ed25519
    one), arrives signed, and dkimpy and OpenDKIM pass each signature; first simple/simple
    (control/dkim/canonicalization), then relaxed/relaxed after a reload."""
    if OPENDKIM is None:
        pytest.skip(NO_OPENDKIM)
    cases = [EDGE_CASES["8-bit"], EDGE_CASES["odd folding"], EDGE_CASES["no final CRLF"]]
    cases += [case.replace(b"@origin.test", b"@ed.origin.test") for case in cases]
    with Receiver("127.0.0.1") as rx:
        engine = Engine(tmp_path, conf=route_conf({"dest.test": rx.port}))
        for domain, selector in ((DOMAIN, "rsa"), (f"ed.{DOMAIN}", "ed")):
            folder = engine.root.control / "dkim" / domain
            folder.mkdir(parents=True)
            shutil.copyfile(keys.get(DOMAIN, selector).path, folder / "default.pem")
            users.restrict(folder / "default.pem")
        records = txt_records(DkimKeys.from_control(engine.root.control))
        milter = OpenDkimMilter(records, tmp_path / "opendkim")
        control.write(engine.root.control, "dkim/canonicalization", "simple/simple")
        try:
            with engine:
                for canonicalization in ("simple/simple", "relaxed/relaxed"):
                    if canonicalization == "relaxed/relaxed":
                        control.write(engine.root.control, "dkim/canonicalization", canonicalization)
                        reload = engine.program("greenarrow_config", "reload")
                        assert reload.returncode == 0, reload.stderr
                        wait_until(lambda: relaxed_probe(engine, rx), 60,
                                   "a message signed after the reload")
                    before = len(rx.messages)
                    with smtplib.SMTP("127.0.0.1", engine.smtp_port, timeout=30) as smtp:
                        for n, case in enumerate(cases):
                            smtp.sendmail("a@origin.test", [f"u{before + n}@dest.test"], case)
                    wait_until(lambda b=before: len(rx.messages) >= b + len(cases), 60,
                               "the messages at the receiver")
                    for received in rx.messages[before:]:
                        content = received.content
                        tags = content.split(b"\r\n\r\n")[0].replace(b"\r\n ", b"")
                        assert tags.count(b"DKIM-Signature:") == 1, content[:600]
                        assert f"c={canonicalization};".encode() in tags
                        assert dkimpy_results(content, records) == [True]
                        assert set(milter.verify(content).values()) == {"pass"}
        finally:
            milter.stop()


# --------------------------------------------------------------------------- fast paths


FROM_VALUES = [
    b" News <news@Origin.Test>", b" news@origin.test", b"news@origin.test.", b" <a@b.c>",
    b" J. Smith <a@b.c>", b" O'Brien-Doe <a@b.c>", b' "Smith, J" <a@b.c>', b" a@b.c (comment)",
    b" Moderator-Address", b" a@[1.2.3.4]", b" =?utf-8?q?J=C3=B6rg?= <j@origin.test>",
    b" J\xc3\xb6rg <j@xn--jrg-sna.test>", b" first@a.test, second@b.test", b" <@route:a@b.c>",
    b" News\r\n <news@origin.test>\r\n", b"\r\n \t a@origin.test \r\n", b" a@b@c", b" <>", b"",
    b" group: a@b.c;", b" a@-weird-.test", b" a@b.c\r\n", b" n <a@B.C.>",
    b' "Bench Newsletter" <newsletter@bench.test>', b' "a \\" b" <x@y.z>', b' "" <a@b.c>',
    b' "x"<a@b.c>', b' "x" y <a@b.c>', b' "<a@b.c>" <c@d.e>', b' "a@b.c"',
]


def test_address_domain_fast_path_agrees_with_getaddresses() -> None:
    from greenarrow.lib.dkim.signing import address_domain, address_domain_parsed

    values = list(FROM_VALUES)
    for _, raw in corpus_messages():
        try:
            headers, _ = dkim_canon.parse(to_crlf(raw))
        except ValueError:
            continue
        values += [v for n, v in headers if n.lower() in (b"from", b"sender")]
    assert len(values) > 40
    for value in values:
        assert address_domain(value) == address_domain_parsed(value), value


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b"a", b"\r", b"\n", b"\r\n", b" "]), max_size=12))
def test_is_crlf_is_what_to_crlf_keeps(pieces: list) -> None:
    data = b"".join(pieces)
    assert dkim_canon.is_crlf(data) == (to_crlf(data) is data or to_crlf(data) == data)
