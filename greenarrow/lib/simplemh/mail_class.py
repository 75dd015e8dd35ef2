"""Mail Classes: the `mail_class NAME { ... }` blocks of greenarrow.conf, compiled and cached.

A Mail Class turns SimpleMH on for a message and says how to treat it
(spec section 7.2; docs/simplemh.md "Mail Classes"):

    general {
        default_mail_class newsletter       # the class of mail that names none
        process_x_job_header yes            # X-Job counts as X-GreenArrow-InstanceID
        process_x_virtual_mta_header yes    # X-Virtual-MTA counts as X-GreenArrow-MtaID
        default_event_tracking_metadata_storage local   # local | stateless | external
    }
    mail_class newsletter {
        listid news                         # default ListID
        virtual_mta pool1                   # default MtaID
        track_clicks_and_opens yes          # needs url_domain
        track_text_links yes                # links of text/plain parts too (default yes)
        url_domain https://links.example.com
        bounce_address bounce@bounces.example.com
        list_unsubscribe yes                # add List-Unsubscribe (default yes)
        handle_bounce_and_fbl yes           # encoded Return-Path, X-Mailer-Info (default yes)
        bad_address_suppression yes         # suppress var/bad_addresses pairs (default no)
        statistic_report_grouping per_mailclass_and_instanceid
    }

Command-line injection checks on every message whether a class applies,
and most messages are raw injections on servers that define no class at
all; parsing greenarrow.conf (and importing its parser, `re`, `json`,
`pathlib`, ...) would cost more than the rest of the injection. So the
classes are compiled once into `$HVMAIL_ROOT/var/simplemh.cache`, keyed by
greenarrow.conf's mtime, size and inode; an injection stats the file and
reads the small cache. When greenarrow.conf has an error, the last good
cache stays in use (as a failed `greenarrow_config reload` leaves running
services on their old configuration); with no cache to fall back on, the
mail_class blocks are compiled on their own, so a mistake elsewhere in the
file does not stop injection, and only a mistake in them is an error (a
temporary failure: mail waits for the fix).

This module imports nothing heavy: the parser is imported only to compile.
"""

from __future__ import annotations

import os

from greenarrow.lib.core.paths import SIMPLEMH_CACHE, var_path

TYPE_CHECKING = False  # typing itself costs command-line injection milliseconds
if TYPE_CHECKING:
    from collections.abc import Callable

GROUPINGS = (
    "per_instanceid_legacy",
    "per_mailclass_and_instanceid",
    "per_mailclass_per_day",
    "per_mailclass_per_month",
)
DEFAULT_GROUPING = "per_mailclass_and_instanceid"
STORAGES = ("local", "stateless", "external")
CACHE_NAME = SIMPLEMH_CACHE
_MAGIC = b"greenarrow-simplemh-cache 1"

_ALNUM = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_DIGITS = frozenset("0123456789")
_URL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                       "-._~/:%[]@!$'()*+,;=")


class MailClassConfigError(Exception):
    """greenarrow.conf cannot be compiled into mail classes (str: file:line: what)."""


class MailClass:
    """One compiled `mail_class` block."""

    __slots__ = ("name", "listid", "virtual_mta", "track_clicks_and_opens", "track_text_links",
                 "url_domain", "bounce_address", "list_unsubscribe", "handle_bounce_and_fbl",
                 "statistic_report_grouping", "bad_address_suppression")

    def __init__(self, name: str) -> None:
        self.name = name
        self.listid = ""
        self.virtual_mta = ""
        self.track_clicks_and_opens = False
        self.track_text_links = True
        self.url_domain = ""
        self.bounce_address = ""
        self.list_unsubscribe = True
        self.handle_bounce_and_fbl = True
        self.statistic_report_grouping = DEFAULT_GROUPING
        self.bad_address_suppression = False

    def __repr__(self) -> str:
        return f"MailClass({self.name!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MailClass) and all(
            getattr(self, k) == getattr(other, k) for k in self.__slots__)


_BOOL_FIELDS = frozenset(("track_clicks_and_opens", "track_text_links", "list_unsubscribe",
                          "handle_bounce_and_fbl", "bad_address_suppression"))
# where suppressed recipients go (simplemh_bad_address_dev_null_domain): GreenArrow's default
DEFAULT_DEV_NULL_DOMAIN = "badaddress.discardallmail.drh.net"


