"""SimpleMH at injection: Mail Class, X-GreenArrow-* headers, bounce address, tracking.

greenarrow.lib.injection.prepare() calls prepare() here when a Mail Class
applies (spec 7.2: X-GreenArrow-MailClass, else GREENARROW_MAILCLASS, else
`general { default_mail_class }`); raw injection never imports this module.
It resolves every header of seed 004 once per message, then returns a
Renderer that makes each recipient's copy: the tracking links, X-Mailer-Info,
List-Unsubscribe and the bounce address all name the recipient, so a
message to N recipients becomes N queue entries with N different bodies
(the MIME walk and link search are done once, not N times).

Precedence (docs/simplemh.md has the full table):
- ListID: X-GreenArrow-ListID, GREENARROW_LISTID, the class's listid.
- MtaID: X-Virtual-MTA (with process_x_virtual_mta_header), X-GreenArrow-MtaID,
  GREENARROW_MTAID (command line, or the SMTP service's smtp.tcp rule), the
  class's virtual_mta, none (the default VirtualMTA). header_pattern and
  delivery-time custom code are later stages, not injection.
- InstanceID: X-Job (with process_x_job_header), X-GreenArrow-InstanceID.
- SendID: built from Mail Class and InstanceID (mail_class.build_sendid);
  X-GreenArrow-SendID and GREENARROW_SENDID are for raw injection and are
  ignored here (they are still validated).
- Tracking, URL domain, bounce mailbox, FBL handling, List-Unsubscribe:
  the header, else the class. Tracker format: the header, else
  control/opt.simplemh.tracker_format. Metadata storage: the header, else
  control/opt.simplemh_stateless_event_handling, else general
  default_event_tracking_metadata_storage.

An invalid value is a permanent InjectionError naming the header (exit 100,
SMTP 554); the one header the seed says is ignored when wrong is
X-GreenArrow-URL-Domain without http:// or https://.

Body rewriting (greenarrow.pyx.simplemh does the byte work): the MIME tree
is walked on the bytes; each text/html and text/plain part that is not an
attachment (nor inside a message/*: forwarded mail is left alone) is decoded
from quoted-printable or base64, its links are found and replaced, and it
is encoded again: quoted-printable re-encodes only the physical lines that
hold a change, base64 the whole part (76-character lines), and a 7bit/8bit part whose rewritten lines would
pass 998 octets becomes quoted-printable (its Content-Transfer-Encoding
header says so). Everything else, boundaries and charsets included, is
copied byte for byte. Charsets that are not ASCII-compatible (UTF-16/32,
UTF-7, ISO-2022-*, HZ) are left alone.
"""

from __future__ import annotations

import binascii
import os

from greenarrow.lib import bounce_address, control, mail_class, secret_constants, tracking_url
from greenarrow.lib import message as msglib
from greenarrow.lib.injection import InjectionError
from greenarrow.pyx import simplemh as fast

# The headers of seed 004 as documented (for messages), by lower-cased name.
HEADERS = {
    name.lower().encode("ascii"): name
    for name in (
        "X-GreenArrow-MailClass", "X-GreenArrow-InstanceID", "X-GreenArrow-ListID",
        "X-GreenArrow-SendID", "X-GreenArrow-MtaID", "X-GreenArrow-BounceMailboxOverride",
        "X-GreenArrow-Obscured-Email", "X-GreenArrow-HandleBounceAndFbl",
        "X-GreenArrow-URL-Domain", "X-GreenArrow-Click-Tracking-Do",
        "X-GreenArrow-Click-Tracking-ID", "X-GreenArrow-List-Unsubscribe-HTTP-URL",
        "X-GreenArrow-List-Unsubscribe-HTTP-URL-Post",
        "X-GreenArrow-Disable-Auto-List-Unsubscribe-Header", "X-GreenArrow-Tracker-Format",
        "X-GreenArrow-EventTrackingMetadataStorage", "X-GreenArrow-SeedDo",
        "X-GreenArrow-SeedProgress", "X-GreenArrow-Pcompat-DKIM-Disable", "X-Job",
        "X-Virtual-MTA",
    )
}
_KEYS = {display: name for name, display in HEADERS.items()}
STORAGE_VALUES = ("system_default", "local", "stateless", "external")
UNSUBSCRIBE_TAG = b"##unsubscribetag##"
PIXEL = b'<img src="%s" width="1" height="1" border="0" alt="" />'
_PIXEL_OPEN, _PIXEL_CLOSE = PIXEL.split(b"%s")
MAX_LINE = 998
_FLAGS = {"yes": True, "1": True, "no": False, "0": False}
_SKIP_CHARSETS = (b"utf-16", b"utf-32", b"utf16", b"utf32", b"ucs-", b"ucs2", b"ucs4",
                  b"utf-7", b"utf7", b"iso-2022", b"iso2022", b"csiso2022", b"hz")
