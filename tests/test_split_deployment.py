"""The split deployment of seeds 000/001: two sending servers, one event server.

Each server is a host of its own: a Linux network namespace with its own
address on a private bridge (tests/netns.py), each engine listening on the
real ports 25 and 80. The hub of the bridge holds the rest of the world: a
DNS server (tests/dns_server.py) with the MX and A records of the bounce
domain, the URL domain and the recipient domains; two receiving hosts on
port 25 (one accepts, one rejects with 550); the HTTP event destination of
the event server's Event Notification System; and the "subscriber", who
loads images, clicks links and mails complaints and late bounces.

The servers are configured with the commands and files of the operations
guide (docs/operations.md, "Split deployment"), in the seeds' order, then
the seeds' test sequence runs once from each sending server, every step
checked at the event destination with the fields of seed 003:
(1) an HTML message with click tracking and an unsubscribe link; (2) its
images loaded -> engine_open; (3) a link clicked -> redirect and
engine_click; (4) the unsubscribe link -> redirect and engine_unsub; (5) its
raw headers mailed to the spam-complaint mailbox (pasted into the text
from one sender, attached from the other) -> scomp; (6) a message
to an address that bounces -> bounce_all and bounce_bad_address (a hard,
synchronous bounce mailed back as a qmail-style bounce), and a message
accepted and bounced later (a soft DSN) -> bounce_all only.

Two layouts run the same steps. `netns` (root only; CI runs as root): the
namespaces above, ports 25 and 80. `loopback` (any user): every host an
address of its own on 127.231.0.0/24 (Linux routes all of 127/8 to the
loopback), the engines on one free port for SMTP (`remote.port` set to it,
so MX hosts are reached there) and one for the tracker, no ramdisk unless
root; what it cannot show is separate network stacks.
"""

from __future__ import annotations

import http.client
import os
import re
import smtplib
import subprocess
import urllib.parse
from contextlib import AbstractContextManager, nullcontext
from email import message_from_bytes, policy
from pathlib import Path

import dns.resolver
import pytest
from dns_server import DnsServer
from engine import Engine, free_port, wait_until
from event_receiver import Receiver as EventDestination
from netns import TestNetwork, available, inside
from smtp_receivers import Receiver

from greenarrow.lib.events import postgres, types
from greenarrow.lib.simplemh import return_path, tracking_url

pytestmark = pytest.mark.skipif(
    not postgres.candidate_dirs(),
    reason="needs PostgreSQL server binaries for the event server (apt-get install postgresql)")

# Last octets: the hub (DNS, event destination, the subscriber), the receiving hosts, servers.
HUB, RX_ACCEPT, RX_REJECT = 1, 30, 31
ADDRESSES = {"send1": 11, "send2": 12, "event": 20}
NAMES = {"send1": "send1.split.test", "send2": "send2.split.test", "event": "event.split.test"}
SENDERS = ("send1", "send2")
BOUNCE_DOMAIN = "bounce.split.test"
URL_DOMAIN = "links.split.test"
WAIT = 120  # seconds any one event may take to reach the destination


class Layout:
    """Where each host is and how a program runs there (see the module docstring)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.subnet = "10.231.0" if kind == "netns" else "127.231.0"
        self.net = TestNetwork(f"gas{os.getpid()}", self.subnet) if kind == "netns" else None
        self.smtp_port = 25 if kind == "netns" else free_port(self.ip(ADDRESSES["event"]))
        self.http_port = 80
        while kind != "netns" and self.http_port in (80, self.smtp_port):
            self.http_port = free_port(self.ip(ADDRESSES["event"]))

    def ip(self, n: int) -> str:
        return f"{self.subnet}.{n}"

    def host_ip(self, host: str) -> str:
        return self.ip(ADDRESSES[host])

    @property
    def event_ip(self) -> str:
        return self.host_ip("event")

    @property
    def hub_ip(self) -> str:
        return self.ip(HUB)

    @property
    def url_base(self) -> str:
        port = "" if self.http_port == 80 else f":{self.http_port}"
        return f"http://{URL_DOMAIN}{port}"

    def hub(self) -> AbstractContextManager[None]:
        """Where the test's own servers and clients run."""
        return inside(self.net.hub) if self.net else nullcontext()

    def zone(self) -> dict[str, str]:
        return {
            BOUNCE_DOMAIN: "MX 10 event.split.test",
            "event.split.test": f"A {self.event_ip}",
            URL_DOMAIN: f"A {self.event_ip}",
            "dest.test": "MX 10 mx.dest.test",
            "mx.dest.test": f"A {self.ip(RX_ACCEPT)}",
            "reject.test": "MX 10 mx.reject.test",
            "mx.reject.test": f"A {self.ip(RX_REJECT)}",
        }

