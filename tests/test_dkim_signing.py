"""DKIM signing (greenarrow.lib.dkim.signing), checked with dkimpy's verifier.

No real DNS: every verification gets a `dnsfunc` that answers from the TXT
records the test built from the keys (or took from the corpus). Keys are made
here with `cryptography`; the corpus vectors (shared/corpus/dkimpy and
shared/corpus/stalwart-mail-auth) are used as they are, and the RFC 8463
example signatures are reproduced byte for byte.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import shutil
import smtplib
import subprocess
import threading
import time
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from engine import Engine, route_conf, wait_until
from smtp_receivers import Receiver

from greenarrow.lib.config import control
from greenarrow.lib.config.control import ControlError
from greenarrow.lib.core import users
from greenarrow.lib.dkim import signing as dkim_signing
from greenarrow.lib.dkim.signing import (
    DkimKeys,
    DkimSigner,
    decode_request,
    encode_request,
    parse_dkim_header_values,
    read_hashfunc,
)

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"
if not CORPUS.is_dir():
    CORPUS = Path("/work/shared/corpus")

MESSAGE = (
    b"From: Sender Name <sender@origin.test>\r\n"
    b"To: <rcpt@dest.test>\r\n"
    b"Subject: a test  message\r\n"
    b"Date: Sun, 22 Nov 2026 10:00:00 +0000\r\n"
    b"Message-ID: <m1@origin.test>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"List-Unsubscribe: <mailto:unsub@origin.test>\r\n"
    b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
    b"X-Mailer: test\r\n"
    b"\r\n"
    b"Hello,  world \r\n"
    b"\r\n"
    b"last line\r\n"
)


# --------------------------------------------------------------------------- helpers


def pem(key: object) -> bytes:
    return key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.fixture(scope="module")
def rsa_pem() -> bytes:
    return pem(rsa.generate_private_key(65537, 2048))


@pytest.fixture(scope="module")
def rsa_pem2() -> bytes:
    return pem(rsa.generate_private_key(65537, 2048))


@pytest.fixture(scope="module")
def ed_pem() -> bytes:
    return pem(ed25519.Ed25519PrivateKey.generate())


def put_key(control_dir: Path, domain: str, selector: str, data: bytes) -> Path:
    path = control_dir / "dkim" / domain / f"{selector}.pem"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    users.restrict(path)  # a key other users may read is refused
    return path


def dns_for(keys: DkimKeys):
    """A dkimpy dnsfunc answering from the loaded keys' public TXT records."""
    records = {}
    for domain, selector in keys.pairs():
        key = keys.get(domain, selector)
        assert key is not None
        records[f"{key.dns_name()}.".encode()] = key.dns_txt().encode()
    return stub_dns(records)


def stub_dns(records: dict):
    table = {(k if isinstance(k, bytes) else k.encode()).lower(): v for k, v in records.items()}

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        value = table.get(name.lower())
        return value.encode() if isinstance(value, str) else value

    return dnsfunc


def signatures(message: bytes) -> list[dict[bytes, bytes]]:
    """The tags of each DKIM-Signature header, top first."""
    headers, _ = dkim.rfc822_parse(message)
    return [dkim.util.parse_tag_value(v) for k, v in headers if k.lower() == b"dkim-signature"]


def verify_all(message: bytes, dnsfunc) -> list[bool]:
    d = dkim.DKIM(message)
    return [d.verify(i, dnsfunc=dnsfunc) for i in range(len(signatures(message)))]


@pytest.fixture
def cdir(tmp_path: Path) -> Path:
    c = tmp_path / "control"
    c.mkdir()
    return c


