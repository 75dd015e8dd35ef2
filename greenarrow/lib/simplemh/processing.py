"""SimpleMH at injection: Mail Class, X-GreenArrow-* headers, bounce address, tracking.

greenarrow.lib.inject.accept.prepare() calls prepare() here when a Mail Class
applies (X-GreenArrow-MailClass, else GREENARROW_MAILCLASS, else
`general { default_mail_class }`); raw injection never imports this module.
It resolves every SimpleMH header (docs/simplemh.md) once per message, then returns a
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

An invalid value is a permanent SimpleMHError naming the header (injection
makes it an InjectionError: exit 100, SMTP 554); the one header GreenArrow
says is ignored when wrong is X-GreenArrow-URL-Domain without http:// or
https://.

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

import os

from greenarrow.lib.config import control, secret_constants
from greenarrow.lib.core import bad_addresses
from greenarrow.lib.core import message as msglib
from greenarrow.lib.simplemh import mail_class, tracking_url
from greenarrow.lib.simplemh import return_path as bounce_address
from greenarrow.pyx import simplemh as fast


class SimpleMHError(Exception):
    """The message cannot be accepted as SimpleMH mail; `permanent` says whether to try
    again. Injection turns it into its own InjectionError (this stage is below it)."""

    def __init__(self, permanent: bool, text: str) -> None:
        super().__init__(text)
        self.permanent = permanent
        self.text = text


# The SimpleMH headers as GreenArrow documents them (for messages), by lower-cased name.
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
STORAGE_VALUES = ("system_default", "local", "stateless", "external")
UNSUBSCRIBE_TAG = b"##unsubscribetag##"
PIXEL = b'<img src="%s" width="1" height="1" border="0" alt="" />'
_PIXEL_OPEN, _PIXEL_CLOSE = PIXEL.split(b"%s")
MAX_LINE = fast.MAX_LINE
_FLAGS = {"yes": True, "1": True, "no": False, "0": False}
_QP_HEADER = fast.QP_HEADER


def _bad(header: str, value: str, rule: str) -> SimpleMHError:
    return SimpleMHError(True, f"invalid {header} {value!r}: {rule}")


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


_settings_memo: dict[str, tuple[bytes, RootSettings]] = {}
_settings_paths: dict[str, tuple[bytes, ...]] = {}
_SETTINGS_FILES = (secret_constants.FILE, "opt.simplemh.tracker_format",
                   "opt.simplemh_stateless_event_handling")


def root_settings(root: str) -> RootSettings:
    """The control settings of an install root, re-read when one of their files changes.

    A missing or bad file is a temporary SimpleMHError naming it: mail
    waits for the operator rather than going out untracked or unsigned.
    """
    paths = _settings_paths.get(root)
    if paths is None:
        paths = _settings_paths[root] = tuple(os.fsencode(os.path.join(root, "control", n))
                                              for n in _SETTINGS_FILES)
    key = fast.files_key(paths)  # mtime, size and inode of each file, in one C call
    memo = _settings_memo.get(root)
    if memo is not None and memo[0] == key:
        return memo[1]
    control_dir = os.path.join(root, "control")
    try:
        constants = secret_constants.read(control_dir)
        fmt = control.read_text(control_dir, "opt.simplemh.tracker_format").lower()
        stateless = control.read_bool(control_dir, "opt.simplemh_stateless_event_handling")
    except (secret_constants.SecretConstantsError, control.ControlError) as e:
        raise SimpleMHError(False, str(e)) from None
    if fmt not in tracking_url.FORMATS:
        raise SimpleMHError(False, f"{os.path.join(control_dir, 'opt.simplemh.tracker_format')}"
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
                 "lu_post", "constants", "pcompat_dkim_disable", "seed_do", "seed_progress",
                 "links")

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


# Jobs resolved lately, for the classes and settings they were resolved with: the messages
# of a campaign carry the same X-GreenArrow-* headers, so a long-lived injector resolves
# them once. {(day, values, ids, sources): Job}
_jobs: tuple[object, object, dict[tuple, Job]] = (None, None, {})
_MAX_JOBS = 512


def resolve(values: dict[bytes, str], ids: dict[str, str], sources: dict[str, str],
            classes: mail_class.MailClasses, settings: RootSettings, now: float) -> Job:
    """Apply the Mail Class and the headers (see the module docstring for the precedence).

    `ids` and `sources` are injection.prepare's: the identifiers already
    validated from X-GreenArrow-* headers and GREENARROW_* variables, and
    where each came from. The result depends only on these, the classes,
    the settings and the UTC day of `now`, so it is remembered: the Job
    returned may be shared with other messages, and is not to be changed.
    """
    global _jobs
    memo = _jobs
    if memo[0] is not classes or memo[1] is not settings:  # greenarrow.conf or control/ changed
        memo = _jobs = (classes, settings, {})
    key = (now // 86400, tuple(values.items()), tuple(ids.items()), tuple(sources.items()))
    jobs = memo[2]
    job = jobs.get(key)
    if job is None:
        job = _resolve(values, ids, sources, classes, settings, now)
        if len(jobs) >= _MAX_JOBS:
            jobs.clear()
        jobs[key] = job
    return job


def _resolve(values: dict[bytes, str], ids: dict[str, str], sources: dict[str, str],
             classes: mail_class.MailClasses, settings: RootSettings, now: float) -> Job:
    name = ids.get("mailclass") or classes.default
    source = sources.get("mailclass", "general default_mail_class in greenarrow.conf")
    mc = classes.get(name)
    if mc is None:
        known = ", ".join(sorted(c.name for c in classes.classes.values()))
        raise SimpleMHError(True, f"unknown Mail Class {name!r} (from {source}); "
                                   f"greenarrow.conf defines: {known}")
    job = Job()
    job.links = None
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

    # most messages give few of these headers: one dict lookup each, then the checks
    get = values.get
    h = "X-GreenArrow-Click-Tracking-ID"
    job.click_tracking_id = get(b"x-greenarrow-click-tracking-id", "")
    if job.click_tracking_id and not _printable(job.click_tracking_id, " ", 300):
        raise _bad(h, job.click_tracking_id, "1 to 300 ASCII characters from 32 to 126")
    h = "X-GreenArrow-Obscured-Email"
    job.obscured = get(b"x-greenarrow-obscured-email", "")
    if job.obscured and not _printable(job.obscured, "!", 254):
        raise _bad(h, job.obscured, "1 to 254 printable ASCII characters without spaces")

    h = "X-GreenArrow-BounceMailboxOverride"
    job.bounce_mailbox = get(b"x-greenarrow-bouncemailboxoverride", "")
    if job.bounce_mailbox:
        problem = bounce_address.mailbox_problem(job.bounce_mailbox)
        if problem:
            raise _bad(h, job.bounce_mailbox, f"a bounce mailbox {problem}")
    else:
        job.bounce_mailbox = mc.bounce_address
    value = get(b"x-greenarrow-handlebounceandfbl")
    job.handle_bounce = (_flag(value, "X-GreenArrow-HandleBounceAndFbl") if value
                         else mc.handle_bounce_and_fbl)

    track_header = get(b"x-greenarrow-click-tracking-do", "")
    job.track = (_flag(track_header, "X-GreenArrow-Click-Tracking-Do") if track_header
                 else mc.track_clicks_and_opens)
    job.track_text = mc.track_text_links
    url = get(b"x-greenarrow-url-domain", "")
    job.url_base = mc.url_domain
    if url.lower().startswith(("http://", "https://")):
        base = mail_class.normalize_url_domain(url)
        if base is None:
            raise _bad("X-GreenArrow-URL-Domain", url, "expected http(s)://host[:port][/path]")
        job.url_base = base
    if job.track and not job.url_base:
        raise SimpleMHError(True, f"click and open tracking (X-GreenArrow-Click-Tracking-Do: "
                                   f"{track_header}) needs a URL domain: set "
                                   f"X-GreenArrow-URL-Domain or the class's url_domain")

    value = get(b"x-greenarrow-tracker-format", "")
    fmt = value.lower()
    if fmt and fmt not in tracking_url.FORMATS:
        raise _bad("X-GreenArrow-Tracker-Format", value, "expected a, b or c")
    job.tracker_format = fmt or settings.tracker_format

    storage = get(b"x-greenarrow-eventtrackingmetadatastorage", "")
    if storage and storage not in STORAGE_VALUES:
        raise _bad("X-GreenArrow-EventTrackingMetadataStorage", storage,
                   f"expected one of {', '.join(STORAGE_VALUES)}")
    if not storage or storage == "system_default":
        storage = ("stateless" if settings.stateless
                   else classes.default_event_tracking_metadata_storage)
    job.stateless = storage == "stateless"

    value = get(b"x-greenarrow-disable-auto-list-unsubscribe-header")
    job.list_unsubscribe = (not _flag(value, "X-GreenArrow-Disable-Auto-List-Unsubscribe-Header")
                            if value else mc.list_unsubscribe)
    h = "X-GreenArrow-List-Unsubscribe-HTTP-URL"
    job.lu_http_url = get(b"x-greenarrow-list-unsubscribe-http-url", "")
    if job.lu_http_url and not (
        job.lu_http_url.lower().startswith(("http://", "https://"))
        and _printable(job.lu_http_url, "!", 900)
        and not any(c in job.lu_http_url for c in '<>",')
    ):
        raise _bad(h, job.lu_http_url, "expected an http(s) URL of printable ASCII, "
                                       "without spaces, quotes, <, > or commas")
    job.lu_post = get(b"x-greenarrow-list-unsubscribe-http-url-post", "") if job.lu_http_url else ""
    if job.lu_post and not _printable(job.lu_post, " ", 200):
        raise _bad("X-GreenArrow-List-Unsubscribe-HTTP-URL-Post", job.lu_post,
                   "1 to 200 printable ASCII characters")

    # validated, with no effect in this engine yet (docs/simplemh.md)
    value = get(b"x-greenarrow-seeddo")
    job.seed_do = _flag(value, "X-GreenArrow-SeedDo") if value else None
    progress = get(b"x-greenarrow-seedprogress")
    job.seed_progress = None
    if progress:
        digits = progress.replace(".", "", 1)
        if not digits.isdigit() or not digits.isascii() or not 0 <= float(progress) <= 100:
            raise _bad("X-GreenArrow-SeedProgress", progress, "a decimal number between 0 and 100")
        job.seed_progress = float(progress)
    value = get(b"x-greenarrow-pcompat-dkim-disable")
    job.pcompat_dkim_disable = _flag(value, "X-GreenArrow-Pcompat-DKIM-Disable") if value else False
    return job


# --------------------------------------------------------------------------- the renderer


class _Links:
    """The tracking DATA and URLs of one recipient's copy: what tracking_url.Encoder makes,
    signed by a greenarrow.pyx.tracksign.Signer with the recipient's fields packed once."""

    __slots__ = ("signer", "fields", "flags", "bases")

    def data(self, kind: str, url: bytes = b"", text: bool = False) -> bytes:
        """DATA (base64url bytes) for one target."""
        return self.signer.link(b"", ord(kind), self.flags | (tracking_url.FLAG_TEXT if text else 0),
                                self.fields, url)

    def url(self, kind: str, url: bytes = b"", text: bool = False) -> bytes:
        """The tracking URL for `url` (empty for the open pixel and List-Unsubscribe)."""
        return self.signer.link(self.bases[kind], ord(kind),
                                self.flags | (tracking_url.FLAG_TEXT if text else 0),
                                self.fields, url)