EVENT_CONF = f"""
incoming_email_domain {BOUNCE_DOMAIN} {{
    bounce_mailbox return
    spam_complaint_mailbox fbl
}}
"""

# The Mail Class of both senders; send2 gives the bounce address in a header instead.
MAIL_CLASS = """
mail_class news {
    listid split1
    track_clicks_and_opens yes
    url_domain {url_base}
{bounce}}
"""

# Faster delivery of bounces (seed: NAT route, connection reuse, throttles).
SENDER_BOUNCE_ROUTE = f"""
ip_address * {{
    domain {BOUNCE_DOMAIN} {{
{{route}}        reuse_connections yes
        max_concurrent_connections 100
        max_messages_per_hour 10000000
    }}
}}
ip_address mta1 {{
    smtp_source {{source}}
    throttle_template standard
}}
throttle_template standard {{
    domain {BOUNCE_DOMAIN} {{
        max_concurrent_connections 100
        max_messages_per_hour 10000000
    }}
}}
"""

BOUNCE_QUEUE_TUNING = {
    "queue.bounce.concurrencyremote": 100,
    "queue.bounce.limit.messages": 5000,
    "queue.bounce.ramdisk.inodes": 50000,
    "queue.bounce.ramdisk.size": 200,
    "bouncemaxbytes": 5120,
}


def message(sender: str, to: str, instance: str) -> bytes:
    override = (f"X-GreenArrow-BounceMailboxOverride: return@{BOUNCE_DOMAIN}\r\n"
                if sender == "send2" else "")
    return (
        f"From: Shop <news@origin.test>\r\nTo: {to}\r\nSubject: split test\r\n"
        "MIME-Version: 1.0\r\nX-GreenArrow-MailClass: news\r\n"
        f"X-GreenArrow-InstanceID: {instance}\r\nX-GreenArrow-Click-Tracking-ID: ct-{sender}\r\n"
        f"{override}Content-Type: text/html; charset=utf-8\r\n\r\n"
        f'<html><body><img src="https://shop.example.com/logo.png">\r\n'
        f'<a href="https://shop.example.com/p/1?from={sender}">one</a>\r\n'
        '<a href="##unsubscribetag##https://shop.example.com/bye">unsubscribe</a>\r\n'
        "</body></html>\r\n"
    ).encode()


class World:
    """Everything the test made, torn down in reverse order whatever happened."""

    def __init__(self, tmp_path: Path, layout: Layout) -> None:
        self.tmp_path = tmp_path
        self.lay = layout
        self.engines: dict[str, Engine] = {}
        self.dns: DnsServer | None = None
        self.destination: EventDestination | None = None
        self.rx_accept: Receiver | None = None
        self.rx_reject: Receiver | None = None

    def close(self) -> None:
        """Stop everything, each part even when another failed; then raise the first error."""
        errors: list[BaseException] = []
        for engine in self.engines.values():
            for step in (engine.stop, lambda e=engine: _unmount_under(e.root.path)):
                try:
                    step()
                except BaseException as exc:  # noqa: BLE001 - the rest must still stop
                    errors.append(exc)
        for server in (self.rx_accept, self.rx_reject, self.destination, self.dns):
            if server is not None:
                try:
                    server.stop()
                except BaseException as exc:  # noqa: BLE001
                    errors.append(exc)
        if self.lay.net is not None:
            self.lay.net.delete()
        if errors:
            raise errors[0]