_IDENTITY = frozenset((b"", b"7bit", b"8bit", b"binary"))
_MAX_DEPTH = 30
_QP_HEADER = b"Content-Transfer-Encoding: quoted-printable\r\n"

# Slot kinds (greenarrow.pyx.simplemh.html_link_slots): "c" tracked click, "u"
# tracked unsubscribe link, "s" unsubscribe tag stripped (no URL domain), "p"
# open pixel, "d" a second <opentag/> removed.
_STRIP = "s"


def _bad(header: str, value: str, rule: str) -> InjectionError:
    return InjectionError(True, f"invalid {header} {value!r}: {rule}")


def _flag(value: str, header: str) -> bool:
    flag = _FLAGS.get(value.lower())
    if flag is None:
        raise _bad(header, value, "expected yes, no, 1 or 0")
    return flag


def _printable(value: str, low: str, limit: int) -> bool:
    """1 to `limit` characters from `low` (" " or "!") to "~"."""
    return (0 < len(value) <= limit and value.isascii() and value.isprintable()
            and (low == " " or " " not in value))


# --------------------------------------------------------------------------- settings per root


class RootSettings:
    """What SimpleMH reads from control/: secret constants, tracker format, stateless default."""

    __slots__ = ("constants", "tracker_format", "stateless")

    def __init__(self, constants: tuple[str, str], tracker_format: str, stateless: bool) -> None:
        self.constants = constants
        self.tracker_format = tracker_format
        self.stateless = stateless


_settings_memo: dict[str, tuple[list, RootSettings]] = {}
_settings_paths: dict[str, tuple[str, ...]] = {}
_SETTINGS_FILES = (secret_constants.FILE, "opt.simplemh.tracker_format",
                   "opt.simplemh_stateless_event_handling")