def _link_setup(job: Job) -> tuple:
    """What the tracking data of every copy of the job's messages shares: (the signer, the
    fields after the recipient, the URL bases by kind, the bases for Signer.links)."""
    sep = tracking_url.SEPARATORS[job.tracker_format]
    bases = {kind: f"{job.url_base}/{path}{sep}".encode("ascii")
             for kind, path in tracking_url.PATHS.items()}
    job.links = (
        tracking_url.signer(job.constants),
        tracking_url.pack_fields(
            (job.listid, job.sendid, job.mailclass, job.instanceid, job.click_tracking_id),
            ("listid", "sendid", "mailclass", "instanceid", "click_tracking_id")),
        bases,
        (bases[tracking_url.CLICK], bases[tracking_url.UNSUBSCRIBE], bases[tracking_url.OPEN]),
    )
    return job.links


class Renderer:
    """Makes each recipient's copy of a SimpleMH message, and its envelope sender."""

    __slots__ = ("job", "head", "head_qp", "sep", "plan", "add_mailer_info",
                 "add_list_unsubscribe", "suppression", "dev_null_domain")

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

    def recipient(self, recipient: str) -> str:
        """The envelope recipient: a suppressed (address, ListID) goes to the dev-null domain.

        Only for a Mail Class with `bad_address_suppression yes`; the pairs are
        var/bad_addresses (greenarrow.lib.core.bad_addresses), kept by the
        bounce processor. The local part is kept so the log still says who.
        """
        if self.suppression is None or not self.suppression.contains(recipient, self.job.listid):
            return recipient
        return f"{recipient.rpartition('@')[0] or recipient}@{self.dev_null_domain}"

    def _links(self, who: str) -> _Links:
        """The tracking data maker for the copy that goes to `who` (the recipient or the
        X-GreenArrow-Obscured-Email value)."""
        links = _Links()
        links.signer, common, links.bases, _ = self.job.links or _link_setup(self.job)
        links.fields = tracking_url.pack_fields((who,), ("recipient",)) + common
        links.flags = tracking_url.FLAG_STATELESS if self.job.stateless else 0
        return links

    def render(self, recipient: str) -> bytes:
        """The message as it goes to `recipient`."""
        job = self.job
        who = job.obscured or recipient
        links = self._links(who)
        added = b""
        if self.add_mailer_info:
            added = (b"X-Mailer-Info: " + _fold(links.data(tracking_url.MAILER_INFO))
                     + b"\r\n")
        if self.add_list_unsubscribe:
            added += self.list_unsubscribe(who, links if job.url_base else None)
        return self.plan.render(links.signer if job.url_base else None, links.fields,
                                links.flags, job.links[3], self.head, self.head_qp, added,
                                self.sep)

    def data(self, kind: str, who: str, encoder: _Links | tracking_url.Encoder | None) -> bytes:
        """DATA with no target URL (X-Mailer-Info, List-Unsubscribe) for one recipient."""
        return (encoder or self._links(who)).data(kind)

    def list_unsubscribe(self, who: str,
                         encoder: _Links | tracking_url.Encoder | None) -> bytes:
        """List-Unsubscribe (RFC 2369) and List-Unsubscribe-Post (RFC 8058) for one recipient.

        mailto: the unsubscribe form of the bounce address (short form past 64
        octets), with the recipient's data (the one-click URL's DATA) in the
        subject, which the short form needs and which gives the unsubscribe
        processor (tracker.unsubscribe_mailbox) every field of the event; https: the
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
            mailto = (b"mailto:" + address.encode("ascii") + b"?subject=unsubscribe-"
                      + self.data(tracking_url.LIST_UNSUBSCRIBE, who, encoder))
            if len(mailto) + 3 <= MAX_LINE:
                uris.append(mailto)
        post = b""
        if job.lu_http_url:
            uri = job.lu_http_url.encode("ascii")
            post = job.lu_post.encode("ascii")
        elif encoder is not None:
            uri = encoder.url(tracking_url.LIST_UNSUBSCRIBE)
            post = b"List-Unsubscribe=One-Click"
        else:
            uri = b""
        if uri and len(uri) + 3 <= MAX_LINE:
            uris.append(uri)
        if not uris:
            return b""
        out = b"List-Unsubscribe: <" + b">,\r\n <".join(uris) + b">\r\n"
        if post and uris[-1][:8].lower() == b"https://":
            out += b"List-Unsubscribe-Post: " + post + b"\r\n"
        return out


def _fold(value: bytes, width: int = 76) -> bytes:
    """A long token folded with CRLF SP (the decoders drop the whitespace)."""
    first = width - len("X-Mailer-Info: ")
    if len(value) <= first:
        return value
    return b"\r\n ".join([value[:first]] + [value[i:i + width - 1]
                                              for i in range(first, len(value), width - 1)])


def prepare(message: bytes, headers: list[msglib.Header], body_start: int, ids: dict[str, str],
            sources: dict[str, str], drop: set[int], added: list[bytes], trace: bytes,
            classes: mail_class.MailClasses, root: str, now: float) -> Renderer:
    """Resolve the message's SimpleMH options and plan its per-recipient copies.

    `drop` (the X-GreenArrow-* fields) and `added` (Message-ID, Date) come
    from injection.prepare, which calls this when a Mail Class applies.
    Raises SimpleMHError.
    """
    settings = root_settings(root)
    values = header_values(message, headers)
    job = resolve(values, ids, sources, classes, settings, now)
    renderer = Renderer()
    renderer.job = job
    fields = [(h.name, h.start, h.end, h.colon) for h in headers]
    names = {f[0] for f in fields}
    renderer.add_mailer_info = job.handle_bounce
    mc = classes.get(job.mailclass)
    renderer.suppression = (bad_addresses.for_root(root)
                            if mc is not None and mc.bad_address_suppression else None)
    renderer.dev_null_domain = classes.bad_address_dev_null_domain
    renderer.add_list_unsubscribe = (job.list_unsubscribe and b"list-unsubscribe" not in names
                                     and bool(job.bounce_mailbox or job.url_base
                                              or job.lu_http_url))
    if (b"x-mailer-info" in names or b"return-path" in names
            or b"list-unsubscribe-post" in names):  # headers SimpleMH may own
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
    renderer.plan = plan = fast.plan_body(
        message, fields, body_start, job.track, job.track_text, job.url_base.encode("ascii"),
        _PIXEL_OPEN, _PIXEL_CLOSE)
    renderer.head_qp = renderer.head
    if plan.top is not None and plan.top.enc != fast.ENC_QP:
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
