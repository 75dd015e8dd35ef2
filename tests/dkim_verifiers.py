"""Independent DKIM verifiers for the tests: dkimpy, and OpenDKIM's milter in verify mode.

`OpenDkimMilter` runs Debian's `opendkim` in the foreground on a loopback
port, in verify mode, with the public keys from a `TestPublicKeys` file (no
DNS), and talks the milter protocol to it as an MTA does (`verify`): it
offers the leading-space option (SMFIP_HDR_LEADSPC), as Postfix does, so the
filter sees every header field exactly as written, which simple header
canonicalization needs. The verdicts come from the Authentication-Results
header the milter asks to insert.
"""

from __future__ import annotations

import re
import shutil
import socket
import struct
import subprocess
import time
from pathlib import Path

import dkim

from greenarrow.lib.dkim.signing import DkimKeys

OPENDKIM = shutil.which("opendkim") or (
    "/usr/sbin/opendkim" if Path("/usr/sbin/opendkim").exists() else None)
NO_OPENDKIM = "OpenDKIM's milter (Debian package opendkim) is not installed"

_RESULT = re.compile(rb"dkim=(\w+)[^;]*?header\.s=([\w.-]+)")


def txt_records(keys: DkimKeys) -> dict[str, str]:
    """`selector._domainkey.domain` -> TXT value, for every loaded key."""
    out = {}
    for domain, selector in keys.pairs():
        key = keys.get(domain, selector)
        assert key is not None
        out[key.dns_name()] = key.dns_txt()
    return out


def dkimpy_results(message: bytes, records: dict[str, str]) -> list[bool]:
    """dkimpy's verdict on each DKIM-Signature of `message`, top first."""
    table = {f"{name}.".encode(): value.encode() for name, value in records.items()}

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return table.get(name.lower())

    headers, _ = dkim.rfc822_parse(message)
    count = sum(1 for name, _ in headers if name.lower() == b"dkim-signature")
    checker = dkim.DKIM(message)
    results = []
    for i in range(count):
        try:
            results.append(bool(checker.verify(i, dnsfunc=dnsfunc)))
        except dkim.DKIMException:  # e.g. "body hash mismatch" is raised, not returned
            results.append(False)
    return results


# milter protocol (libmilter's mfdef.h): commands, and the protocol bits used here
_LEADSPC = 0x100000
_SKIP = {b"C": 0x1, b"H": 0x2, b"M": 0x4, b"R": 0x8, b"B": 0x10, b"L": 0x20, b"N": 0x40,
         b"T": 0x200}
_NO_REPLY = {b"C": 0x1000, b"H": 0x2000, b"M": 0x4000, b"R": 0x8000, b"B": 0x80000, b"L": 0x80,
             b"N": 0x40000, b"T": 0x10000}
_FINAL = (b"a", b"c", b"t", b"r", b"d", b"y")


def _packet(command: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(data) + 1) + command + data


def _read(sock: socket.socket) -> tuple[bytes, bytes]:
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            assert chunk, "the milter closed the connection"
            data += chunk
        return data

    (size,) = struct.unpack(">I", exactly(4))
    data = exactly(size)
    return data[:1], data[1:]


class OpenDkimMilter:
    """`opendkim -f` in verify mode on a free loopback port; stopped by its pid."""

    def __init__(self, records: dict[str, str], folder: Path) -> None:
        assert OPENDKIM is not None, NO_OPENDKIM
        folder.mkdir(parents=True, exist_ok=True)
        keys = folder / "keys.txt"
        keys.write_text("".join(f"{name} {value}\n" for name, value in records.items()))
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        conf = folder / "opendkim.conf"
        conf.write_text(f"Mode v\nTestPublicKeys {keys}\nSyslog no\nAuthservID test\n"
                        f"Socket inet:{self.port}@127.0.0.1\n")
        self.process = subprocess.Popen([OPENDKIM, "-f", "-x", str(conf)],
                                        stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                assert self.process.poll() is None, "opendkim exited at start"
                assert time.monotonic() < deadline, "opendkim did not listen in 20 s"
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def verify(self, message: bytes) -> dict[str, str]:
        """OpenDKIM's result (`pass`, `fail`, ...) for each signature of a CRLF message, by selector."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as sock:
            sock.sendall(_packet(b"O", struct.pack(">III", 6, 0x1FF, _LEADSPC)))
            command, data = _read(sock)
            assert command == b"O", command
            protocol = struct.unpack(">III", data[:12])[2]
            assert protocol & _LEADSPC, "the milter did not take header values as written"

            def step(command: bytes, data: bytes = b"") -> None:
                if protocol & _SKIP[command]:
                    return
                sock.sendall(_packet(command, data))
                if not protocol & _NO_REPLY[command]:
                    reply, _ = _read(sock)
                    assert reply == b"c", (command, reply)

            sock.sendall(_packet(b"D", b"Cj\0mta.test\0"))
            step(b"C", b"client.test\x004" + struct.pack(">H", 2525) + b"127.0.0.1\0")
            step(b"H", b"client.test\0")
            sock.sendall(_packet(b"D", b"Mi\0TESTQUEUEID\0"))
            step(b"M", b"<sender@origin.test>\0")
            step(b"R", b"<rcpt@dest.test>\0")
            step(b"T")
            head, _, body = message.partition(b"\r\n\r\n")
            fields: list[bytes] = []
            for line in head.split(b"\r\n"):
                if not line:  # the end of a message without a body
                    continue
                if line[:1] in (b" ", b"\t") and fields:
                    fields[-1] += b"\r\n" + line
                else:
                    fields.append(line)
            for field in fields:
                name, _, value = field.partition(b":")
                step(b"L", name + b"\0" + value + b"\0")
            step(b"N")
            for start in range(0, len(body), 65535):
                step(b"B", body[start:start + 65535])
            sock.sendall(_packet(b"E"))
            inserted = b""
            for _ in range(100):
                command, data = _read(sock)
                if command in (b"i", b"h") and b"Authentication-Results\0" in data:
                    inserted += data.partition(b"Authentication-Results\0")[2]
                if command in _FINAL:
                    break
            sock.sendall(_packet(b"Q"))
        return {s.decode(): r.decode() for r, s in _RESULT.findall(inserted)}
