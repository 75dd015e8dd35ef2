"""DKIM signing in the remote workers (spec §9.5), on dkimpy.

Keys
    One PEM private key per (domain, selector) at
    `$HVMAIL_ROOT/control/dkim/<domain>/<selector>.pem`, RSA (1024 bits or
    more) or Ed25519, PKCS#1 or PKCS#8, unencrypted. `DkimKeys.load` reads
    them all once, when a worker starts and again on reload (SIGHUP): a
    delivery attempt never touches the disk for a key. A bad file is a
    ControlError naming it, and a failed reload keeps the keys loaded before.
    Files not ending in `.pem` (and `control/dkim/hashfunc`) are ignored.
    Domain and selector are the folder and file names, lower-cased.

Which keys sign a message
    * Queue envelope key `dkim` (what injection stored from the
      `X-GreenArrow-DKIM` header, see `encode_request`) non-empty: exactly
      those (domain, selector) pairs, in that order; a pair with no key is
      skipped (logged), it never falls back to the default choice.
    * Otherwise the default choice: the `Sender:` domain's `default` key when
      there is a `Sender:` header and a key for it, else the `From:` domain's
      `default` key. Decision: when the exact domain has no key, its parent
      domains are tried, nearest first, down to two labels (From:
      news.example.com signs with example.com's key if news.example.com has
      none); d= is then the parent, which still passes DMARC's relaxed
      alignment. Sender's parents come before From's exact domain.
    * No key: the message goes out unchanged. `DkimSigner.sign` says so by
      returning an empty list of signing keys next to the message.

How
    relaxed/relaxed canonicalization (`control/dkim/canonicalization` may
    choose simple/simple, relaxed/simple or simple/relaxed), the headers of
    `SIGNED_HEADERS` that the message has (From, Subject and Date signed once
    more, so that a second one cannot be added), `a=rsa-sha256` (or `rsa-sha1`
    by `control/dkim/hashfunc`) or `ed25519-sha256` (RFC 8463; Ed25519 has no
    sha1 form, so hashfunc does not apply to it), t= the signing time, no x=
    and no l=. The message is signed as it is transmitted: with CRLF line
    endings and a final CRLF (`message.to_crlf`; the returned message is that
    form).
    Parsing and canonicalization are compiled (`greenarrow.pyx.dkim_canon`,
    byte for byte dkimpy's `rfc822_parse` and canonicalization of a CRLF
    message), the hashes are hashlib's and the private-key operation is
    OpenSSL's (the `cryptography` package); the DKIM-Signature layout and
    folding are dkimpy's (`dkim.fold`). The output is byte-identical to
    `dkim.sign`'s (tests/test_dkim_signing.py checks it), and dkimpy and
    OpenDKIM verify it (tests/test_dkim_canon.py). A message that cannot be
    parsed (a header line that is not a field) is sent unsigned (logged),
    not deferred.

Signing mostly runs without the GIL: the compiled body canonicalization,
hashlib on a body of more than 2 KB and OpenSSL's RSA all release it. So
`DkimSigner.sign_async` runs `sign` on a small per-process thread pool,
which lets one remote worker (where every attempt to one hot destination
goes) sign on both cores while its event loop keeps serving its other SMTP
sessions (bench/RESULTS-dkim.md).
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import hashlib
import logging
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import dkim
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa, utils

from greenarrow.lib.config import control
from greenarrow.lib.config.control import ControlError
from greenarrow.lib.core import users
from greenarrow.lib.core.message import to_crlf
from greenarrow.lib.dkim.request import (  # noqa: F401 (the request API, re-exported)
    _FOLD_RE,
    DEFAULT_SELECTOR,
    HEADER,
    MAX_HEADER_BYTES,
    MAX_SIGNATURES,
    _check_name,
    decode_request,
    encode_request,
    parse_dkim_header_values,
)
from greenarrow.pyx import dkim_canon

log = logging.getLogger("dkim")

MIN_RSA_BITS = 1024  # what dkimpy and the big receivers accept
HASHFUNC_FILE = "dkim/hashfunc"
HASHFUNCS = ("sha256", "sha1")
CANONICALIZATION_FILE = "dkim/canonicalization"
CANONICALIZATIONS = ("relaxed/relaxed", "simple/simple", "relaxed/simple", "simple/relaxed")
# Signing threads per process: signing releases the GIL for most of its work
# (see the module doc), so a worker signs on as many cores as it has threads.
THREADS = max(2, min(8, os.cpu_count() or 2))

#: Header fields signed when present: RFC 6376's recommended set (dkimpy's
#: DKIM.SHOULD) plus the one-click unsubscribe and feedback headers that
#: bulk receivers want covered by the signature.
SIGNED_HEADERS: tuple[bytes, ...] = tuple(dkim.DKIM.SHOULD) + (
    b"list-unsubscribe-post",
    b"feedback-id",
)
#: Signed once more than present, so that no second one can be added after
#: signing (the header-addition attack on what a mail reader displays). The
#: same choice as the RFC 8463 example, which the tests reproduce exactly.
OVERSIGNED_HEADERS: tuple[bytes, ...] = (b"from", b"subject", b"date")

_SIG_NAME = b"DKIM-Signature"


# --------------------------------------------------------------------------- keys





class DkimKey:
    """One loaded private key and what to publish in DNS for it."""

    __slots__ = ("domain", "selector", "path", "algorithm", "_key")

    def __init__(self, domain: str, selector: str, path: str,
                 key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> None:
        self.domain = domain
        self.selector = selector
        self.path = path
        self.algorithm = "ed25519" if isinstance(key, ed25519.Ed25519PrivateKey) else "rsa"
        self._key = key

    def signature_algorithm(self, hashfunc: str) -> bytes:
        """The a= tag: hashfunc applies to RSA only (RFC 8463 defines ed25519-sha256 alone)."""
        if self.algorithm == "ed25519":
            return b"ed25519-sha256"
        return b"rsa-sha1" if hashfunc == "sha1" else b"rsa-sha256"

    def sign_digest(self, digest: bytes, algorithm: bytes) -> bytes:
        """The b= bytes for the header hash `digest` (RSA PKCS#1 v1.5, or Ed25519 over the digest)."""
        if isinstance(self._key, ed25519.Ed25519PrivateKey):
            return self._key.sign(digest)
        chosen = hashes.SHA1() if algorithm == b"rsa-sha1" else hashes.SHA256()
        return self._key.sign(digest, padding.PKCS1v15(), utils.Prehashed(chosen))

    def dns_txt(self) -> str:
        """The TXT record to publish at `<selector>._domainkey.<domain>`."""
        public = self._key.public_key()
        if isinstance(public, ed25519.Ed25519PublicKey):
            raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}"
        der = public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"

    def dns_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    def __repr__(self) -> str:
        return f"DkimKey({self.domain!r}, {self.selector!r}, {self.algorithm})"


