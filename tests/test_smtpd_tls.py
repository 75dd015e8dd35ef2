"""STARTTLS on SMTP injection: `control/smtp.tls.cert` and `control/smtp.tls.key`.

The server is the real SmtpServer on loopback (the ServerThread harness of
test_smtpd); the certificate is a fresh self-signed one made by
smtp_receivers.self_signed_context, and the client checks it against that
certificate (cafile), so the test proves which certificate was served.
"""

from __future__ import annotations

import smtplib
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
from smtp_receivers import self_signed_context
from test_smtpd import MESSAGE, RELAY_RULES, WAIT, ServerThread, free_port, queued

from greenarrow.lib.config import control
from greenarrow.lib.config.control import ControlError
from greenarrow.lib.core.paths import Root
from greenarrow.lib.inject.smtp_injection import SmtpServer, tls_context
from greenarrow.lib.ops.install_root import init_root

NAME = "inject.tls.test"


@pytest.fixture
def root(tmp_path: Path) -> Root:
    r = Root(tmp_path / "hvmail")
    init_root(r, "smtp.injector.test")
    (r.control / "smtp.tcp").write_text(RELAY_RULES)
    control.write(r.control, "smtp.listen", [f"127.0.0.1:{free_port()}"])
    return r


def make_cert(folder: Path, name: str = NAME) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    self_signed_context(folder, name)
    return folder / "cert.pem", folder / "key.pem"


def client(root: Root) -> smtplib.SMTP:
    port = control.read(root.control, "smtp.listen")[0][1]
    return smtplib.SMTP("127.0.0.1", port, timeout=WAIT)


def trusting(cert: Path, name: str = NAME) -> ssl.SSLContext:
    """A client context that accepts only this certificate, for this name."""
    context = ssl.create_default_context(cafile=str(cert))
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
    return context


def starttls(smtp: smtplib.SMTP, cert: Path, name: str = NAME) -> None:
    """smtplib's starttls, checking the server's certificate against `cert` for `name`."""
    smtp.ehlo("client.test")
    code, _ = smtp.docmd("STARTTLS")
    assert code == 220
    smtp.sock = trusting(cert, name).wrap_socket(smtp.sock, server_hostname=name)
    smtp.file = None
    smtp.helo_resp = smtp.ehlo_resp = None
    smtp.esmtp_features = {}
    smtp.does_esmtp = False
    smtp.ehlo("client.test")


def test_no_certificate_no_starttls(root: Root, start: Callable[[], ServerThread]) -> None:
    assert tls_context(root.control) is None
    start()
    with client(root) as smtp:
        smtp.ehlo("client.test")
        assert not smtp.has_extn("starttls")
        code, _ = smtp.docmd("STARTTLS")
        assert code in (454, 500, 502)  # aiosmtpd: 454 TLS not available
        smtp.sendmail("s@example.com", ["r@example.com"], MESSAGE)  # plain mail still goes
    (_, _, message), = queued(root)
    assert b"with ESMTP;" in message


def test_starttls_then_send_is_queued(root: Root, start: Callable[[], ServerThread]) -> None:
    cert, _ = make_cert(root.control / "tls")
    control.write(root.control, "smtp.tls.cert", "tls/cert.pem")  # relative to control/
    control.write(root.control, "smtp.tls.key", "tls/key.pem")
    server = start()
    with client(root) as smtp:
        smtp.ehlo("client.test")
        assert smtp.has_extn("starttls")
        context = trusting(cert)
        context.check_hostname = False  # smtplib checks the name it connected to: 127.0.0.1
        smtp.starttls(context=context)  # still refuses any certificate but ours
        smtp.ehlo("client.test")
        assert not smtp.has_extn("starttls")  # not offered twice
        assert smtp.has_extn("pipelining") and smtp.has_extn("8bitmime")
        refused = smtp.sendmail("s@example.com", ["r@example.com"], MESSAGE)
        assert refused == {}
    (_, envelope, message), = queued(root)
    assert envelope["recipient"] == "r@example.com"
    assert message.endswith(MESSAGE)
    assert b"with ESMTPS;" in message  # RFC 3848: the trace says TLS was used
    server.wait_sessions_done()


def test_certificate_and_key_in_one_file(root: Root, start: Callable[[], ServerThread],
                                         tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path / "elsewhere")
    both = tmp_path / "elsewhere" / "both.pem"
    both.write_bytes(key.read_bytes() + cert.read_bytes())
    control.write(root.control, "smtp.tls.cert", str(both))  # an absolute path
    start()
    with client(root) as smtp:
        starttls(smtp, cert)
        smtp.sendmail("s@example.com", ["r@example.com"], MESSAGE)
    assert len(queued(root)) == 1


@pytest.mark.parametrize("case", ["missing_cert", "missing_key", "not_a_cert", "not_a_key",
                                  "mismatch", "key_without_cert"])
def test_bad_files_named_at_start(root: Root, tmp_path: Path, case: str) -> None:
    cert, key = make_cert(root.control / "tls")
    other_cert, other_key = make_cert(tmp_path / "other", "other.test")
    cert_setting, key_setting, named = "tls/cert.pem", "tls/key.pem", None
    if case == "missing_cert":
        cert_setting, named = "tls/nope.pem", root.control / "tls/nope.pem"
    elif case == "missing_key":
        key_setting, named = "tls/nokey.pem", root.control / "tls/nokey.pem"
    elif case == "not_a_cert":
        cert.write_text("hello\n")
        named = cert
    elif case == "not_a_key":
        key.write_text("hello\n")
        named = key
    elif case == "mismatch":
        key_setting, named = str(other_key), other_key
    else:
        cert_setting, named = "", root.control / "smtp.tls.key"
    control.write(root.control, "smtp.tls.cert", cert_setting)
    control.write(root.control, "smtp.tls.key", key_setting)
    with pytest.raises(ControlError) as info:
        SmtpServer(root)
    assert str(named) in str(info.value)


def test_reload_turns_tls_on_and_keeps_it_through_a_bad_file(
        root: Root, start: Callable[[], ServerThread], tmp_path: Path) -> None:
    server = start()
    with client(root) as smtp:
        smtp.ehlo("client.test")
        assert not smtp.has_extn("starttls")

    cert, key = make_cert(root.control / "tls")
    control.write(root.control, "smtp.tls.cert", "tls/cert.pem")
    control.write(root.control, "smtp.tls.key", "tls/key.pem")
    server.reload()
    with client(root) as smtp:
        starttls(smtp, cert)
        smtp.sendmail("s@example.com", ["r@example.com"], MESSAGE)

    # a bad file at reload: refused, the context in use stays
    control.write(root.control, "smtp.tls.cert", "tls/missing.pem")
    server.reload()
    with client(root) as smtp:
        starttls(smtp, cert)
        smtp.sendmail("s@example.com", ["r@example.com"], MESSAGE)

    # a new certificate at reload is the one served afterwards
    new_cert, _ = make_cert(root.control / "tls2", "new.tls.test")
    control.write(root.control, "smtp.tls.cert", "tls2/cert.pem")
    control.write(root.control, "smtp.tls.key", "tls2/key.pem")
    server.reload()
    with client(root) as smtp:
        with pytest.raises(ssl.SSLCertVerificationError):
            starttls(smtp, cert)  # the old certificate is no longer served
    with client(root) as smtp:
        starttls(smtp, new_cert, "new.tls.test")
        smtp.sendmail("s@example.com", ["r@example.com"], MESSAGE)
    assert len(queued(root)) == 3