def _unmount_under(path: Path) -> None:
    """Unmount what hvmail_init mounted in the install root (the bounce-queue tmpfs)."""
    with open("/proc/self/mounts") as f:
        points = [line.split()[1] for line in f]
    for point in sorted(points, reverse=True):
        if point.startswith(str(path) + "/"):
            subprocess.run(["umount", "-l", point], capture_output=True, timeout=30)


@pytest.fixture(params=["netns", "loopback"])
def world(request: pytest.FixtureRequest, tmp_path: Path):
    why_not = available() if request.param == "netns" else None
    if why_not is not None:
        pytest.skip(f"the network-namespace layout {why_not}; the loopback one runs")
    w = World(tmp_path, Layout(request.param))
    try:
        yield w
    finally:
        w.close()


def run(engine: Engine, program: str, *args: str) -> str:
    result = engine.program(program, *args)
    out = result.stdout.decode() + result.stderr.decode()
    assert result.returncode == 0, f"{program} {' '.join(args)}: {out}"
    return out


def build_network(w: World) -> None:
    lay = w.lay
    if lay.net is not None:
        lay.net.create([HUB, RX_ACCEPT, RX_REJECT])
        for host, n in ADDRESSES.items():
            lay.net.add_host(host, n)
    with lay.hub():
        w.dns = DnsServer(lay.zone(), address=lay.hub_ip).start()
        w.destination = EventDestination(lay.hub_ip).start()
        w.rx_accept = Receiver(lay.ip(RX_ACCEPT), lay.smtp_port,
                               hostname="mx.dest.test").start()
        w.rx_reject = Receiver(lay.ip(RX_REJECT), lay.smtp_port, hostname="mx.reject.test",
                               rcpt_reply="550 5.1.1 <bob> no such user here").start()


def make_engine(w: World, host: str, conf: str, database: str = "none") -> Engine:
    folder = w.tmp_path / host
    folder.mkdir()
    lay = w.lay
    assert w.dns is not None
    controls: dict[str, object] = {
        "me": NAMES[host],
        "smtp.listen": [f"{lay.host_ip(host)}:{lay.smtp_port}"],
        "dns.servers": [f"{lay.hub_ip}:{w.dns.port}"],
    }
    if lay.smtp_port != 25:
        controls["remote.port"] = lay.smtp_port  # every MX host listens there
    engine = Engine(folder, conf=conf, controls=controls, database=database)
    if lay.net is not None:
        engine.command_prefix = lay.net.enter(host)
    w.engines[host] = engine
    return engine