def root_settings(root: str) -> RootSettings:
    """The control settings of an install root, re-read when one of their files changes.

    A missing or bad file is a temporary InjectionError naming it: mail
    waits for the operator rather than going out untracked or unsigned.
    """
    paths = _settings_paths.get(root)
    if paths is None:
        paths = _settings_paths[root] = tuple(os.path.join(root, "control", n)
                                              for n in _SETTINGS_FILES)
    key = []
    for path in paths:
        try:
            st = os.stat(path)
            key.append((st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            key.append(None)
    memo = _settings_memo.get(root)
    if memo is not None and memo[0] == key:
        return memo[1]
    control_dir = os.path.join(root, "control")
    try:
        constants = secret_constants.read(control_dir)
        fmt = str(control.read(control_dir, "opt.simplemh.tracker_format")).lower()
        stateless = bool(control.read(control_dir, "opt.simplemh_stateless_event_handling"))
    except (secret_constants.SecretConstantsError, control.ControlError) as e:
        raise InjectionError(False, str(e)) from None
    if fmt not in tracking_url.FORMATS:
        raise InjectionError(False, f"{os.path.join(control_dir, 'opt.simplemh.tracker_format')}"
                                    f": bad value {fmt!r}: expected a, b or c")
    settings = RootSettings(constants, fmt, stateless)
    _settings_memo[root] = (key, settings)
    return settings


# --------------------------------------------------------------------------- the message's options


class Job:
    """Everything resolved for one message: identifiers and SimpleMH options."""

    __slots__ = ("mailclass", "listid", "sendid", "mtaid", "instanceid", "click_tracking_id",
                 "obscured", "bounce_mailbox", "handle_bounce", "track", "track_text",
                 "url_base", "tracker_format", "stateless", "list_unsubscribe", "lu_http_url",
                 "lu_post", "constants", "pcompat_dkim_disable", "seed_do", "seed_progress")

    def ids(self) -> dict[str, str]:
        """The envelope's identifier fields."""
        return {"sendid": self.sendid, "listid": self.listid, "mtaid": self.mtaid,
                "mailclass": self.mailclass, "instanceid": self.instanceid,
                "click_tracking_id": self.click_tracking_id}


def header_values(message: bytes, headers: list) -> dict[bytes, str]:
    """The values of the X-GreenArrow-*, X-Job and X-Virtual-MTA fields (the last of each wins).

    Empty values count as absent, as they do for raw injection.
    """
    values = {}
    for h in headers:
        name = h.name
        if name.startswith(b"x-greenarrow-") or name in (b"x-job", b"x-virtual-mta"):
            value = msglib.header_value(message, h)
            if value:
                values[name] = value
    return values


def resolve(values: dict[bytes, str], ids: dict[str, str], sources: dict[str, str],
            classes: mail_class.MailClasses, settings: RootSettings, now: float) -> Job:
    """Apply the Mail Class and the headers (see the module docstring for the precedence).

    `ids` and `sources` are injection.prepare's: the identifiers already
    validated from X-GreenArrow-* headers and GREENARROW_* variables, and
    where each came from.
    """
    name = ids.get("mailclass") or classes.default
    source = sources.get("mailclass", "general default_mail_class in greenarrow.conf")
    mc = classes.get(name)
    if mc is None:
        known = ", ".join(sorted(c.name for c in classes.classes.values()))
        raise InjectionError(True, f"unknown Mail Class {name!r} (from {source}); "
                                   f"greenarrow.conf defines: {known}")
    job = Job()
    job.mailclass = mc.name
    job.constants = settings.constants
    grouping = mc.statistic_report_grouping

    instance, inst_header = "", ""
    if classes.process_x_job_header and b"x-job" in values:
        instance, inst_header = values[b"x-job"], "X-Job"
    elif b"x-greenarrow-instanceid" in values:
        instance, inst_header = values[b"x-greenarrow-instanceid"], "X-GreenArrow-InstanceID"
    if instance:
        problem = mail_class.instanceid_problem(instance, grouping)
        if problem:
            raise _bad(inst_header, instance, problem)
    job.instanceid = instance
    job.listid = ids.get("listid") or mc.listid
    job.mtaid = ids.get("mtaid") or mc.virtual_mta
    job.sendid = mail_class.build_sendid(mc.name, instance, grouping, now)

    def get(header: str) -> str:
        return values.get(_KEYS[header], "")

    h = "X-GreenArrow-Click-Tracking-ID"
    job.click_tracking_id = get(h)
    if job.click_tracking_id and not _printable(job.click_tracking_id, " ", 300):
        raise _bad(h, job.click_tracking_id, "1 to 300 ASCII characters from 32 to 126")
    h = "X-GreenArrow-Obscured-Email"
    job.obscured = get(h)
    if job.obscured and not _printable(job.obscured, "!", 254):
        raise _bad(h, job.obscured, "1 to 254 printable ASCII characters without spaces")

    h = "X-GreenArrow-BounceMailboxOverride"
    job.bounce_mailbox = get(h)
    if job.bounce_mailbox:
        problem = bounce_address.mailbox_problem(job.bounce_mailbox)
        if problem:
            raise _bad(h, job.bounce_mailbox, f"a bounce mailbox {problem}")
    else:
        job.bounce_mailbox = mc.bounce_address
    h = "X-GreenArrow-HandleBounceAndFbl"
    job.handle_bounce = _flag(get(h), h) if get(h) else mc.handle_bounce_and_fbl

    h = "X-GreenArrow-Click-Tracking-Do"
    track_header = get(h)
    job.track = _flag(track_header, h) if track_header else mc.track_clicks_and_opens
    job.track_text = mc.track_text_links
    h = "X-GreenArrow-URL-Domain"
    url = get(h)
    job.url_base = mc.url_domain
    if url.lower().startswith(("http://", "https://")):
        base = mail_class.normalize_url_domain(url)
        if base is None:
            raise _bad(h, url, "expected http(s)://host[:port][/path]")
        job.url_base = base
    if job.track and not job.url_base:
        raise InjectionError(True, f"click and open tracking (X-GreenArrow-Click-Tracking-Do: "
                                   f"{track_header}) needs a URL domain: set "
                                   f"X-GreenArrow-URL-Domain or the class's url_domain")

    h = "X-GreenArrow-Tracker-Format"
    fmt = get(h).lower()
    if fmt and fmt not in tracking_url.FORMATS:
        raise _bad(h, get(h), "expected a, b or c")
    job.tracker_format = fmt or settings.tracker_format

    h = "X-GreenArrow-EventTrackingMetadataStorage"
    storage = get(h)
    if storage and storage not in STORAGE_VALUES:
        raise _bad(h, storage, f"expected one of {', '.join(STORAGE_VALUES)}")
    if not storage or storage == "system_default":
        storage = ("stateless" if settings.stateless
                   else classes.default_event_tracking_metadata_storage)
    job.stateless = storage == "stateless"

    h = "X-GreenArrow-Disable-Auto-List-Unsubscribe-Header"
    job.list_unsubscribe = not _flag(get(h), h) if get(h) else mc.list_unsubscribe
    h = "X-GreenArrow-List-Unsubscribe-HTTP-URL"
    job.lu_http_url = get(h)
    if job.lu_http_url and not (
        job.lu_http_url.lower().startswith(("http://", "https://"))
        and _printable(job.lu_http_url, "!", 900)
        and not any(c in job.lu_http_url for c in '<>",')
    ):
        raise _bad(h, job.lu_http_url, "expected an http(s) URL of printable ASCII, "
                                       "without spaces, quotes, <, > or commas")
    h = "X-GreenArrow-List-Unsubscribe-HTTP-URL-Post"
    job.lu_post = get(h) if job.lu_http_url else ""
    if job.lu_post and not _printable(job.lu_post, " ", 200):
        raise _bad(h, job.lu_post, "1 to 200 printable ASCII characters")

    # validated, with no effect in this engine yet (docs/simplemh.md)
    h = "X-GreenArrow-SeedDo"
    job.seed_do = _flag(get(h), h) if get(h) else None
    h = "X-GreenArrow-SeedProgress"
    progress = get(h)
    job.seed_progress = None
    if progress:
        digits = progress.replace(".", "", 1)
        if not digits.isdigit() or not digits.isascii() or not 0 <= float(progress) <= 100:
            raise _bad(h, progress, "a decimal number between 0 and 100")
        job.seed_progress = float(progress)
    h = "X-GreenArrow-Pcompat-DKIM-Disable"
    job.pcompat_dkim_disable = _flag(get(h), h) if get(h) else False
    return job


# --------------------------------------------------------------------------- the body plan


class _Part:
    """A text part to rewrite: its encoded body, decoded text and the slots in it."""

    __slots__ = ("hdr", "hdr_qp", "enc", "text", "raw", "decoded", "lines", "spans", "kinds",
                 "targets", "suffix")


def _first(msg: bytes, hdrs: list, name: bytes) -> bytes | None:
    for h in hdrs:
        if h[0] == name:
            return fast.header_value(msg, h[3], h[2])
    return None


def _with_qp_header(msg: bytes, start: int, hdrs: list, body_start: int) -> bytes:
    """The header region msg[start:body_start] saying Content-Transfer-Encoding: quoted-printable."""
    if not hdrs:
        sep = msg[start:body_start]
        return _QP_HEADER + (sep if sep else b"\r\n")
    out = []
    pos = start
    for h in hdrs:
        if h[0] == b"content-transfer-encoding":
            out.append(msg[pos:h[1]])
            pos = h[2]
    end = hdrs[-1][2]
    out.append(msg[pos:end])
    if not msg[end - 2:end] == b"\r\n":
        out.append(b"\r\n")
    out.append(_QP_HEADER)
    out.append(msg[end:body_start])
    return b"".join(out)


class _Planner:
    """Walks the MIME tree once and finds what each recipient's copy will rewrite."""

    def __init__(self, job: Job) -> None:
        self.job = job
        base = job.url_base.encode("ascii") if job.url_base else b""
        self.base = base
        self.own = (base + b"/click", base + b"/open", base + b"/unsub") if base else ()
        self.segments: list[bytes | _Part] = []
        self.top: _Part | None = None

    def walk(self, msg: bytes, hdrs: list, start: int, body_start: int, end: int,
             default_type: bytes, depth: int, top: bool) -> None:
        """Append the segments of the entity msg[start:end] (headers from `start`)."""
        value = _first(msg, hdrs, b"content-type")
        if value is None:
            mtype, params = default_type, {}
        else:
            mtype, params = fast.content_type(value)
            if mtype.count(b"/") != 1:
                mtype = b"text/plain"
        segs = self.segments
        if mtype.startswith(b"multipart/"):
            boundary = params.get(b"boundary")
            delims = (fast.find_delimiters(msg, body_start, end, boundary)
                      if boundary and depth < _MAX_DEPTH else [])
            if not delims:
                segs.append(msg[start:end])
                return
            sub_default = b"message/rfc822" if mtype == b"multipart/digest" else b"text/plain"
            segs.append(msg[start:delims[0][1]])
            for i, (_, after, closing) in enumerate(delims):
                if closing:
                    segs.append(msg[after:end])
                    return
                if i + 1 < len(delims):
                    nxt = delims[i + 1][0]
                    part_end = nxt - 2 if nxt - 2 >= after and msg[nxt - 2:nxt] == b"\r\n" else nxt
                    next_after = delims[i + 1][1]
                else:
                    part_end = nxt = next_after = end
                phdrs, pbody = fast.split_headers(msg, after, part_end)
                self.walk(msg, phdrs, after, min(pbody, part_end), part_end, sub_default,
                          depth + 1, False)
                segs.append(msg[part_end:next_after])
            return
        disposition = _first(msg, hdrs, b"content-disposition")
        attachment = disposition is not None and fast.content_type(disposition)[0] == b"attachment"
        part = None
        if mtype in (b"text/html", b"text/plain") and not attachment:
            cte = _first(msg, hdrs, b"content-transfer-encoding")
            part = self.plan(msg, hdrs, start, body_start, end, mtype == b"text/html",
                             (cte or b"").strip().lower(), params.get(b"charset", b"").lower(),
                             top)
        if part is None:
            segs.append(msg[start:end])
            return
        if top:
            self.top = part
        segs.append(part)

    def plan(self, msg: bytes, hdrs: list, start: int, body_start: int, end: int, html: bool,
             cte: bytes, charset: bytes, top: bool) -> _Part | None:
        if charset.startswith(_SKIP_CHARSETS):
            return None
        raw = msg[body_start:end]
        lines = None
        suffix = b""
        if cte in _IDENTITY:
            enc, decoded = "id", raw
        elif cte == b"quoted-printable":
            enc = "qp"
            decoded, lines = fast.qp_decode(raw)
        elif cte == b"base64":
            enc = "b64"
            stripped = raw.rstrip(b"\r\n \t")
            suffix = raw[len(stripped):]
            try:
                decoded = binascii.a2b_base64(stripped)
            except binascii.Error:
                return None
        else:
            return None
        job = self.job
        if not job.track and UNSUBSCRIBE_TAG not in decoded.lower():
            return None
        if html:
            spans, kinds, targets = fast.html_link_slots(decoded, job.track, bool(self.base),
                                                         self.own)
        else:
            spans, kinds, targets = fast.text_link_slots(decoded, job.track and job.track_text,
                                                         bool(self.base), self.own)
        if not spans:
            return None
        part = _Part()
        part.hdr = msg[start:body_start]
        part.hdr_qp = b""  # the top part's header is the message's: see prepare()
        if enc != "qp" and not top:  # may need to become quoted-printable
            part.hdr_qp = _with_qp_header(msg, start, hdrs, body_start)
        part.enc = enc
        part.text = not html
        part.raw = raw
        part.decoded = decoded
        part.lines = lines
        part.spans = spans
        part.kinds = kinds
        part.targets = targets
        part.suffix = suffix
        return part


def _b64_lines(data: bytes) -> bytes:
    encoded = binascii.b2a_base64(data, newline=False)
    return b"\r\n".join(encoded[i:i + 76] for i in range(0, len(encoded), 76))


def _render_part(part: _Part, encoder: tracking_url.Encoder | None) -> tuple[bytes, bool]:
    """(the part's header region and body for one recipient, whether it became QP)."""
    if encoder is None:  # only stripped ##unsubscribetag## prefixes
        reps = [t if k == _STRIP else b"" for k, t in zip(part.kinds, part.targets, strict=True)]
    else:
        reps = encoder.replacements(part.kinds, part.targets, part.text, _PIXEL_OPEN,
                                    _PIXEL_CLOSE)
    if part.enc == "qp":
        return part.hdr + fast.qp_render(part.raw, part.decoded, part.lines, part.spans, reps), False
    out = fast.splice(part.decoded, part.spans, reps)
    if part.enc == "b64":
        return part.hdr + _b64_lines(out) + part.suffix, False
    if fast.max_line_length(out) > MAX_LINE:
        return part.hdr_qp + fast.qp_encode(out), True
    return part.hdr + out, False


# --------------------------------------------------------------------------- the renderer


class Renderer:
    """Makes each recipient's copy of a SimpleMH message, and its envelope sender."""

    __slots__ = ("job", "head", "head_qp", "sep", "segments", "top", "add_mailer_info",
                 "add_list_unsubscribe")

    def ids(self) -> dict[str, str]:
        """The identifiers for the envelopes (injection.envelopes reads them)."""
        return self.job.ids()

    def sender(self, recipient: str, sender: str) -> str:
        """The envelope sender: the encoded bounce address when there is a bounce mailbox."""
        job = self.job
        if job.handle_bounce and job.bounce_mailbox:
            return bounce_address.encode(job.bounce_mailbox, job.listid, job.sendid,
                                         job.obscured or recipient, job.constants)
        return sender

    def encoder(self, recipient: str) -> tracking_url.Encoder | None:
        job = self.job
        if not job.url_base:
            return None
        return tracking_url.Encoder(job.constants, job.url_base, job.tracker_format,
                                    job.obscured or recipient, job.listid, job.sendid,
                                    job.mailclass, job.instanceid, job.click_tracking_id,
                                    job.stateless)

    def render(self, recipient: str) -> bytes:
        """The message as it goes to `recipient`."""
        job = self.job
        encoder = self.encoder(recipient)
        body = []
        switched = False
        for seg in self.segments:
            if type(seg) is bytes:
                body.append(seg)
            else:
                data, qp = _render_part(seg, encoder)
                switched = switched or (qp and seg is self.top)
                body.append(data)
        added = []
        who = job.obscured or recipient
        if self.add_mailer_info:
            info = self.data(tracking_url.MAILER_INFO, who, encoder)
            added.append(b"X-Mailer-Info: " + _fold(info) + b"\r\n")
        if self.add_list_unsubscribe:
            added.append(self.list_unsubscribe(who, encoder))
        head = self.head_qp if switched else self.head
        return b"".join((head, *added, self.sep, *body))

    def data(self, kind: str, who: str, encoder: tracking_url.Encoder | None) -> bytes:
        """DATA with no target URL (X-Mailer-Info, List-Unsubscribe) for one recipient."""
        if encoder is not None:
            return encoder.data(kind)
        job = self.job
        return tracking_url.encode(job.constants, kind, who, job.listid, job.sendid,
                                   job.mailclass, job.instanceid, job.click_tracking_id,
                                   stateless=job.stateless).encode("ascii")

    def list_unsubscribe(self, who: str, encoder: tracking_url.Encoder | None) -> bytes:
        """List-Unsubscribe (RFC 2369) and List-Unsubscribe-Post (RFC 8058) for one recipient.

        mailto: the unsubscribe form of the bounce address (short form, with
        the recipient's data in the subject, past 64 octets); https: the
        X-GreenArrow-List-Unsubscribe-HTTP-URL, else the tracker's one-click
        URL. One-Click is offered only for the tracker's URL, or when the
        -Post header asks for it. A URI that would make a line longer than
        998 octets is left out.
        """
        job = self.job
        uris = []
        if job.bounce_mailbox:
            address = bounce_address.encode(job.bounce_mailbox, job.listid, job.sendid, who,
                                            job.constants, unsubscribe=True)
            mailto = f"mailto:{address}"
            if not bounce_address.is_full(address):
                data = self.data(tracking_url.LIST_UNSUBSCRIBE, who, encoder).decode("ascii")
                mailto += f"?subject=unsubscribe-{data}"
            uris.append(mailto.encode("ascii"))
        post = b""
        if job.lu_http_url:
            uris.append(job.lu_http_url.encode("ascii"))
            post = job.lu_post.encode("ascii")
        elif encoder is not None:
            uris.append(encoder.url(tracking_url.LIST_UNSUBSCRIBE))
            post = b"List-Unsubscribe=One-Click"
        uris = [u for u in uris if len(u) + 3 <= MAX_LINE]
        if not uris:
            return b""
        out = b"List-Unsubscribe: " + b",\r\n ".join(b"<" + u + b">" for u in uris) + b"\r\n"
        if post and any(u.lower().startswith(b"https://") for u in uris[-1:]):
            out += b"List-Unsubscribe-Post: " + post + b"\r\n"
        return out


def _fold(value: bytes, width: int = 76) -> bytes:
    """A long token folded with CRLF SP (the decoders drop the whitespace)."""
    first = width - len("X-Mailer-Info: ")
    if len(value) <= first:
        return value
    parts = [value[:first]]
    parts.extend(value[i:i + width - 1] for i in range(first, len(value), width - 1))
    return b"\r\n ".join(parts)


def prepare(message: bytes, headers: list[msglib.Header], body_start: int, ids: dict[str, str],
            sources: dict[str, str], drop: set[int], added: list[bytes], trace: bytes,
            classes: mail_class.MailClasses, root: str, now: float) -> Renderer:
    """Resolve the message's SimpleMH options and plan its per-recipient copies.

    `drop` (the X-GreenArrow-* fields) and `added` (Message-ID, Date) come
    from injection.prepare, which calls this when a Mail Class applies.
    Raises InjectionError.
    """
    settings = root_settings(root)
    values = header_values(message, headers)
    job = resolve(values, ids, sources, classes, settings, now)
    renderer = Renderer()
    renderer.job = job
    names = {h.name for h in headers}
    renderer.add_mailer_info = job.handle_bounce
    renderer.add_list_unsubscribe = (job.list_unsubscribe and b"list-unsubscribe" not in names
                                     and bool(job.bounce_mailbox or job.url_base
                                              or job.lu_http_url))
    drop = set(drop)
    for i, h in enumerate(headers):
        if (h.name == b"x-mailer-info" and renderer.add_mailer_info) or (
                h.name == b"return-path" and job.handle_bounce and job.bounce_mailbox):
            drop.add(i)
        elif renderer.add_list_unsubscribe and h.name == b"list-unsubscribe-post":
            drop.add(i)  # it would not go with the List-Unsubscribe we add
    header_end = headers[-1].end if headers else 0
    common = b"".join(added)
    renderer.head = _kept(message, headers, drop, header_end, trace) + common
    renderer.sep = message[header_end:body_start]
    planner = _Planner(job)
    tuples = [(h.name, h.start, h.end, h.colon) for h in headers]
    planner.walk(message, tuples, body_start, body_start, len(message), b"text/plain", 0, True)
    renderer.segments = planner.segments
    renderer.top = planner.top
    renderer.head_qp = renderer.head
    if planner.top is not None and planner.top.enc != "qp":
        cte = {i for i, h in enumerate(headers) if h.name == b"content-transfer-encoding"}
        renderer.head_qp = (_kept(message, headers, drop | cte, header_end, trace) + common
                            + _QP_HEADER)
    return renderer


def _kept(message: bytes, headers: list[msglib.Header], drop: set[int], header_end: int,
          trace: bytes) -> bytes:
    parts = [trace]
    pos = 0
    for i in sorted(drop):
        h = headers[i]
        parts.append(message[pos:h.start])
        pos = h.end
    parts.append(message[pos:header_end])
    return b"".join(parts)