# --------------------------------------------------------------------------- signing


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
def test_signature_verifies(cdir: Path, kind: str, rsa_pem: bytes, ed_pem: bytes) -> None:
    put_key(cdir, "origin.test", "default", rsa_pem if kind == "rsa" else ed_pem)
    signer = DkimSigner.from_control(cdir)
    out, keys = signer.sign(MESSAGE)
    assert keys == [("origin.test", "default")]
    assert out.endswith(MESSAGE) and out.startswith(b"DKIM-Signature: ")
    (sig,) = signatures(out)
    assert sig[b"a"] == (b"rsa-sha256" if kind == "rsa" else b"ed25519-sha256")
    assert sig[b"c"] == b"relaxed/relaxed"
    assert sig[b"d"] == b"origin.test" and sig[b"s"] == b"default"
    signed = re.split(rb"\s*:\s*", sig[b"h"])
    for name in (b"from", b"to", b"subject", b"date", b"message-id", b"mime-version",
                 b"content-type", b"list-unsubscribe", b"list-unsubscribe-post"):
        assert name in signed
    assert b"x-mailer" not in signed
    assert signed.count(b"from") == 2  # oversigned: a second From breaks the signature
    assert verify_all(out, dns_for(signer.keys)) == [True]
    # and what a relay may do under relaxed/relaxed keeps it valid
    relayed = out.replace(b"Subject: a test  message", b"subject:   a test message")
    assert dkim.verify(relayed, dnsfunc=dns_for(signer.keys))
    # what it may not do breaks it
    assert not dkim.verify(out.replace(b"last line", b"last line!"), dnsfunc=dns_for(signer.keys))
    added = out.replace(b"X-Mailer", b"From: evil@attacker.test\r\nX-Mailer")
    assert not dkim.verify(added, dnsfunc=dns_for(signer.keys))


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
def test_byte_identical_to_dkimpy_sign(cdir: Path, kind: str, rsa_pem: bytes, ed_pem: bytes,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Our private-key step (OpenSSL) yields exactly what dkimpy's own sign() does."""
    monkeypatch.setattr(time, "time", lambda: 1795000000.0)
    put_key(cdir, "origin.test", "default", rsa_pem if kind == "rsa" else ed_pem)
    out, _ = DkimSigner.from_control(cdir).sign(MESSAGE)
    header = out[: len(out) - len(MESSAGE)]
    include = re.split(rb"\s*:\s*", signatures(out)[0][b"h"])
    if kind == "rsa":
        key_arg, algorithm = rsa_pem, b"rsa-sha256"
    else:
        raw = serialization.load_pem_private_key(ed_pem, None).private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
            serialization.NoEncryption())
        key_arg, algorithm = base64.b64encode(raw), b"ed25519-sha256"
    expected = dkim.sign(MESSAGE, b"default", b"origin.test", key_arg,
                         canonicalize=(b"relaxed", b"relaxed"), signature_algorithm=algorithm,
                         include_headers=include)
    assert header == expected


def test_hashfunc_sha1(cdir: Path, rsa_pem: bytes, ed_pem: bytes) -> None:
    put_key(cdir, "origin.test", "default", rsa_pem)
    put_key(cdir, "origin.test", "ed", ed_pem)
    (cdir / "dkim" / "hashfunc").write_text("sha1\n")
    assert read_hashfunc(cdir) == "sha1"
    signer = DkimSigner.from_control(cdir)
    out, keys = signer.sign(MESSAGE, "origin.test:default,origin.test:ed")
    assert keys == [("origin.test", "default"), ("origin.test", "ed")]
    rsa_sig, ed_sig = signatures(out)
    assert rsa_sig[b"a"] == b"rsa-sha1"
    assert ed_sig[b"a"] == b"ed25519-sha256"  # RFC 8463 has no sha1 form
    assert verify_all(out, dns_for(signer.keys)) == [True, True]


def test_hashfunc_values(cdir: Path) -> None:
    assert read_hashfunc(cdir) == "sha256"  # no file
    (cdir / "dkim").mkdir()
    control.write(cdir, "dkim/hashfunc", "SHA256")
    assert read_hashfunc(cdir) == "sha256"
    control.write(cdir, "dkim/hashfunc", "md5")
    with pytest.raises(ControlError, match=r"dkim/hashfunc: bad value 'md5'"):
        read_hashfunc(cdir)
    with pytest.raises(ControlError, match="hashfunc"):
        DkimSigner.from_control(cdir)