class MailClasses:
    """Every class of greenarrow.conf and the `general` settings SimpleMH reads."""

    __slots__ = ("classes", "default", "process_x_job_header", "process_x_virtual_mta_header",
                 "default_event_tracking_metadata_storage", "bad_address_dev_null_domain")

    def __init__(self) -> None:
        self.classes: dict[str, MailClass] = {}  # by lower-cased name
        self.default = ""
        self.process_x_job_header = False
        self.process_x_virtual_mta_header = False
        self.default_event_tracking_metadata_storage = "local"
        self.bad_address_dev_null_domain = DEFAULT_DEV_NULL_DOMAIN

    def get(self, name: str) -> MailClass | None:
        """The class called `name`, compared case-insensitively."""
        return self.classes.get(name.lower())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MailClasses) and all(
            getattr(self, k) == getattr(other, k) for k in self.__slots__)


EMPTY = MailClasses()


# --------------------------------------------------------------------------- value rules


def normalize_url_domain(text: str) -> str | None:
    """A URL domain as a base URL (`https://host[:port][/path]`, no trailing /), or None.

    `http://` and `https://` are kept; a bare host name means https. No
    query, fragment, spaces or quotes (the base goes into HTML attributes).
    """
    low = text.lower()
    if low.startswith("https://"):
        scheme, rest = "https://", text[8:]
    elif low.startswith("http://"):
        scheme, rest = "http://", text[7:]
    elif "://" in text:
        return None
    else:
        scheme, rest = "https://", text
    rest = rest.rstrip("/")
    host = rest.split("/", 1)[0]
    if (not host or not _URL_CHARS.issuperset(rest) or "?" in rest or "#" in rest
            or host.startswith(".") or "@" in host):
        return None
    return scheme + rest


def instanceid_problem(value: str, grouping: str) -> str | None:
    """Why `value` is not a valid InstanceID under `grouping` (docs/simplemh.md), or None."""
    if grouping == "per_instanceid_legacy":
        if not (0 < len(value) <= 27 and value[0] in _DIGITS and _ALNUM.issuperset(value)):
            return ("must start with a digit and be at most 27 letters and digits "
                    "(statistic_report_grouping per_instanceid_legacy)")
        return None
    if not (0 < len(value) <= 300 and value.isascii() and value.isprintable()):
        return "must be 1 to 300 printable ASCII characters (0x20-0x7E)"
    return None


_day_memo: tuple[float, str] = (float("nan"), "")  # the last day: (now // 86400, "YYYYMMDD")


def _utc_day(now: float) -> str:
    """time.strftime("%Y%m%d", time.gmtime(now)), remembered for the day."""
    global _day_memo
    days = now // 86400
    memo = _day_memo
    if memo[0] != days:
        import time

        memo = _day_memo = (days, time.strftime("%Y%m%d", time.gmtime(now)))
    return memo[1]


def build_sendid(mailclass: str, instanceid: str, grouping: str, now: float) -> str:
    """The SendID of a SimpleMH message (docs/simplemh.md, "Statistic Report Grouping").

    Lower-cased, because SendIDs are used case-insensitively: InstanceIDs
    that differ only by case make one send.

    - per_instanceid_legacy: mail class + InstanceID (`newsletter0901220005`);
      the InstanceID starts with a digit, so the two stay apart. Without an
      InstanceID, the UTC date YYYYMMDD stands in for it.
    - per_mailclass_and_instanceid: `mailclass-instanceid`; without an
      InstanceID, `mailclass-YYYYMMDD` (one send per class per day).
    - per_mailclass_per_day: `mailclass-YYYYMMDD`, whatever the InstanceID.
    - per_mailclass_per_month: `mailclass-YYYYMM`.

    A SendID is at most 100 printable characters without spaces; when an
    InstanceID would break that, it is replaced by `h` and 16 hex digits of
    its (lower-cased) SHA-256.
    """
    day = _utc_day(now)
    mc = mailclass.lower()
    inst = instanceid.lower()
    if grouping == "per_instanceid_legacy":
        sendid = mc + (inst or day)
    elif grouping == "per_mailclass_and_instanceid":
        sendid = f"{mc}-{inst or day}"
    elif grouping == "per_mailclass_per_day":
        sendid = f"{mc}-{day}"
    elif grouping == "per_mailclass_per_month":
        sendid = f"{mc}-{day[:6]}"
    else:
        raise ValueError(f"unknown statistic_report_grouping {grouping!r}")
    if len(sendid) > 100 or not (sendid.isascii() and sendid.isprintable()) or " " in sendid:
        import hashlib

        digest = hashlib.sha256(inst.encode("utf-8")).hexdigest()[:16]
        sendid = f"{mc}-h{digest}"
    return sendid