def configure(w: World) -> dict[str, Engine]:
    """The seeds' procedure, step by step, with this engine's commands."""
    lay = w.lay
    event = make_engine(w, "event", EVENT_CONF + f"""
event_delivery_destination app {{
    event_delivery_url "{w.destination.url if w.destination else ''}"
    event_delivery_events all
}}
""", database="bundled")
    senders = {}
    for host in SENDERS:
        bounce = (f"    bounce_address return@{BOUNCE_DOMAIN}\n" if host == "send1" else "")
        # send1 is "behind NAT" (a static route to the event server); send2 finds it by MX.
        port = "" if lay.smtp_port == 25 else f":{lay.smtp_port}"
        route = f"        smtp_route {lay.event_ip}{port}\n" if host == "send1" else ""
        conf = (MAIL_CLASS.replace("{bounce}", bounce).replace("{url_base}", lay.url_base)
                + SENDER_BOUNCE_ROUTE.replace("{route}", route).replace(
                    "{source}", lay.host_ip(host))
                + "general {\n    default_virtual_mta mta1\n"
                "    simplemh_validate_bounce_address no\n}\n")
        if host == "send2":  # the other spelling of stateless event handling (seed 001)
            conf += "general {\n    default_event_tracking_metadata_storage stateless\n}\n"
        senders[host] = make_engine(w, host, conf)
    engines = {"event": event, **senders}

    # Update Secret Constants: one sending server's on every server.
    shown = run(senders["send1"], "greenarrow_config", "secret_constants", "--view")
    c1, c2 = re.findall(r"Constant [12]: (\S+)", shown)
    for engine in (senders["send2"], event):
        run(engine, "greenarrow_config", "secret_constants", f"--constant1={c1}",
            f"--constant2={c2}")
    assert {run(e, "greenarrow_config", "secret_constants", "--view")
            for e in engines.values()} == {shown}

    # Enable Stateless Event Handling (send2 has it in greenarrow.conf instead).
    for engine in (senders["send1"], event):
        (engine.root.control / "opt.simplemh_stateless_event_handling").write_text("1\n")

    # Treat Bounces as "Local": the sending servers' names, one a line.
    (event.root.control / "opt.treat_qsbf_bounces_as_local_server_names").write_text(
        "".join(NAMES[h] + "\n" for h in SENDERS))
    # The URL domain's tracker on the event server, on port 80.
    (event.root.control / "tracker.listen").write_text(f"{lay.event_ip}:{lay.http_port}\n")

    for engine in engines.values():
        run(engine, "greenarrow_config", "check")
    return engines


def tune_and_restart(engine: Engine) -> None:
    """Tune the Bounce-Queue and Truncate Bounces at 5KB, then `hvmail_init restart`."""
    for name, value in BOUNCE_QUEUE_TUNING.items():
        (engine.root.control / name).write_text(f"{value}\n")
    run(engine, "hvmail_init", "restart")
    status = run(engine, "hvmail_init", "status")
    if os.geteuid() == 0:  # only root mounts the tmpfs
        assert "bounce-queue: tmpfs of 200 MB, 50000 inodes" in status, status


def test_split_deployment_end_to_end(world: World) -> None:
    w, lay = world, world.lay
    build_network(w)
    engines = configure(w)
    assert w.dns and w.destination and w.rx_accept and w.rx_reject
    engines["event"].start()
    for host in SENDERS:
        engines[host].start()
        tune_and_restart(engines[host])
        run(engines[host], "greenarrow_config", "reload")

    with lay.hub():
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [lay.hub_ip]
        resolver.port = w.dns.port
        # First, check for DNS misconfigurations.
        assert [r.address for r in resolver.resolve(URL_DOMAIN, "A")] == [lay.event_ip]
        (mx,) = resolver.resolve(BOUNCE_DOMAIN, "MX")
        assert [r.address for r in resolver.resolve(mx.exchange, "A")] == [lay.event_ip]
        wait_until(lambda: _listening(lay.event_ip, lay.http_port)
                   and _listening(lay.event_ip, lay.smtp_port), 60,
                   "the event server's tracker and SMTP server")

        constants = _constants(engines["event"])
        for n, host in enumerate(SENDERS, 1):
            _sequence(w, engines[host], host, f"200{n}", constants)