def test_sender_domain_wins_when_it_has_a_key(cdir: Path, rsa_pem: bytes, rsa_pem2: bytes) -> None:
    put_key(cdir, "origin.test", "default", rsa_pem)
    put_key(cdir, "esp.test", "default", rsa_pem2)
    signer = DkimSigner.from_control(cdir)
    with_sender = b"Sender: <bounces@ESP.test>\r\n" + MESSAGE
    out, keys = signer.sign(with_sender)
    assert keys == [("esp.test", "default")]
    assert verify_all(out, dns_for(signer.keys)) == [True]
    assert b"sender" in re.split(rb"\s*:\s*", signatures(out)[0][b"h"])
    # a Sender domain with no key: the From domain's key
    out, keys = signer.sign(b"Sender: someone@elsewhere.test\r\n" + MESSAGE)
    assert keys == [("origin.test", "default")]
    # no Sender header: From
    assert signer.sign(MESSAGE).keys == [("origin.test", "default")]


def test_parent_domain_key_and_no_key(cdir: Path, rsa_pem: bytes) -> None:
    put_key(cdir, "origin.test", "default", rsa_pem)
    signer = DkimSigner.from_control(cdir)
    sub = MESSAGE.replace(b"sender@origin.test", b"news@mail.news.origin.test")
    out, keys = signer.sign(sub)
    assert keys == [("origin.test", "default")]
    assert verify_all(out, dns_for(signer.keys)) == [True]
    other = MESSAGE.replace(b"sender@origin.test", b"sender@other.test")
    assert signer.sign(other) == (other, [])  # no key: unchanged
    # a key under another selector is not the default choice
    assert DkimSigner(DkimKeys({}), "sha256").sign(MESSAGE) == (MESSAGE, [])


def test_requested_signatures(cdir: Path, rsa_pem: bytes, ed_pem: bytes, rsa_pem2: bytes) -> None:
    """X-GreenArrow-DKIM asking for two signatures: both, in order, both verify."""
    put_key(cdir, "origin.test", "default", rsa_pem)
    put_key(cdir, "brand.test", "s1", ed_pem)
    put_key(cdir, "esp.test", "default", rsa_pem2)
    signer = DkimSigner.from_control(cdir)
    pairs = parse_dkim_header_values(
        ['[{"domain": "brand.test", "selector": "s1"},\r\n {"domain": "esp.test"}]'])
    request = encode_request(pairs)
    assert request == "brand.test:s1,esp.test:default"
    out, keys = signer.sign(MESSAGE, request)
    assert keys == [("brand.test", "s1"), ("esp.test", "default")]
    assert [(s[b"d"], s[b"s"]) for s in signatures(out)] == [(b"brand.test", b"s1"),
                                                             (b"esp.test", b"default")]
    assert verify_all(out, dns_for(signer.keys)) == [True, True]
    # a requested key that does not exist is left out; no fallback to the From domain
    out, keys = signer.sign(MESSAGE, "nokey.test:default,esp.test:default")
    assert keys == [("esp.test", "default")]
    assert signer.sign(MESSAGE, "nokey.test:default") == (MESSAGE, [])


def test_no_from_header_not_signed(cdir: Path, rsa_pem: bytes) -> None:
    put_key(cdir, "origin.test", "default", rsa_pem)
    signer = DkimSigner.from_control(cdir)
    message = MESSAGE.replace(b"From: Sender Name <sender@origin.test>\r\n", b"")
    assert signer.sign(message, "origin.test:default") == (message, [])


def test_sign_async_runs_off_the_loop(cdir: Path, rsa_pem: bytes) -> None:
    put_key(cdir, "origin.test", "default", rsa_pem)
    signer = DkimSigner.from_control(cdir)
    threads: list[str] = []
    original = signer.sign

    def recording(message: bytes, request: str = "") -> dkim_signing.Signed:
        threads.append(threading.current_thread().name)
        return original(message, request)

    signer.sign = recording  # type: ignore[method-assign]

    async def main() -> list[dkim_signing.Signed]:
        return await asyncio.gather(*(signer.sign_async(MESSAGE) for _ in range(8)))

    results = asyncio.run(main())
    assert all(r.keys == [("origin.test", "default")] for r in results)
    assert all(dkim.verify(r.message, dnsfunc=dns_for(signer.keys)) for r in results)
    assert threads and all(name.startswith("dkim") for name in threads)
    # no keys at all: no thread hop, the message as it was
    empty = DkimSigner(DkimKeys(), "sha256")
    assert asyncio.run(empty.sign_async(MESSAGE)) == (MESSAGE, [])