# --------------------------------------------------------------------------- compiling


def compile_conf(root_block: object) -> MailClasses:
    """Mail classes from a parsed greenarrow.conf (greenarrow.lib.config.conf.Block).

    Every value is checked here, so a mistake is reported as
    `greenarrow.conf:LINE: ...` by `greenarrow_config check` users too.
    """
    from greenarrow.lib.config import conf
    from greenarrow.lib.core.identifiers import identifier_problem
    from greenarrow.lib.simplemh.return_path import mailbox_problem

    assert isinstance(root_block, conf.Block)
    out = MailClasses()
    general = root_block.block("general")
    for block in root_block.blocks_named("mail_class"):
        name = block.args[0]
        problem = identifier_problem("mailclass", name)
        if problem:
            raise block.error(f"mail_class: {problem}")
        key = name.lower()
        mc = out.classes.get(key)
        if mc is None:
            mc = out.classes[key] = MailClass(name)
        for d in block.directives:
            if d.name in _BOOL_FIELDS:
                setattr(mc, d.name, d.as_bool())
                continue
            value = d.as_str()
            if d.name == "listid":
                problem = identifier_problem("listid", value)
            elif d.name == "virtual_mta":
                problem = identifier_problem("mtaid", value)
            elif d.name == "url_domain":
                normal = normalize_url_domain(value)
                problem = None if normal else (
                    f"invalid url_domain {value!r}: expected https://host[/path] or a host name")
                value = normal or value
            elif d.name == "bounce_address":
                problem = mailbox_problem(value)
                problem = problem and f"bounce_address {value!r} {problem}"
            elif d.name == "statistic_report_grouping":
                problem = None if value in GROUPINGS else (
                    f"statistic_report_grouping: expected one of {', '.join(GROUPINGS)}, "
                    f"got {value!r}")
            if problem:
                raise d.error(problem)
            setattr(mc, d.name, value)
        if mc.track_clicks_and_opens and not mc.url_domain:
            raise block.error(f"mail_class {name}: track_clicks_and_opens yes needs a url_domain")
    if general is not None:
        d = general.directive("default_mail_class")
        if d is not None:
            name = d.as_str()
            if name.lower() not in out.classes:
                raise d.error(f"default_mail_class {name!r}: no mail_class of that name")
            out.default = out.classes[name.lower()].name
        out.process_x_job_header = bool(general.get_bool("process_x_job_header", False))
        out.process_x_virtual_mta_header = bool(
            general.get_bool("process_x_virtual_mta_header", False))
        d = general.directive("default_event_tracking_metadata_storage")
        if d is not None:
            out.default_event_tracking_metadata_storage = d.as_choice(*STORAGES)
        domain = general.get_str("simplemh_bad_address_dev_null_domain")
        if domain:
            out.bad_address_dev_null_domain = domain.lower().rstrip(".")
    return out


_GENERAL = ("default_mail_class", "process_x_job_header", "process_x_virtual_mta_header",
            "default_event_tracking_metadata_storage", "simplemh_bad_address_dev_null_domain")


def _compile_leniently(conf_path: str, error: Exception) -> MailClasses:
    """Mail classes from a greenarrow.conf that has an error, when none were cached before.

    A mistake elsewhere in the file (a bad smtp_route, say) must not stop
    injection: the mail_class blocks and the general directives SimpleMH
    reads are checked and compiled on their own. When the mistake is in
    them, or the file does not parse at all, MailClassConfigError.
    """
    from greenarrow.lib.config import conf

    try:
        root = conf.load(conf_path, check=False)
        general = [conf.Block("general", [], [d for d in b.directives if d.name in _GENERAL], [],
                              b.line, b.filename) for b in root.blocks_named("general")]
        ours = conf.Block(conf.ROOT, [], [], general + root.blocks_named("mail_class"), 0,
                          root.filename)
        conf.validate(ours)
        return compile_conf(ours)
    except conf.ConfError as e:
        raise MailClassConfigError(str(e)) from None
    except Exception:
        raise MailClassConfigError(str(error)) from None


# --------------------------------------------------------------------------- the cache


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")