def _sequence(w: World, engine: Engine, host: str, instance: str,
              constants: tuple[str, str]) -> None:
    """The seeds' six test steps from one sending server (runs inside the hub)."""
    assert w.destination and w.rx_accept and w.rx_reject
    lay = w.lay
    dest, source, hub = w.destination, lay.host_ip(host), lay.hub_ip
    ann = f"ann.{host}@dest.test"
    sendid = f"news-{instance}"
    identity = {"email": ann, "listid": "split1", "sendid": sendid, "mailclass": "news",
                "instanceid": instance, "click_tracking_id": f"ct-{host}",
                "server_id": NAMES["event"]}

    # 1. An HTML email with click tracking and an unsubscribe link.
    sent = engine.sendmail("-f", "news@origin.test", ann, message=message(host, ann, instance))
    assert sent.returncode == 0, sent.stderr
    copy = _delivered(w.rx_accept, ann)
    assert copy.peer[0] == source  # it left from the sending server's own host
    assert return_path.decode(copy.sender, constants).recipient == ann
    assert copy.sender.endswith(f"@{BOUNCE_DOMAIN}")
    html = message_from_bytes(copy.content, policy=policy.default).get_content()
    base = re.escape(f"{lay.url_base}/")
    (pixel,) = re.findall(base + r"open\?[A-Za-z0-9_-]+", html)
    click, unsub = re.findall(base + r"click\?[A-Za-z0-9_-]+", html)
    data = tracking_url.decode(tracking_url.data_from_url(click)[1], constants)
    assert data.stateless and data.sendid == sendid  # stateless event handling is on

    # 2. Images loaded -> engine_open.
    assert _get(lay, pixel)[0] == 200
    _check(_event(dest, "engine_open", ann), identity, engine_ip=hub)
    # 3. A link clicked -> its URL and engine_click.
    target = f"https://shop.example.com/p/1?from={host}"
    assert _get(lay, click) == (302, target)
    _check(_event(dest, "engine_click", ann), identity, click_url=target, engine_ip=hub)
    # 4. The unsubscribe link -> its URL (with the subscriber's identity) and engine_unsub.
    query = urllib.parse.urlencode({"email": ann, "sendid": sendid, "listid": "split1"})
    assert _get(lay, unsub) == (302, f"https://shop.example.com/bye?{query}")
    _check(_event(dest, "engine_unsub", ann), identity, click_url="https://shop.example.com/bye")

    # 5. The raw headers of message 1 mailed to the spam-complaint mailbox -> scomp.
    # send1's: pasted into the text, as a person does; send2's: forwarded as an attachment
    # (message/rfc822), as a mail client does.
    headers = copy.content.split(b"\r\n\r\n", 1)[0]
    head = (f"From: postmaster@dest.test\r\nTo: fbl@{BOUNCE_DOMAIN}\r\n"
            "Subject: spam complaint\r\n").encode()
    if host == "send1":
        complaint = head + b"\r\nThe headers of the message:\r\n\r\n" + headers + b"\r\n"
    else:
        complaint = head + (
            b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="c1"\r\n\r\n'
            b"--c1\r\nContent-Type: text/plain\r\n\r\n"
            b"This subscriber reported the attached message as spam.\r\n\r\n"
            b"--c1\r\nContent-Type: message/rfc822\r\n\r\n") + headers + (
            b"\r\n\r\n--c1--\r\n")
    _mail_to_mx(lay, "postmaster@dest.test", f"fbl@{BOUNCE_DOMAIN}", complaint)
    _check(_event(dest, "scomp", ann), identity)

    # 6. A message to an address that bounces: refused with 550 -> the sending server's
    # qmail-style bounce goes to the event server -> bounce_all (synchronous) and, a hard
    # bounce reaching the threshold of 1, bounce_bad_address.
    bob = f"bob.{host}@reject.test"
    sent = engine.sendmail("-f", "news@origin.test", bob, message=message(host, bob, instance))
    assert sent.returncode == 0, sent.stderr
    bob_identity = {**identity, "email": bob}
    _check(_event(dest, "bounce_all", bob), bob_identity, bounce_type="h", synchronous=True)
    _check(_event(dest, "bounce_bad_address", bob), bob_identity, bounce_type="h")

    # ... and one accepted, bounced later by the receiving host (a mailbox-full DSN to the
    # Return-Path) -> bounce_all, asynchronous and soft: no bounce_bad_address.
    carol = f"carol.{host}@dest.test"
    sent = engine.sendmail("-f", "news@origin.test", carol,
                           message=message(host, carol, instance))
    assert sent.returncode == 0, sent.stderr
    late = _delivered(w.rx_accept, carol)
    _mail_to_mx(lay, "", late.sender, _dsn(late, carol))
    carol_identity = {**identity, "email": carol}
    _check(_event(dest, "bounce_all", carol), carol_identity, bounce_type="s",
           synchronous=False)
    assert not _events(dest, "bounce_bad_address", carol)


