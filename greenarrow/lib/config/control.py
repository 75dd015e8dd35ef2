"""Control files: one setting per file under `$HVMAIL_ROOT/control`.

This module is the one place that knows each file's type, its default and
whether running services re-read it (`reload`). A bad value is an error that
names the file and the value; a missing file means the default.

Command-line injection imports this module, so it imports nothing heavy.
"""

from __future__ import annotations

import os


class ControlError(Exception):
    """A control file holds a value of the wrong form."""


class ControlSpec:
    """What one control file holds."""

    __slots__ = ("name", "kind", "default", "reload", "doc")

    def __init__(self, name: str, kind: str, default: object, reload: bool, doc: str) -> None:
        self.name = name
        self.kind = kind  # text | int | float | size | bool | lines | listen | raw
        self.default = default
        self.reload = reload
        self.doc = doc


def _specs(*rows: tuple) -> dict[str, ControlSpec]:
    return {row[0]: ControlSpec(*row) for row in rows}


# name, kind, default, re-read while running, meaning.
# A default of None means "derived" (see `read`).
SPECS: dict[str, ControlSpec] = _specs(
    ("me", "text", None, False, "this server's name (default: the host name)"),
    ("defaulthost", "text", None, True,
     "command-line injection: host added to an address without one, as qmail-inject"
     " (default: me)"),
    ("defaultdomain", "text", None, True,
     "command-line injection: domain added to a host name without a dot (default: me)"),
    ("plusdomain", "text", None, True,
     "command-line injection: domain that replaces the + ending a host name (default: me)"),
    (
        "smtp.listen",
        "listen",
        [("127.0.0.1", 25)],
        False,
        "SMTP injection listeners, lines of ip:port",
    ),
    ("smtp.tcp", "raw", "", True, "relay allow-list in tcprules syntax"),
    ("smtp.tls.cert", "text", "", True,
     "PEM certificate (chain) offered by STARTTLS on SMTP injection, relative to control/"
     " (empty: no STARTTLS)"),
    ("smtp.tls.key", "text", "", True,
     "PEM private key of smtp.tls.cert, relative to control/ (empty: in the smtp.tls.cert file)"),
    ("databytes", "size", 10 * 1024 * 1024, True,
     "largest message accepted, in bytes (0: no limit; default 10 MB, as Postfix's"
     " message_size_limit)"),
    ("smtp.sessions.max", "int", 200, True,
     "most SMTP injection sessions at once; more are refused with 421 (0: no limit)"),
    ("smtp.sessions.per_ip", "int", 50, True,
     "most SMTP injection sessions at once from one client address; more get 421 (0: no limit)"),
    ("smtp.timeout", "float", 300.0, True,
     "seconds an SMTP injection client has for each command line, from the previous reply"
     " (a client that sends a byte now and then is cut all the same)"),
    ("smtp.data.minrate", "int", 1024, True,
     "bytes per second a DATA must average once smtp.timeout has passed; slower is cut"
     " (0: no floor)"),
    ("concurrencyremote", "int", 20, True, "most simultaneous remote attempts per queue"),
    (
        "queue.ram.concurrencyremote",
        "int",
        None,
        True,
        "remote attempts for the ram-queue (default: concurrencyremote)",
    ),
    (
        "queue.bounce.concurrencyremote",
        "int",
        None,
        True,
        "remote attempts for the bounce-queue (default: concurrencyremote)",
    ),
    (
        "queue.disk.concurrencyremote",
        "int",
        None,
        True,
        "remote attempts for the disk-queue (default: concurrencyremote)",
    ),
    ("queuelifetime", "int", 604800, True,
     "seconds a message may stay queued before a deferral becomes failure_toolong"),
    ("bouncemaxbytes", "size", 50000, True, "bytes of the original quoted in a bounce (0: all)"),
    ("doublebounceto", "text", "", True, "where the bounce of a bounce goes (empty: nowhere)"),
    ("queue.ram.limit.messages", "int", 0, True,
     "most entries in the ram-queue; beyond it injection is refused for now (0: no limit)"),
    ("queue.bounce.limit.messages", "int", 0, True,
     "most entries in the bounce-queue; beyond it bounces overflow to the disk-queue (0: no limit)"),
    ("queue.disk.limit.messages", "int", 0, True,
     "most entries in the disk-queue; beyond it deferred mail stays where it is (0: no limit)"),
    ("queue.ram.ramdisk.size", "int", 0, False,
     "size in MB of the ram-queue tmpfs, mounted by hvmail_init when run as root (0: a plain folder)"),
    ("queue.ram.ramdisk.inodes", "int", 0, False, "inodes of the ram-queue tmpfs (0: the kernel's default)"),
    ("queue.bounce.ramdisk.size", "int", 0, False,
     "size in MB of the bounce-queue tmpfs, mounted by hvmail_init when run as root (0: a plain folder)"),
    ("queue.bounce.ramdisk.inodes", "int", 0, False, "inodes of the bounce-queue tmpfs (0: the kernel's default)"),
    (
        "queue.rescan.seconds",
        "int",
        10,
        True,
        "how often queue-send rescans its queue for entries a lost trigger missed",
    ),
    ("remote.workers", "int", 2, False, "number of remote delivery worker processes"),
    ("remote.port", "int", 25, True, "port of the MX hosts (change only for tests)"),
    (
        "dns.servers",
        "lines",
        [],
        False,
        "DNS servers for MX lookups, lines of ip[:port] (default: /etc/resolv.conf)",
    ),
    ("timeoutconnect", "int", 60, True, "seconds to wait for an SMTP connection"),
    (
        "timeoutremote",
        "int",
        0,
        True,
        "cap in seconds on every SMTP phase (0: RFC 5321 per-phase timeouts)",
    ),
    (
        "queue.retry.scale",
        "float",
        1.0,
        True,
        "factor applied to the retry schedule (tests and drills only)",
    ),
    (
        "log.delivery.maxbytes",
        "size",
        16 * 1024 * 1024,
        False,
        "size at which a delivery log is rotated",
    ),
    ("log.delivery.keep", "int", 20, False, "rotated delivery logs kept"),
    ("log.service.maxbytes", "size", 1024 * 1024, False, "size at which a service log is rotated"),
    ("log.service.keep", "int", 5, False, "rotated service logs kept"),
    ("opt.simplemh.tracker_format", "text", "b", True,
     "SimpleMH tracking URL format: a (/click/DATA), b (/click?DATA) or c (/click?qs=DATA)"),
    ("opt.simplemh_stateless_event_handling", "bool", False, True,
     "SimpleMH: stateless event tracking metadata by default"),
    ("opt.simplemh_tracking_include_user_agent", "bool", False, True,
     "record the User-Agent of clicks and opens (engine_click, engine_open)"),
    ("tracker.listen", "listen", [], False,
     "HTTP listeners of the click/open/unsubscribe tracker, lines of ip:port (empty: none)"),
    ("tracker.tls.listen", "listen", [], False,
     "HTTPS listeners of the tracker, lines of ip:port; certificates in control/tracker.tls/"),
    ("tracker.processes", "int", 0, False,
     "tracker processes sharing its listeners, each with its own event spool (0: one per CPU)"),
    ("tracker.timeout", "int", 10, True,
     "seconds a tracker client has to send a whole request (and idle keep-alive limit)"),
    ("opt.treat_qsbf_bounces_as_local_server_names", "lines", [], True,
     "bounce processor on an event server: qmail-style bounces from these servers (the name"
     " after 'qmail-send program at') are synchronous bounces (greenarrow.lib.feedback)"),
    ("opt.treat_all_qsbf_bounces_as_local", "bool", False, True,
     "bounce processor: every qmail-style bounce from another server is a synchronous bounce"),
    ("dkim/hashfunc", "text", "sha256", True,
     "DKIM hash for RSA keys: sha256 or sha1 (checked by greenarrow.lib.dkim.signing)"),
    ("dkim/canonicalization", "text", "relaxed/relaxed", True,
     "DKIM canonicalization header/body: relaxed or simple each (checked by "
     "greenarrow.lib.dkim.signing)"),
)