# --------------------------------------------------------------------------- keys


def test_keys_loaded_once_and_reloaded(cdir: Path, rsa_pem: bytes, rsa_pem2: bytes,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    path = put_key(cdir, "origin.test", "default", rsa_pem)
    keys = DkimKeys.from_control(cdir)
    signer = DkimSigner(keys, "sha256")
    first_txt = keys.get("origin.test").dns_txt()

    # signing never opens a file
    real_open = open

    def no_open(*args, **kwargs):
        raise AssertionError(f"file opened while signing: {args[0]}")

    monkeypatch.setattr("builtins.open", no_open)
    assert signer.sign(MESSAGE).keys == [("origin.test", "default")]
    monkeypatch.setattr("builtins.open", real_open)

    path.write_bytes(rsa_pem2)
    out = signer.sign(MESSAGE).message  # still the key in memory
    assert dkim.verify(out, dnsfunc=stub_dns({b"default._domainkey.origin.test.": first_txt}))
    keys.load(cdir)
    second_txt = keys.get("origin.test").dns_txt()
    assert second_txt != first_txt
    out = signer.sign(MESSAGE).message
    assert dkim.verify(out, dnsfunc=stub_dns({b"default._domainkey.origin.test.": second_txt}))
    assert not dkim.verify(out, dnsfunc=stub_dns({b"default._domainkey.origin.test.": first_txt}))

    # a bad file at reload: ControlError naming it, and the keys held stay
    bad = put_key(cdir, "broken.test", "default", b"not a key\n")
    with pytest.raises(ControlError, match=re.escape(str(bad))):
        keys.load(cdir)
    assert keys.pairs() == [("origin.test", "default")]
    assert keys.get("origin.test").dns_txt() == second_txt
    bad.unlink()
    path.unlink()
    keys.load(cdir)
    assert len(keys) == 0 and signer.sign(MESSAGE) == (MESSAGE, [])


def test_key_file_layout(cdir: Path, rsa_pem: bytes, ed_pem: bytes) -> None:
    assert len(DkimKeys.from_control(cdir)) == 0  # no control/dkim at all
    put_key(cdir, "Origin.TEST", "Default", rsa_pem)
    put_key(cdir, "origin2.test", "ed", ed_pem)
    (cdir / "dkim" / "origin2.test" / "ed.pub").write_text("public part, ignored\n")
    (cdir / "dkim" / "origin2.test" / ".default.pem.swp").write_text("editor file\n")
    (cdir / "dkim" / "hashfunc").write_text("sha256\n")
    keys = DkimKeys.from_control(cdir)
    assert keys.pairs() == [("origin.test", "default"), ("origin2.test", "ed")]
    assert keys.get("ORIGIN.test.", "DEFAULT").algorithm == "rsa"
    assert keys.get("origin2.test", "ed").algorithm == "ed25519"
    assert keys.get("origin2.test", "ed").dns_txt().startswith("v=DKIM1; k=ed25519; p=")


@pytest.mark.parametrize("case", ["garbage", "encrypted", "small_rsa", "ec", "bad_name", "twice"])
def test_bad_key_files(cdir: Path, case: str, rsa_pem: bytes) -> None:
    if case == "garbage":
        path = put_key(cdir, "origin.test", "default", b"-----BEGIN PRIVATE KEY-----\nxx\n")
        message = "not a PEM private key"
    elif case == "encrypted":
        key = serialization.load_pem_private_key(rsa_pem, None)
        data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.BestAvailableEncryption(b"secret"))
        path = put_key(cdir, "origin.test", "default", data)
        message = "encrypted"
    elif case == "small_rsa":
        if shutil.which("openssl") is None:
            pytest.skip("no openssl to make a 512-bit key (cryptography refuses to)")
        small = subprocess.run(["openssl", "genrsa", "512"], capture_output=True, check=True,
                               timeout=60).stdout
        path = put_key(cdir, "origin.test", "default", small)
        message = "512 bits"
    elif case == "ec":
        path = put_key(cdir, "origin.test", "default", pem(ec.generate_private_key(ec.SECP256R1())))
        message = "RSA or Ed25519"
    elif case == "bad_name":
        path = put_key(cdir, "origin.test", "bad selector", rsa_pem)
        message = "not a DNS name"
    else:
        put_key(cdir, "origin.test", "default", rsa_pem)
        path = put_key(cdir, "ORIGIN.test", "default", rsa_pem)
        message = "a second key"
    with pytest.raises(ControlError) as info:
        DkimKeys.from_control(cdir)
    assert str(path) in str(info.value) and message in str(info.value)


