"""An authoritative test DNS server on loopback, so no test ever asks a real DNS server.

dnslib answers from a zone given as zone text or as a dict, over UDP and TCP
on the same free port of 127.0.0.1, from background threads. Every query is
counted, which is how cache tests prove that a lookup did not reach the server.

    with DnsServer({
        "example.test": ["MX 10 mx1.example.test", "MX 20 mx2.example.test"],
        "mx1.example.test": "A 127.0.0.2",
        "mx2.example.test": ["300 A 127.0.0.3"],
    }) as dns:
        resolver = MxResolver(dns.nameservers)
        ...
        assert dns.count("example.test", "MX") == 1

Zone rules:

* Names are absolute whether or not they end with a dot (the origin is the
  root), in the zone text and in record data alike.
* A record line may start with a TTL; otherwise `ttl` (default 300) applies.
* A name with records, but none of the asked type, answers NOERROR with no
  data and a SOA whose minimum is `negative_ttl`; a name without records
  answers NXDOMAIN. CNAMEs are followed inside the zone.
* Names in `servfail` answer SERVFAIL; names in `drop` get no answer at all
  (the client times out). Both are plain sets, changeable while running, as
  is the zone through `set_zone`/`add`.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterable, Mapping

from dnslib import QTYPE, RCODE, RR, DNSError, DNSRecord
from dnslib.server import DNSHandler, TCPServer, UDPServer

__all__ = ["DnsServer", "Zone"]

Zone = str | Mapping[str, str | Iterable[str]]
"""Zone text, or {name: record or [records]} with records like "MX 10 mx.example.test"."""


def _norm(name: str) -> str:
    return name.lower().rstrip(".")


class _QuietLogger:
    """dnslib's logger prints every packet; tests want silence."""

    def __getattr__(self, name: str):
        return lambda *args: None


class _Handler(DNSHandler):
    def get_reply(self, data: bytes) -> bytes:
        request = DNSRecord.parse(data)
        reply = self.server.resolver.resolve(request, self)
        if reply is None:
            # DNSHandler.handle swallows DNSError without answering: a dropped query.
            raise DNSError("dropped on purpose")
        return reply.pack()


class DnsServer:
    """A dnslib DNS server for tests; `start()` (or `with`) runs it, `stop()` ends it."""

    def __init__(
        self,
        zone: Zone = "",
        *,
        ttl: int = 300,
        negative_ttl: int = 60,
        address: str = "127.0.0.1",
    ) -> None:
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.address = address
        self.port = 0
        self.servfail: set[str] = set()
        self.drop: set[str] = set()
        self.queries: list[tuple[str, str]] = []
        """Every question asked, as (name without trailing dot, type such as "MX")."""
        self._lock = threading.Lock()
        self._records: dict[str, list[RR]] = {}
        self._servers: list[UDPServer | TCPServer] = []
        self._threads: list[threading.Thread] = []
        self.add(zone)

    # -- zone -----------------------------------------------------------------

    def set_zone(self, zone: Zone) -> None:
        """Replace every record."""
        with self._lock:
            self._records = {}
        self.add(zone)

    def add(self, zone: Zone) -> None:
        """Add records to the zone."""
        if isinstance(zone, str):
            text = zone
        else:
            lines = []
            for name, records in zone.items():
                if isinstance(records, str):
                    records = [records]
                lines.extend(f"{_norm(name)}. {record}" for record in records)
            text = "\n".join(lines)
        rrs = RR.fromZone(text, origin=".", ttl=self.ttl) if text.strip() else []
        with self._lock:
            for rr in rrs:
                self._records.setdefault(_norm(str(rr.rname)), []).append(rr)

    # -- queries --------------------------------------------------------------

    def count(self, name: str | None = None, qtype: str | None = None) -> int:
        """How many questions matched `name` and/or `qtype` (None matches all)."""
        want_name = None if name is None else _norm(name)
        want_type = None if qtype is None else qtype.upper()
        with self._lock:
            return sum(
                1
                for n, t in self.queries
                if (want_name is None or n == want_name) and (want_type is None or t == want_type)
            )

    def reset_counts(self) -> None:
        """Forget the questions asked so far."""
        with self._lock:
            self.queries.clear()

    @property
    def nameservers(self) -> list[tuple[str, int]]:
        """[(ip, port)], the form `MxResolver(nameservers=...)` takes."""
        return [(self.address, self.port)]

    def resolve(self, request: DNSRecord, handler: object) -> DNSRecord | None:
        """dnslib's resolver interface: the reply to `request` (None: no answer at all)."""
        qname = _norm(str(request.q.qname))
        qtype = request.q.qtype
        with self._lock:
            self.queries.append((qname, QTYPE.get(qtype, str(qtype))))
            records = dict(self._records)
        if qname in self.drop:
            return None
        reply = request.reply()
        if qname in self.servfail:
            reply.header.rcode = RCODE.SERVFAIL
            return reply
        name = qname
        for _ in range(10):  # CNAME chain, bounded
            rrs = records.get(name)
            if rrs is None:
                reply.header.rcode = RCODE.NXDOMAIN
                self._add_soa(reply)
                return reply
            matching = [rr for rr in rrs if rr.rtype == qtype or qtype == QTYPE.ANY]
            if matching:
                for rr in matching:
                    reply.add_answer(rr)
                return reply
            cnames = [rr for rr in rrs if rr.rtype == QTYPE.CNAME]
            if not cnames or qtype == QTYPE.CNAME:
                break
            reply.add_answer(cnames[0])
            name = _norm(str(cnames[0].rdata.label))
        self._add_soa(reply)
        return reply

    def _add_soa(self, reply: DNSRecord) -> None:
        neg = self.negative_ttl
        reply.add_auth(
            *RR.fromZone(f". {neg} IN SOA ns.test. hostmaster.test. 1 3600 600 86400 {neg}")
        )

    # -- life -----------------------------------------------------------------

    def start(self) -> DnsServer:
        """Bind UDP and TCP on one free port of `address` and serve from daemon threads."""
        last_error: OSError | None = None
        for _ in range(20):
            udp = UDPServer((self.address, 0), _Handler)
            port = udp.server_address[1]
            try:
                tcp = TCPServer((self.address, port), _Handler)
            except OSError as exc:  # the port is taken for TCP: try another
                udp.server_close()
                last_error = exc
                continue
            break
        else:
            raise RuntimeError(f"no free UDP+TCP port on {self.address}: {last_error}")
        self.port = port
        for server in (udp, tcp):
            server.resolver = self
            server.logger = _QuietLogger()
            thread = threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
            )
            thread.start()
            self._servers.append(server)
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Stop serving and close the sockets; safe to call twice."""
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers.clear()
        self._threads.clear()

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_udp_port(address: str = "127.0.0.1") -> int:
    """A UDP port with nothing behind it right now (for "server unreachable" tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((address, 0))
        return sock.getsockname()[1]
