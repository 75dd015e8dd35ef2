"""MX delivery through a real DNS server on loopback.

The domain has three MX records: the most preferred points at an address
where nothing listens, the next at a live receiver, the last at another.
Delivery skips the dead one and lands on the live MX of best preference.
"""

from __future__ import annotations

from dns_server import DnsServer
from engine import Engine, wait_until
from smtp_receivers import Receiver


def test_delivery_goes_to_the_live_mx_of_best_preference(tmp_path):
    with Receiver("127.0.0.3") as live, Receiver("127.0.0.4", live.port) as backup, DnsServer({
        "mx-test.example": ["MX 10 dead.mx-test.example", "MX 20 live.mx-test.example",
                            "MX 30 backup.mx-test.example"],
        "dead.mx-test.example": "A 127.0.0.9",
        "live.mx-test.example": "A 127.0.0.3",
        "backup.mx-test.example": "A 127.0.0.4",
    }) as dns:
        ip, port = dns.nameservers[0]
        engine = Engine(tmp_path, controls={"dns.servers": [f"{ip}:{port}"],
                                            "remote.port": live.port})
        with engine:
            result = engine.sendmail("-f", "s@origin.test", "someone@mx-test.example",
                                     message=b"Subject: mx\n\nhello\n")
            assert result.returncode == 0, result.stderr
            wait_until(lambda: live.messages, 30, "delivery to the live MX")
            wait_until(lambda: engine.records(), 10, "the delivery log line")
        assert backup.messages == []
        record = engine.records()[0]
        assert record["status"] == "success"
        assert record["mx_hostname"] == "live.mx-test.example"
        assert record["mx_ip"] == "127.0.0.3"
        assert dns.count("mx-test.example", "MX") >= 1


def test_unknown_domain_is_a_permanent_failure(tmp_path):
    with DnsServer({"other.example": "A 127.0.0.5"}) as dns:
        ip, port = dns.nameservers[0]
        engine = Engine(tmp_path, controls={"dns.servers": [f"{ip}:{port}"]})
        with engine:
            result = engine.sendmail("-f", "s@origin.test", "x@nowhere.example",
                                     message=b"Subject: nx\n\nhello\n")
            assert result.returncode == 0
            wait_until(lambda: engine.records(), 30, "the delivery log line")
        record = engine.records()[0]
        assert record["status"] == "failure"
        assert "couldn't find any host named nowhere.example" in record["message"]
        assert engine.queued() == []