def load_key_file(path: str | os.PathLike, domain: str, selector: str) -> DkimKey:
    """Parse one PEM key file; ControlError naming the file if it is not a usable key."""
    path = str(path)
    try:
        with open(path, "rb") as f:
            problem = users.private_file_problem(path, os.fstat(f.fileno()))
            if problem:
                raise ControlError(problem)
            data = f.read()
    except OSError as e:
        raise ControlError(f"{path}: cannot read the DKIM key: {e.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ControlError(f"{path}: the DKIM key is encrypted; store it without a passphrase") from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise ControlError(f"{path}: not a PEM private key ({e})") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise ControlError(
                f"{path}: RSA key of {key.key_size} bits; DKIM needs at least {MIN_RSA_BITS}"
            )
    elif not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ControlError(f"{path}: a {type(key).__name__}; DKIM keys must be RSA or Ed25519")
    return DkimKey(domain, selector, path, key)


class DkimKeys:
    """Every key of `control/dkim/`, by (domain, selector), held in memory."""

    def __init__(self, keys: dict[tuple[str, str], DkimKey] | None = None) -> None:
        self._keys: dict[tuple[str, str], DkimKey] = dict(keys or {})

    @classmethod
    def from_control(cls, control_dir: str | os.PathLike) -> DkimKeys:
        keys = cls()
        keys.load(control_dir)
        return keys

    def load(self, control_dir: str | os.PathLike) -> None:
        """(Re)read `control_dir/dkim/*/*.pem`; all or nothing.

        On a ControlError (a bad file, a bad name, two files for one key) the
        keys held before stay in force, so a worker's reload can keep going.
        """
        folder = Path(control_dir) / "dkim"
        found: dict[tuple[str, str], DkimKey] = {}
        try:
            domains = sorted(os.scandir(folder), key=lambda e: e.name)
        except FileNotFoundError:
            domains = []
        except OSError as e:
            raise ControlError(f"{folder}: cannot list the DKIM keys: {e.strerror}") from None
        for entry in domains:
            if not entry.is_dir() or entry.name.startswith("."):
                continue
            try:
                domain = _check_name(entry.name, "domain")
            except ValueError as e:
                raise ControlError(f"{entry.path}: {e}") from None
            for file in sorted(os.scandir(entry.path), key=lambda e: e.name):
                if not file.name.endswith(".pem") or file.name.startswith(".") or not file.is_file():
                    continue
                try:
                    selector = _check_name(file.name[: -len(".pem")], "selector")
                except ValueError as e:
                    raise ControlError(f"{file.path}: {e}") from None
                if (domain, selector) in found:
                    other = found[(domain, selector)].path
                    raise ControlError(f"{file.path}: a second key for {domain}/{selector} ({other})")
                found[(domain, selector)] = load_key_file(file.path, domain, selector)
        self._keys = found

    def get(self, domain: str, selector: str = DEFAULT_SELECTOR) -> DkimKey | None:
        return self._keys.get((domain.lower().rstrip("."), selector.lower()))

    def pairs(self) -> list[tuple[str, str]]:
        return sorted(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __bool__(self) -> bool:
        return bool(self._keys)


def read_hashfunc(control_dir: str | os.PathLike) -> str:
    """`control/dkim/hashfunc`: `sha256` (default) or `sha1`; ControlError naming file and value."""
    value = control.read_text(control_dir, HASHFUNC_FILE).strip().lower()
    if value not in HASHFUNCS:
        path = os.path.join(control_dir, HASHFUNC_FILE)
        raise ControlError(f"{path}: bad value {value!r}: expected sha256 or sha1")
    return value


def read_canonicalization(control_dir: str | os.PathLike) -> str:
    """`control/dkim/canonicalization`: header/body, `relaxed/relaxed` by default."""
    value = control.read_text(control_dir, CANONICALIZATION_FILE).strip().lower()
    if value not in CANONICALIZATIONS:
        path = os.path.join(control_dir, CANONICALIZATION_FILE)
        raise ControlError(
            f"{path}: bad value {value!r}: expected one of {', '.join(CANONICALIZATIONS)}"
        )
    return value


# --------------------------------------------------------------------------- requests














# --------------------------------------------------------------------------- signing


class Signed(NamedTuple):
    """What `DkimSigner.sign` did: the message to send and the keys that signed it."""

    message: bytes
    keys: list[tuple[str, str]]  # (domain, selector) of each signature added, top first


def _header_domain(headers: list, name: bytes) -> str | None:
    """The domain of the first address in the first `name` header, lower-cased."""
    for field, value in headers:
        if field.lower() == name:
            return address_domain(value)
    return None


# `Plain Name <local@domain>`, `"Quoted Name" <local@domain>` or `local@domain`: forms whose reading by
# email.utils.getaddresses is certain, so the common case skips that parser
# (tests/test_dkim_canon.py compares the two on the corpus and odd values).
_PLAIN_ADDRESS = re.compile(
    rb"[ \t]*(?:(?:\"[^\"\\\\\r\n]*\"[ \t]*|[\w .'-]*)<[^<>@\s\",;:()\[\]\\]+@([A-Za-z0-9.-]+)>"
    rb"|[^<>@\s\",;:()\[\]\\]+@([A-Za-z0-9.-]+))\s*\Z")


def address_domain(value: bytes) -> str | None:
    """The domain of the first address in a From/Sender value (as written), lower-cased."""
    match = _PLAIN_ADDRESS.match(value)
    if match:
        domain = (match.group(1) or match.group(2)).decode("ascii").rstrip(".").lower()
        return domain or None
    return address_domain_parsed(value)


def address_domain_parsed(value: bytes) -> str | None:
    """`address_domain` through email.utils.getaddresses, for every form."""
    text = _FOLD_RE.sub("", value.decode("utf-8", "replace"))
    for _, address in email.utils.getaddresses([text]):
        domain = address.rpartition("@")[2].strip().strip("[]").rstrip(".").lower()
        if "@" in address and domain:
            return domain
    return None


def _with_parents(domain: str) -> list[str]:
    """`a.b.example.com` -> itself, `b.example.com`, `example.com` (never a single label)."""
    labels = domain.split(".")
    return [".".join(labels[i:]) for i in range(max(1, len(labels) - 1))]


_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    """One pool per process, shared by every signer (a reload makes a new signer)."""
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="dkim")
        return _executor