def _constants(engine: Engine) -> tuple[str, str]:
    c1, c2 = re.findall(r"Constant [12]: (\S+)",
                        run(engine, "greenarrow_config", "secret_constants", "--view"))
    return c1, c2


def _listening(host: str, port: int) -> bool:
    import socket

    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def _delivered(rx: Receiver, recipient: str):
    found = []

    def look() -> bool:
        found[:] = [m for m in list(rx.messages) if recipient in m.recipients]
        return bool(found)

    wait_until(look, WAIT, f"the copy for {recipient} at the receiving host")
    return found[0]


def _get(lay: Layout, url: str) -> tuple[int, str | None]:
    """GET `url` as the subscriber's mail client would (its host's A record was checked)."""
    parts = urllib.parse.urlsplit(url)
    assert (parts.hostname, parts.port or 80) == (URL_DOMAIN, lay.http_port)
    conn = http.client.HTTPConnection(lay.event_ip, lay.http_port, timeout=20,
                                      source_address=(lay.hub_ip, 0))
    try:
        conn.request("GET", f"{parts.path}?{parts.query}", headers={"Host": parts.netloc})
        resp = conn.getresponse()
        resp.read()
        return resp.status, resp.getheader("Location")
    finally:
        conn.close()


def _mail_to_mx(lay: Layout, sender: str, recipient: str, content: bytes) -> None:
    """Send as another MTA would: to the bounce domain's MX (checked first)."""
    assert recipient.endswith(f"@{BOUNCE_DOMAIN}")
    with smtplib.SMTP(lay.event_ip, lay.smtp_port, local_hostname="mx.dest.test", timeout=30,
                      source_address=(lay.ip(RX_ACCEPT), 0)) as smtp:
        smtp.sendmail(sender, [recipient], content)


def _dsn(original, recipient: str) -> bytes:
    headers = original.content.split(b"\r\n\r\n", 1)[0]
    return (
        "From: Mail Delivery System <MAILER-DAEMON@mx.dest.test>\r\n"
        f"To: {original.sender}\r\nSubject: Undelivered Mail Returned to Sender\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="b1"\r\n\r\n'
        "--b1\r\nContent-Type: text/plain\r\n\r\n"
        f"<{recipient}>: mailbox full\r\n\r\n"
        "--b1\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.dest.test\r\n\r\n"
        f"Final-Recipient: rfc822; {recipient}\r\nAction: failed\r\nStatus: 5.2.2\r\n"
        "Diagnostic-Code: smtp; 552 5.2.2 mailbox full\r\n\r\n"
        "--b1\r\nContent-Type: text/rfc822-headers\r\n\r\n"
    ).encode() + headers + b"\r\n\r\n--b1--\r\n"


def _events(dest: EventDestination, kind: str, email: str) -> list[dict]:
    with dest.lock:
        return [e for batch in dest.batches for e in batch
                if e["event_type"] == kind and e.get("email") == email]


def _event(dest: EventDestination, kind: str, email: str) -> dict:
    found: list[dict] = []

    def look() -> bool:
        found[:] = _events(dest, kind, email)
        return bool(found)

    wait_until(look, WAIT, f"{kind} for {email} at the event destination")
    assert len(found) == 1, found
    return found[0]


def _check(event: dict, identity: dict, **fields: object) -> None:
    """The event has exactly its type's fields (seed 003) and these values."""
    assert list(event) == list(types.FIELDS[event["event_type"]]), event
    expected = {k: v for k, v in {**identity, **fields}.items() if k in event}
    assert {k: event[k] for k in expected} == expected, event