# --------------------------------------------------------------------------- X-GreenArrow-DKIM


def test_header_object_array_and_accumulation() -> None:
    assert parse_dkim_header_values([]) == []
    assert parse_dkim_header_values(['{"domain":"Example.COM","selector":"s1"}']) == [
        ("example.com", "s1")]
    assert parse_dkim_header_values(['{"domain": "example.com"}']) == [("example.com", "default")]
    values = ['[{"domain":"a.test","selector":"s1"},{"domain":"b.test","selector":"s2"}]',
              '{"domain":"c.test",\r\n\t"selector":"s3"}',
              '{"domain":"a.test","selector":"s1"}']  # a repeat signs once
    assert parse_dkim_header_values(values) == [("a.test", "s1"), ("b.test", "s2"), ("c.test", "s3")]


def test_header_folded_inside_value() -> None:
    """Unfolding keeps the WSP after CRLF (RFC 5322), so a name folded mid-word is refused."""
    with pytest.raises(ValueError, match="X-GreenArrow-DKIM.*not a DNS name"):
        parse_dkim_header_values(['{"domain":"exa\r\n mple.test"}'])


def test_ten_signatures_allowed() -> None:
    one = [{"domain": f"d{i}.test", "selector": "s"} for i in range(6)]
    two = [{"domain": f"e{i}.test", "selector": "s"} for i in range(4)]
    pairs = parse_dkim_header_values([json.dumps(one), json.dumps(two)])
    assert len(pairs) == 10
    assert decode_request(encode_request(pairs)) == pairs


@pytest.mark.parametrize(
    "values, message",
    [
        (["{domain: example.com}"], "not valid JSON"),
        (['{"domain":"example.com"'], "not valid JSON"),
        ([""], "not valid JSON"),
        (["[]"], "non-empty array"),
        (['"example.com"'], "JSON object"),
        (["[1]"], "must be a JSON object"),
        (['{"selector":"s1"}'], "domain"),
        (['{"domain":5}'], "domain"),
        (['{"domain":"example.com","selectr":"s1"}'], "unknown key 'selectr'"),
        (['{"domain":"exa mple.com"}'], "not a DNS name"),
        (['{"domain":"example.com","selector":"a:b"}'], "not a DNS name"),
        ([json.dumps([{"domain": f"d{i}.test"} for i in range(11)])], "at most 10"),
        ([json.dumps([{"domain": f"d{i}.test"} for i in range(6)]),
          json.dumps([{"domain": f"e{i}.test"} for i in range(5)])], "at most 10"),
        (['{"domain":"example.com","selector":"' + "s" * 4100 + '"}'], "under 4096"),
    ],
)
def test_header_errors(values: list[str], message: str) -> None:
    with pytest.raises(ValueError, match="X-GreenArrow-DKIM") as info:
        parse_dkim_header_values(values)
    assert message in str(info.value)


def test_header_size_limit_is_4096_bytes() -> None:
    padding = " " * (4096 - len('{"domain":"example.com"}') - 1)
    assert parse_dkim_header_values(['{"domain":"example.com"}' + padding]) == [
        ("example.com", "default")]
    with pytest.raises(ValueError, match="4096 bytes"):
        parse_dkim_header_values(['{"domain":"example.com"}' + padding + " "])


def test_request_encoding() -> None:
    assert encode_request([]) == "" and decode_request("") == []
    pairs = [("example.com", "s1"), ("example.org", "default")]
    assert encode_request(pairs) == "example.com:s1,example.org:default"
    assert decode_request("example.com:s1,example.org:default") == pairs
    for bad in ("example.com", "example.com:", ":s1", "a.test:s1,,b.test:s2", "a b:c"):
        with pytest.raises(ValueError):
            decode_request(bad)