class DkimSigner:
    """Adds DKIM-Signature headers to outgoing messages with the loaded keys."""

    def __init__(self, keys: DkimKeys, hashfunc: str = "sha256",
                 canonicalization: str = "relaxed/relaxed") -> None:
        if hashfunc not in HASHFUNCS:
            raise ValueError(f"hashfunc must be sha256 or sha1, not {hashfunc!r}")
        if canonicalization not in CANONICALIZATIONS:
            raise ValueError(f"canonicalization must be one of {CANONICALIZATIONS}, "
                             f"not {canonicalization!r}")
        self.keys = keys
        self.hashfunc = hashfunc
        self.canonicalization = canonicalization
        header, _, body = canonicalization.partition("/")
        self._relaxed_headers = header == "relaxed"
        self._relaxed_body = body == "relaxed"

    @classmethod
    def from_control(cls, control_dir: str | os.PathLike) -> DkimSigner:
        """Keys, hash function and canonicalization from control/; ControlError naming the bad file."""
        return cls(DkimKeys.from_control(control_dir), read_hashfunc(control_dir),
                   read_canonicalization(control_dir))

    def choose(self, headers: list, request: str = "") -> list[DkimKey]:
        """The keys for a message with these (dkimpy-parsed) headers; see the module doc."""
        if request:
            chosen = []
            for domain, selector in decode_request(request):
                key = self.keys.get(domain, selector)
                if key is None:
                    log.warning("no DKIM key for %s/%s: that signature is left out", domain, selector)
                elif key not in chosen:
                    chosen.append(key)
            return chosen
        for name in (b"sender", b"from"):
            domain = _header_domain(headers, name)
            for candidate in _with_parents(domain) if domain else []:
                key = self.keys.get(candidate, DEFAULT_SELECTOR)
                if key is not None:
                    return [key]
        return []

    def sign(self, message: bytes, request: str = "") -> Signed:
        """`message` with a DKIM-Signature per chosen key prepended.

        `request` is the envelope's `dkim` value ("" = the default choice).
        The message is signed, and returned, in its transmitted form (CRLF
        line endings, a final CRLF). Nothing to sign with, or a message that
        cannot be signed: the message unchanged and an empty key list.
        """
        if not self.keys:
            return Signed(message, [])
        wire = message if dkim_canon.is_crlf(message) else to_crlf(message)
        try:
            headers, body_at = dkim_canon.parse(wire)
        except ValueError as e:
            log.warning("message not DKIM-signed: %s", e)
            return Signed(message, [])
        keys = self.choose(headers, request)
        if not keys:
            return Signed(message, [])
        lowered = [name.lower() for name, _ in headers]
        include = _signed_names(lowered)
        if b"from" not in include:
            log.warning("message has no From header: not DKIM-signed")
            return Signed(message, [])
        signed = _select(headers, lowered, include)
        if self._relaxed_headers:
            header_text = b"".join(dkim_canon.relaxed_header(n, v) + b"\r\n" for n, v in signed)
        else:
            header_text = b"".join(n + b":" + v for n, v in signed)
        canon_body = dkim_canon.body(wire, body_at, self._relaxed_body)
        body_hashes: dict[str, bytes] = {}
        now = str(int(time.time())).encode("ascii")
        signatures = []
        try:
            for key in keys:
                algorithm = key.signature_algorithm(self.hashfunc)
                digest_name = "sha1" if algorithm == b"rsa-sha1" else "sha256"
                if digest_name not in body_hashes:
                    body_hashes[digest_name] = base64.b64encode(
                        hashlib.new(digest_name, canon_body).digest())
                signatures.append(self._signature(key, algorithm, digest_name, include,
                                                  header_text, body_hashes[digest_name], now))
        except ValueError as e:  # from the key operation: send unsigned rather than not at all
            log.warning("message not DKIM-signed: %s", e)
            return Signed(message, [])
        return Signed(b"".join(signatures) + wire, [(k.domain, k.selector) for k in keys])

    def _signature(self, key: DkimKey, algorithm: bytes, digest_name: str,
                   include: tuple[bytes, ...], header_text: bytes, body_hash: bytes,
                   now: bytes) -> bytes:
        """One DKIM-Signature header line (CRLF-terminated), laid out exactly as dkimpy's sign()."""
        domain = key.domain.encode("ascii")
        fields = [
            (b"v", b"1"),
            (b"a", algorithm),
            (b"c", self.canonicalization.encode("ascii")),
            (b"d", domain),
            (b"i", b"@" + domain),
            (b"q", b"dns/txt"),
            (b"s", key.selector.encode("ascii")),
            (b"t", now),
            (b"h", b" : ".join(include)),
            (b"bh", body_hash),
            # dkimpy's trick: a long b= placeholder makes b= fold onto its own line,
            # so refolding after filling it in leaves the other tags as hashed.
            (b"b", b"0" * 60),
        ]
        value = dkim.fold(b"; ".join(b"=".join(f) for f in fields), namelen=len(_SIG_NAME))
        value = b" " + dkim.RE_BTAG.sub(b"\\1", value)
        # The signature field itself is hashed last, without b='s value and the final CRLF.
        if self._relaxed_headers:
            own = dkim_canon.relaxed_header(_SIG_NAME, value)
        else:
            own = _SIG_NAME + b":" + value.rstrip()
        digest = hashlib.new(digest_name, header_text + own).digest()
        fields[-1] = (b"b", base64.b64encode(key.sign_digest(digest, algorithm)))
        value = dkim.fold(b"; ".join(b"=".join(f) for f in fields) + b"\r\n", namelen=len(_SIG_NAME))
        return _SIG_NAME + b": " + value

    async def sign_async(self, message: bytes, request: str = "") -> Signed:
        """`sign` on the shared thread pool, off the event loop (at once when there are no keys)."""
        if not self.keys:
            return Signed(message, [])
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(_pool(), self.sign, message, request)


_SIGNED_SET = frozenset(SIGNED_HEADERS) | frozenset(OVERSIGNED_HEADERS)


def _signed_names(lowered: list[bytes]) -> tuple[bytes, ...]:
    """The h= list: each signed field present, in message order, then the oversigned ones again."""
    present = [name for name in lowered if name in _SIGNED_SET]
    return tuple(present + [name for name in present if name in OVERSIGNED_HEADERS])


def _select(headers: list[tuple[bytes, bytes]], lowered: list[bytes],
            include: tuple[bytes, ...]) -> list[tuple[bytes, bytes]]:
    """The fields h= names, in h= order, each name taking its instances bottom-up (RFC 6376 §5.4.2)."""
    where: dict[bytes, list[int]] = {}
    for i, name in enumerate(lowered):
        if name in _SIGNED_SET:
            where.setdefault(name, []).append(i)
    chosen = []
    for name in include:
        left = where.get(name)
        if left:
            chosen.append(headers[left.pop()])
    return chosen