def _unesc(value: str) -> str:
    if "\\" not in value:
        return value
    out = []
    i = 0
    while i < len(value):
        c = value[i]
        if c == "\\" and i + 1 < len(value):
            out.append({"t": "\t", "n": "\n"}.get(value[i + 1], value[i + 1]))
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def dumps_cache(classes: MailClasses) -> str:
    """The cache body: one TAB-separated setting per line (no json: see the module docstring)."""
    lines = [
        f"general\tdefault\t{_esc(classes.default)}",
        f"general\tprocess_x_job_header\t{int(classes.process_x_job_header)}",
        f"general\tprocess_x_virtual_mta_header\t{int(classes.process_x_virtual_mta_header)}",
        "general\tdefault_event_tracking_metadata_storage\t"
        f"{classes.default_event_tracking_metadata_storage}",
        f"general\tbad_address_dev_null_domain\t{_esc(classes.bad_address_dev_null_domain)}",
    ]
    for mc in classes.classes.values():
        for field in MailClass.__slots__:
            value = getattr(mc, field)
            if isinstance(value, bool):
                value = int(value)
            lines.append(f"class\t{_esc(mc.name)}\t{field}\t{_esc(str(value))}")
    return "".join(line + "\n" for line in lines)


def loads_cache(text: str) -> MailClasses:
    out = MailClasses()
    for line in text.splitlines():
        parts = line.split("\t")
        if parts[0] == "general" and len(parts) == 3:
            name, value = parts[1], _unesc(parts[2])
            if name == "default":
                out.default = value
            elif name == "default_event_tracking_metadata_storage":
                out.default_event_tracking_metadata_storage = value
            elif name == "bad_address_dev_null_domain":
                out.bad_address_dev_null_domain = value
            else:
                setattr(out, name, value == "1")
        elif parts[0] == "class" and len(parts) == 4:
            name = _unesc(parts[1])
            mc = out.classes.get(name.lower())
            if mc is None:
                mc = out.classes[name.lower()] = MailClass(name)
            field, value = parts[2], _unesc(parts[3])
            setattr(mc, field, value == "1" if field in _BOOL_FIELDS else value)
    return out


# In-process memo for long-lived injectors (smtpd): (root, stat key) -> classes.
_memo: dict[str, tuple[bytes, MailClasses]] = {}
_paths: dict[str, tuple[str, str, bytes]] = {}


def _stat_key(st: os.stat_result) -> bytes:
    return f"{st.st_mtime_ns} {st.st_size} {st.st_ino}".encode("ascii")


def load(root: str, file_key: Callable[[bytes], bytes] | None = None) -> MailClasses:
    """The mail classes of install root `root`, through the cache (see the module docstring).

    `file_key` is the compiled stat (greenarrow.pyx.simplemh.file_key) when the
    caller has it loaded; without it, os.stat gives the same key. Raises
    MailClassConfigError when greenarrow.conf is wrong and no earlier
    compilation is cached.
    """
    paths = _paths.get(root)
    if paths is None:
        conf = os.path.join(root, "control", "greenarrow.conf")
        paths = _paths[root] = (conf, var_path(root, CACHE_NAME), os.fsencode(conf))
    conf_path, cache_path, conf_bytes = paths
    try:
        key = file_key(conf_bytes) if file_key is not None else _stat_key(os.stat(conf_path))
    except FileNotFoundError:
        return EMPTY
    except OSError as e:
        raise MailClassConfigError(f"{conf_path}: cannot read: {e.strerror}") from None
    memo = _memo.get(root)
    if memo is not None and memo[0] == key:
        return memo[1]
    cached = None
    try:
        with open(cache_path, "rb") as f:
            data = f.read()
        first, _, body = data.partition(b"\n")
        magic, _, cached_key = first.rpartition(b" key=")
        if magic == _MAGIC:
            cached = (cached_key, body)
    except OSError:
        pass
    if cached is not None and cached[0] == key:
        classes = loads_cache(cached[1].decode("utf-8"))
        _memo[root] = (key, classes)
        return classes
    # stale or missing: compile (the expensive path, once per change of the file)
    from greenarrow.lib.config import conf

    try:
        classes = compile_conf(conf.load(conf_path))
    except conf.ConfError as e:
        if cached is not None:  # keep the last good configuration
            return loads_cache(cached[1].decode("utf-8"))
        classes = _compile_leniently(conf_path, e)
    tmp = f"{cache_path}.{os.getpid()}.tmp"
    try:
        if _stat_key(os.stat(conf_path)) == key:  # not changed while we read it
            with open(tmp, "wb") as f:
                f.write(_MAGIC + b" key=" + key + b"\n" + dumps_cache(classes).encode("utf-8"))
            os.replace(tmp, cache_path)
    except OSError:  # an unwritable var/: correct, just slower
        try:
            os.unlink(tmp)
        except OSError:
            pass
    _memo[root] = (key, classes)
    return classes