# --------------------------------------------------------------------------- corpus


def corpus_rows(source: str) -> list[dict]:
    path = CORPUS / source / "expected.jsonl"
    if not path.exists():
        pytest.skip(f"no corpus at {path}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_corpus_dkimpy_verify() -> None:
    rows = [r for r in corpus_rows("dkimpy") if r["kind"] == "verify"]
    assert rows
    for row in rows:
        message = (CORPUS / "dkimpy" / row["file"]).read_bytes()
        got = verify_all(message, stub_dns(row["dns_records"]))
        assert got == row["expected_verify_per_signature"], row["file"]
        assert len(got) == row["signatures"]


def test_corpus_stalwart_verify() -> None:
    rows = [r for r in corpus_rows("stalwart-mail-auth") if r["kind"] == "verify"]
    assert rows
    for row in rows:
        text = (CORPUS / "stalwart-mail-auth" / row["file"]).read_bytes()
        message = text.split(b"\n\n", 1)[1].replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        got = verify_all(message, stub_dns(row["dns_records"]))
        assert got == row["dkimpy_verify_per_signature_now"], row["file"]


def _dkimpy_data(name: str) -> bytes:
    return (CORPUS / "dkimpy" / name).read_bytes()


def test_corpus_dkimpy_sign_then_verify(tmp_path: Path) -> None:
    """Each sign_then_verify row, signed by our signer (relaxed/relaxed) and by dkimpy for the
    canonicalizations we do not produce, verified by dkimpy through the stub DNS."""
    rows = [r for r in corpus_rows("dkimpy") if r["kind"] == "sign_then_verify"]
    assert rows
    for row in rows:
        message = _dkimpy_data(row["message"]).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        private = _dkimpy_data(row["private_key"])
        txt = (row.get("dns_txt") or _dkimpy_data(row["dns_txt_file"]).decode()).strip()
        domain, selector = row["domain"], row["selector"]
        dnsfunc = stub_dns({f"{selector}._domainkey.{domain}.": txt})
        cdir = tmp_path / f"c{rows.index(row)}"
        put_key(cdir, domain, selector, private)
        signer = DkimSigner.from_control(cdir)
        for canon in row.get("canonicalizations", ["relaxed/relaxed"]):
            if canon == "relaxed/relaxed":
                signed, keys = signer.sign(message, encode_request([(domain, selector)]))
                assert keys == [(domain, selector)]
            else:
                header, body = canon.encode().split(b"/")
                signed = dkim.sign(message, selector.encode(), domain.encode(), private,
                                   canonicalize=(header, body)) + message
            if row.get("mutation", "").startswith('append b"foo" to the body'):
                assert dkim.verify(signed, dnsfunc=dnsfunc)  # before the change: valid
                signed += b"foo"
            assert dkim.verify(signed, dnsfunc=dnsfunc) is row["expected_verify"], (row, canon)


RFC8463_ED25519 = "nWGxne/9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A="  # RFC 8463 appendix A.2


def test_rfc8463_example_reproduced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Signing the RFC 8463 example message with its keys (Ed25519 from the RFC, RSA =
    dkimpy's test.private) at its t= gives exactly the example's two signatures."""
    rows = [r for r in corpus_rows("stalwart-mail-auth") if r.get("file") == "resources/dkim/001.txt"]
    if not rows:
        pytest.skip("RFC 8463 example not in the corpus")
    text = (CORPUS / "stalwart-mail-auth" / "resources/dkim/001.txt").read_bytes()
    signed = text.split(b"\n\n", 1)[1].replace(b"\n", b"\r\n")
    headers, body = dkim.rfc822_parse(signed)
    original = b"".join(k + b":" + v for k, v in headers if k.lower() != b"dkim-signature")
    original += b"\r\n" + body
    expected = signatures(signed)
    ed = ed25519.Ed25519PrivateKey.from_private_bytes(base64.b64decode(RFC8463_ED25519))
    cdir = tmp_path / "control"
    put_key(cdir, "football.example.com", "brisbane", pem(ed))
    put_key(cdir, "football.example.com", "test", _dkimpy_data("dkim/tests/data/test.private"))
    monkeypatch.setattr(time, "time", lambda: 1528637909.0)
    signer = DkimSigner.from_control(cdir)
    out, keys = signer.sign(original, "football.example.com:brisbane,football.example.com:test")
    assert keys == [("football.example.com", "brisbane"), ("football.example.com", "test")]
    ours = signatures(out)
    for mine, theirs in zip(ours, expected, strict=True):
        for tag in (b"a", b"c", b"d", b"i", b"q", b"s", b"t", b"h", b"bh", b"b"):
            assert re.sub(rb"\s+", b"", mine[tag]) == re.sub(rb"\s+", b"", theirs[tag]), tag
    assert verify_all(out, stub_dns(rows[0]["dns_records"])) == [True, True]



# --------------------------------------------------------------------------- through the engine


def test_engine_signs_what_it_delivers(tmp_path: Path, rsa_pem: bytes, ed_pem: bytes) -> None:
    """Real services: a key in control/dkim/origin.test/default.pem; mail injected From
    origin.test (command line and SMTP) arrives signed, and dkimpy verifies the receiver's
    copy. Mail from a domain with no key arrives as it was sent. A reload picks up a new key."""
    def message(n: int, domain: str = "origin.test") -> bytes:
        return (f"From: Someone <someone@{domain}>\r\nTo: <user{n}@dest.test>\r\n"
                f"Subject: dkim {n}\r\nMessage-ID: <dkim-{n}@{domain}>\r\n"
                "Date: Sun, 22 Nov 2026 10:00:00 +0000\r\n\r\n"
                f"Body {n}.\r\n.a dot line\r\n").encode()

    with Receiver("127.0.0.1") as rx:
        engine = Engine(tmp_path, conf=route_conf({"dest.test": rx.port}))
        put_key(engine.root.control, "origin.test", "default", rsa_pem)
        dnsfunc = dns_for(DkimKeys.from_control(engine.root.control))
        with engine:
            result = engine.sendmail("-f", "someone@origin.test", "user1@dest.test",
                                     message=message(1).replace(b"\r\n", b"\n"))
            assert result.returncode == 0, result.stderr
            with smtplib.SMTP("127.0.0.1", engine.smtp_port, timeout=30) as smtp:
                smtp.sendmail("someone@origin.test", ["user2@dest.test"], message(2))
                smtp.sendmail("someone@nokey.test", ["user3@dest.test"], message(3, "nokey.test"))
            wait_until(lambda: len(rx.messages) >= 3, 60, "3 messages at the receiver")
            got = {m.recipients[0]: m.content for m in rx.messages}
            for n in (1, 2):
                content = got[f"user{n}@dest.test"]
                assert content.startswith(b"DKIM-Signature: "), content[:200]
                assert content.endswith(message(n))
                assert [(s[b"d"], s[b"s"]) for s in signatures(content)] == [
                    (b"origin.test", b"default")]
                assert dkim.verify(content, dnsfunc=dnsfunc)
            assert b"DKIM-Signature" not in got["user3@dest.test"]

            # a new key for nokey.test, then greenarrow_config reload: the workers sign with it
            put_key(engine.root.control, "nokey.test", "default", ed_pem)
            reload = engine.program("greenarrow_config", "reload")
            assert reload.returncode == 0, reload.stderr
            dnsfunc = dns_for(DkimKeys.from_control(engine.root.control))

            def signed_after_reload() -> bool:
                n = 100 + len(rx.messages)
                assert engine.sendmail("-f", "someone@nokey.test", f"user{n}@dest.test",
                                       message=message(n, "nokey.test")).returncode == 0
                wait_until(lambda: any(m.recipients[0] == f"user{n}@dest.test"
                                       for m in rx.messages), 60, f"message {n}")
                (m,) = [m for m in rx.messages if m.recipients[0] == f"user{n}@dest.test"]
                return m.content.startswith(b"DKIM-Signature: ") and dkim.verify(
                    m.content, dnsfunc=dnsfunc)

            wait_until(signed_after_reload, 30, "a message signed with the reloaded key")
