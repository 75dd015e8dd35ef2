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
    relaxed/relaxed canonicalization, the headers of `SIGNED_HEADERS` that
    the message has (From, Subject and Date signed once more, so that a
    second one cannot be added), `a=rsa-sha256` (or `rsa-sha1` by `control/dkim/hashfunc`) or
    `ed25519-sha256` (RFC 8463; Ed25519 has no sha1 form, so hashfunc does not
    apply to it), t= the signing time, no x= and no l=.
    Message parsing, canonicalization, header selection, folding and the
    DKIM-Signature layout are dkimpy's own code (`dkim.DKIM`,
    `dkim.hash_headers`, `dkim.fold`); only the private-key operation is done
    with the `cryptography` package (OpenSSL) instead of dkimpy's pure-Python
    RSA, which costs ~15 ms per RSA-2048 signature against ~1 ms (see
    bench/RESULTS-dkim.md). The output is byte-identical to `dkim.sign`'s
    (tests/test_dkim_signing.py checks it), and dkimpy verifies it.
    A message dkimpy cannot parse is sent unsigned (logged), not deferred.

Signing holds the GIL (hashing, canonicalization in Python, the RSA
operation); `DkimSigner.sign_async` runs it on a small shared thread pool so
that one attempt's signing is not one long step of the worker's event loop:
the loop thread gets the GIL back at each switch interval and keeps serving
its other SMTP sessions.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import logging
import os
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

log = logging.getLogger("dkim")

MIN_RSA_BITS = 1024  # what dkimpy and the big receivers accept
HASHFUNC_FILE = "dkim/hashfunc"
HASHFUNCS = ("sha256", "sha1")
THREADS = 2  # the machine has 2 cores; signing holds the GIL, more threads buy nothing

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

_CANON = dkim.CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
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


# --------------------------------------------------------------------------- requests














# --------------------------------------------------------------------------- signing


class Signed(NamedTuple):
    """What `DkimSigner.sign` did: the message to send and the keys that signed it."""

    message: bytes
    keys: list[tuple[str, str]]  # (domain, selector) of each signature added, top first


def _header_domain(headers: list, name: bytes) -> str | None:
    """The domain of the first address in the first `name` header, lower-cased."""
    for field, value in headers:
        if field.lower() != name:
            continue
        text = _FOLD_RE.sub("", value.decode("utf-8", "replace"))
        for _, address in email.utils.getaddresses([text]):
            domain = address.rpartition("@")[2].strip().strip("[]").rstrip(".").lower()
            if "@" in address and domain:
                return domain
        return None
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

    def __init__(self, keys: DkimKeys, hashfunc: str = "sha256") -> None:
        if hashfunc not in HASHFUNCS:
            raise ValueError(f"hashfunc must be sha256 or sha1, not {hashfunc!r}")
        self.keys = keys
        self.hashfunc = hashfunc

    @classmethod
    def from_control(cls, control_dir: str | os.PathLike) -> DkimSigner:
        """Keys and hash function from control/; ControlError naming the bad file."""
        return cls(DkimKeys.from_control(control_dir), read_hashfunc(control_dir))

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
        """`message` (CRLF, not dot-stuffed) with a DKIM-Signature per chosen key prepended.

        `request` is the envelope's `dkim` value ("" = the default choice).
        Nothing to sign with, or a message that cannot be signed: the message
        unchanged and an empty key list.
        """
        if not self.keys:
            return Signed(message, [])
        try:
            parsed = dkim.DKIM(message)
            keys = self.choose(parsed.headers, request)
            if not keys:
                return Signed(message, [])
            parsed.should_sign = set(SIGNED_HEADERS)
            parsed.frozen_sign = set(OVERSIGNED_HEADERS)
            include = tuple(h.lower() for h in parsed.default_sign_headers())
            if b"from" not in include:
                log.warning("message has no From header: not DKIM-signed")
                return Signed(message, [])
            canon_headers = _CANON.canonicalize_headers(parsed.headers)
            canon_body = _CANON.canonicalize_body(parsed.body)
            body_hashes: dict[bytes, bytes] = {}
            now = str(int(time.time())).encode("ascii")
            signatures = []
            for key in keys:
                algorithm = key.signature_algorithm(self.hashfunc)
                hasher = dkim.HASH_ALGORITHMS[algorithm]
                digest_name = hasher().name
                if digest_name not in body_hashes:
                    body_hashes[digest_name] = base64.b64encode(hasher(canon_body).digest())
                signatures.append(
                    _signature(key, algorithm, hasher, include, canon_headers,
                               body_hashes[digest_name], now)
                )
        except (dkim.DKIMException, ValueError) as e:
            log.warning("message not DKIM-signed: %s", e)
            return Signed(message, [])
        return Signed(b"".join(signatures) + message, [(k.domain, k.selector) for k in keys])

    async def sign_async(self, message: bytes, request: str = "") -> Signed:
        """`sign` on the shared thread pool, off the event loop (at once when there are no keys)."""
        if not self.keys:
            return Signed(message, [])
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(_pool(), self.sign, message, request)


def _signature(key: DkimKey, algorithm: bytes, hasher: type, include: tuple[bytes, ...],
               canon_headers: list, body_hash: bytes, now: bytes) -> bytes:
    """One DKIM-Signature header line (CRLF-terminated), laid out exactly as dkimpy's sign()."""
    domain = key.domain.encode("ascii")
    fields = [
        (b"v", b"1"),
        (b"a", algorithm),
        (b"c", b"relaxed/relaxed"),
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
    value = dkim.RE_BTAG.sub(b"\\1", value)
    h = hasher()
    dkim.hash_headers(h, _CANON, canon_headers, include, (_SIG_NAME, b" " + value), dict(fields))
    fields[-1] = (b"b", base64.b64encode(key.sign_digest(h.digest(), algorithm)))
    value = dkim.fold(b"; ".join(b"=".join(f) for f in fields) + b"\r\n", namelen=len(_SIG_NAME))
    return _SIG_NAME + b": " + value