def _first_line(text: str) -> str:
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            return line
    return ""


def _lines(text: str) -> list[str]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1024,
    "m": 1024**2,
    "mb": 1024**2,
    "g": 1024**3,
    "gb": 1024**3,
}


def parse_size(value: str) -> int:
    """`5120`, `200k`, `16m`, `1g` as bytes."""
    v = value.strip().lower()
    digits = v.rstrip("kmgb")
    unit = v[len(digits) :]
    if not digits.isdigit() or unit not in _SIZE_UNITS:
        raise ValueError(f"not a size: {value!r}")
    return int(digits) * _SIZE_UNITS[unit]


def parse_listen(value: str) -> tuple[str, int]:
    """`ip:port`, `[ipv6]:port` or `port` (all addresses) as (host, port)."""
    v = value.strip()
    if v.isdigit():
        host, port = "0.0.0.0", v
    elif v.startswith("["):
        host, sep, port = v[1:].partition("]:")
        if not sep:
            raise ValueError(f"not [ipv6]:port: {value!r}")
    else:
        host, sep, port = v.rpartition(":")
        if not sep or not host:
            raise ValueError(f"not ip:port: {value!r}")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad port in {value!r}")
    return host, int(port)


def _convert(spec: ControlSpec, text: str) -> object:
    if spec.kind == "raw":
        return text
    if spec.kind == "lines":
        return _lines(text)
    if spec.kind == "listen":
        return [parse_listen(line) for line in _lines(text)]
    value = _first_line(text)
    if spec.kind == "text":
        return value
    if value == "":
        return spec.default
    if spec.kind == "int":
        if not value.lstrip("-").isdigit():
            raise ValueError("expected a whole number")
        return int(value)
    if spec.kind == "size":
        return parse_size(value)
    if spec.kind == "float":
        number = float(value)
        if number != number or number in (float("inf"), float("-inf")):
            raise ValueError("expected a finite number")
        return number
    if spec.kind == "bool":
        if value.lower() in ("1", "true", "yes"):
            return True
        if value.lower() in ("0", "false", "no"):
            return False
        raise ValueError("expected 1 or 0")
    raise AssertionError(spec.kind)


def _derived_default(control_dir: str, name: str) -> object:
    if name == "me":
        return os.uname().nodename or "localhost"
    if name in ("defaulthost", "defaultdomain", "plusdomain"):
        return read(control_dir, "me")
    if name.startswith("queue.") and name.endswith(".concurrencyremote"):
        return read(control_dir, "concurrencyremote")
    raise AssertionError(name)


def read(control_dir: os.PathLike | str, name: str) -> object:
    """The value of control file `name`, converted to its type; the default if missing."""
    spec = SPECS.get(name)
    if spec is None:
        raise KeyError(f"unknown control file {name!r}")
    path = os.path.join(control_dir, name)
    try:
        with open(path, encoding="utf-8", errors="strict") as f:
            text = f.read()
    except FileNotFoundError:
        text = None
    except UnicodeDecodeError as e:
        raise ControlError(f"{path}: not UTF-8 text ({e.reason})") from None
    if text is not None:
        try:
            value = _convert(spec, text)
        except ValueError as e:
            if spec.kind == "listen":  # any line may be the bad one; the error quotes it
                raise ControlError(f"{path}: bad value: {e}") from None
            raise ControlError(f"{path}: bad value {_first_line(text)!r}: {e}") from None
        if value is not None and value != "":
            if spec.kind in ("int", "size", "float") and value < 0:
                raise ControlError(f"{path}: bad value {value!r}: must not be negative")
            return value
    if spec.default is None:
        return _derived_default(str(control_dir), name)
    return spec.default


def _typed(control_dir: os.PathLike | str, name: str, kinds: tuple[str, ...]) -> object:
    spec = SPECS.get(name)
    if spec is not None and spec.kind not in kinds:
        raise TypeError(f"control file {name!r} holds {spec.kind}, not {' or '.join(kinds)}")
    return read(control_dir, name)


def read_int(control_dir: os.PathLike | str, name: str) -> int:
    """The value of an `int` or `size` control file (see `read`)."""
    return int(_typed(control_dir, name, ("int", "size")))  # type: ignore[call-overload]


def read_float(control_dir: os.PathLike | str, name: str) -> float:
    """The value of a `float` (or `int`) control file (see `read`)."""
    return float(_typed(control_dir, name, ("float", "int")))  # type: ignore[arg-type]


def read_text(control_dir: os.PathLike | str, name: str) -> str:
    """The value of a `text` or `raw` control file (see `read`)."""
    return str(_typed(control_dir, name, ("text", "raw")))


def read_bool(control_dir: os.PathLike | str, name: str) -> bool:
    """The value of a `bool` control file (see `read`)."""
    return bool(_typed(control_dir, name, ("bool",)))


def _format_item(item: object) -> str:
    """One line of a list; a (host, port) pair as `read` returns it for a listen file."""
    if isinstance(item, tuple) and len(item) == 2:
        host, port = item
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return f"{item}"


def write(control_dir: os.PathLike | str, name: str, value: object) -> None:
    """Write a control file atomically (tmp + rename), as `hvmail_set` would."""
    if name not in SPECS:
        raise KeyError(f"unknown control file {name!r}")
    path = os.path.join(control_dir, name)
    if isinstance(value, (list, tuple)):
        text = "".join(f"{_format_item(v)}\n" for v in value)
    else:
        text = f"{value}\n"
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
