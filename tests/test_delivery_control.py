"""Delivery control through the real engine: VirtualMTAs, throttles, backoff, reuse, TLS."""

from __future__ import annotations

import json
import random
import time
from collections import Counter

from click.testing import CliRunner
from engine import Engine, wait_until
from smtp_receivers import Receiver, self_signed_context

from greenarrow.bin.queue import queue_command
from greenarrow.lib.config import conf as conflib
from greenarrow.lib.deliver.throttle import Program, Throttles
from greenarrow.lib.routing.virtual_mta import VirtualMtas


def send(engine: Engine, rcpt: str, mtaid: str | None = None, header: str = "") -> None:
    env = {"GREENARROW_MTAID": mtaid} if mtaid else {}
    result = engine.sendmail("-f", "s@origin.test", rcpt, env=env,
                             message=f"{header}Subject: to {rcpt}\n\nhello\n".encode())
    assert result.returncode == 0, result.stderr


def test_source_ip_and_helo_of_each_virtual_mta(tmp_path):
    """127.0.0.2 and 127.0.0.3 as two VirtualMTAs: the receiver sees the peer address and
    HELO of the one selected by GREENARROW_MTAID or X-GreenArrow-MtaID (numeric id too)."""
    with Receiver() as rx:
        conf = f"""
ip_address mta2 {{
  smtp_source 127.0.0.2
  hostname mta2.example.test
}}
ip_address mta3 {{
  smtp_source 127.0.0.3
  hostname mta3.example.test
  id 33
}}
ip_address * {{
  domain dest.test {{
    smtp_route 127.0.0.1:{rx.port}
  }}
}}
"""
        engine = Engine(tmp_path, conf=conf)
        with engine:
            send(engine, "a@dest.test", mtaid="mta2")
            send(engine, "b@dest.test", header="X-GreenArrow-MtaID: mta3\n")
            send(engine, "c@dest.test", mtaid="33")
            send(engine, "d@dest.test", mtaid="no-such-vmta")  # the default VirtualMTA
            wait_until(lambda: len(rx.messages) == 4, 30, "four messages")
            wait_until(lambda: len(engine.records()) == 4, 10, "four log lines")
        seen = {m.recipients[0]: (m.peer[0], m.helo) for m in rx.messages}
        assert seen["a@dest.test"] == ("127.0.0.2", "mta2.example.test")
        assert seen["b@dest.test"] == ("127.0.0.3", "mta3.example.test")
        assert seen["c@dest.test"] == ("127.0.0.3", "mta3.example.test")
        assert seen["d@dest.test"] == ("127.0.0.1", "engine.test")
        records = {r["email"]: r for r in engine.records()}
        assert records["b@dest.test"]["outmtaid_ip"] == "127.0.0.3"
        assert records["b@dest.test"]["outmtaid_name"] == "mta3"
        assert records["b@dest.test"]["outmtaid"] == "33"
        assert records["c@dest.test"]["mtaid"] == "33"
        assert records["c@dest.test"]["mtaid_name"] == "mta3"
        assert records["a@dest.test"]["outmtaid_hostname"] == "mta2.example.test"


ROUTING = """
ip_address a {
  smtp_source 127.0.0.2
}
ip_address b {
  smtp_source 127.0.0.3
}
ip_address c {
  smtp_source 127.0.0.4
}
routing_rule inner {
  route b 1
  route c 1
  randomization %(mode)s
}
routing_rule mix {
  route a 2
  route inner 2
  randomization %(mode)s
}
"""


def test_routing_rule_distributions_fall_within_bounds():
    """Weights 2:1:1 (a, then b and c through a nested rule) over 20,000 draws: each share
    is within 5 standard deviations of its expectation, for every randomization mode."""
    n = 20000
    for mode in ("fully_random", "message_constant", "email_address_constant"):
        vmtas = VirtualMtas(conflib.parse(ROUTING % {"mode": mode}))
        rule = vmtas.lookup("mix")
        rng = random.Random(7)
        counts = Counter(vmtas.resolve(rule, f"msg{i}", f"user{i}@x.test", rng).name
                         for i in range(n))
        for name, p in (("a", 0.5), ("b", 0.25), ("c", 0.25)):
            sigma = (n * p * (1 - p)) ** 0.5
            assert abs(counts[name] - n * p) < 5 * sigma, (mode, counts)
    constant = VirtualMtas(conflib.parse(ROUTING % {"mode": "message_constant"}))
    assert len({constant.resolve(constant.lookup("mix"), "same-msg", f"u{i}@x").name
                for i in range(50)}) == 1
    by_address = VirtualMtas(conflib.parse(ROUTING % {"mode": "email_address_constant"}))
    assert len({by_address.resolve(by_address.lookup("mix"), f"m{i}", "Same@X.test").name
                for i in range(50)}) == 1


def test_concurrent_connections_never_exceed_the_limit_and_connmaxout_is_logged(tmp_path):
    with Receiver(delay=0.5, delay_at="data") as rx:
        conf = f"""
ip_address * {{
  domain dest.test {{
    smtp_route 127.0.0.1:{rx.port}
    max_concurrent_connections 2
  }}
}}
"""
        engine = Engine(tmp_path, conf=conf, workers=2,
                        controls={"concurrencyremote": 20, "queue.retry.scale": 0.002})
        with engine:
            for n in range(12):
                send(engine, f"u{n}@dest.test")
            wait_until(lambda: len({m.recipients[0] for m in rx.messages}) == 12, 120,
                       "every message, throttled or not")
        assert rx.max_active <= 2
        statuses = Counter(r["status"] for q in ("ram", "disk") for r in engine.records(q))
        assert statuses["connmaxout"] > 0
        assert statuses["success"] == 12


def test_messages_per_hour_hold_with_a_simulated_clock():
    now = [1000.0]
    throttles = Throttles(clock=lambda: now[0])
    granted = 0
    for _ in range(150):
        if throttles.acquire("ip1|rule", 0, 100) is None:
            granted += 1
            throttles.release("ip1|rule", "success")
    assert granted == 100
    assert "max messages per hour (100)" in throttles.acquire("ip1|rule", 0, 100)
    now[0] += 1800
    assert throttles.acquire("ip1|rule", 0, 100) is not None  # still within the hour
    now[0] += 1801
    assert throttles.acquire("ip1|rule", 0, 100) is None  # the hour has passed


def test_backoff_triggers_on_deferrals_and_lifts_again():
    now = [0.0]
    throttles = Throttles(clock=lambda: now[0])
    program = Program("careful", deferral_rate=50, backoff_max_concurrent_connections="1",
                      return_after=600, window=300, min_attempts=10)
    for i in range(10):
        assert throttles.acquire("k", 4, 0, program) is None
        throttles.release("k", "deferral" if i % 2 else "success")
        now[0] += 1
    state = throttles.snapshot()["k"]
    assert state["backoff_until"] and "5 of 10 attempts deferred" in state["backoff_reason"]
    assert state["effective_max_concurrent_connections"] == 1
    assert throttles.acquire("k", 4, 0, program) is None
    assert "(1 (backoff))" in throttles.acquire("k", 4, 0, program)
    throttles.release("k", "success")
    now[0] += 601
    assert throttles.snapshot()["k"]["backoff_until"] is None
    assert throttles.acquire("k", 4, 0, program) is None  # limits are back


def test_backoff_through_the_engine_is_visible_and_lifts(tmp_path):
    """A receiver that defers half of what it gets puts the rule into backoff; status and
    explain show it; it lifts after return_after."""
    with Receiver() as rx:
        conf = f"""
throttle_program careful {{
  deferral_rate 40
  min_attempts 6
  window 5m
  return_after 3s
  backoff_max_concurrent_connections 1
}}
ip_address * {{
  domain flaky.test {{
    smtp_route 127.0.0.1:{rx.port}
    max_concurrent_connections 5
    throttle_program careful
  }}
}}
"""
        engine = Engine(tmp_path, conf=conf, controls={"queue.retry.scale": 100})
        with engine:
            for n in range(8):
                rx.rcpt_reply = "451 4.7.1 please slow down" if n % 2 else None
                send(engine, f"u{n}@flaky.test")
                wait_until(lambda n=n: len(engine.records()) == n + 1, 30, "one attempt")
            env = {"HVMAIL_ROOT": str(engine.root.path)}

            def throttle_state():
                path = engine.root.var / "throttle.0.json"
                if not path.exists():
                    return {}
                return json.loads(path.read_text())["keys"].get("default|ip_address *:flaky.test", {})

            wait_until(lambda: throttle_state().get("backoff_until"), 10, "backoff mode")
            explained = CliRunner().invoke(queue_command, ["explain", "flaky.test"], env=env).output
            assert "BACKOFF" in explained and "deferred" in explained
            assert "throttle rule ip_address *:flaky.test" in explained
            assert "backoff:" in CliRunner().invoke(queue_command, ["status"], env=env).output
            time.sleep(3.5)
            rx.rcpt_reply = None
            send(engine, "late@flaky.test")
            wait_until(lambda: any(m.recipients == ["late@flaky.test"] for m in rx.messages), 30,
                       "delivery after backoff")
            wait_until(lambda: not throttle_state().get("backoff_until"), 10, "backoff to lift")


def test_reuse_connections_sends_many_messages_per_connection(tmp_path):
    with Receiver() as rx:
        conf = f"""
ip_address * {{
  domain reuse.test {{
    smtp_route 127.0.0.1:{rx.port}
    reuse_connections yes
    reuse_connections_max_messages 10
  }}
}}
"""
        engine = Engine(tmp_path, conf=conf, controls={"concurrencyremote": 2})
        with engine:
            for n in range(30):
                send(engine, f"u{n}@reuse.test")
            wait_until(lambda: len(rx.messages) == 30, 60, "thirty messages")
        assert rx.connections < 30
        assert rx.connections >= 3  # at most 10 messages per connection
        assert all(r["status"] == "success" for r in engine.records())


def test_starttls_opportunistic_and_required_against_a_self_signed_receiver(tmp_path):
    context = self_signed_context(tmp_path)
    with Receiver(tls_context=context) as tls_rx, Receiver() as plain_rx:
        conf = f"""
ip_address * {{
  domain tls.test {{
    smtp_route 127.0.0.1:{tls_rx.port}
  }}
  domain must.test {{
    smtp_route 127.0.0.1:{tls_rx.port}
    starttls_use required
  }}
  domain plain.test {{
    smtp_route 127.0.0.1:{plain_rx.port}
    starttls_use required
  }}
  domain never.test {{
    smtp_route 127.0.0.1:{tls_rx.port}
    starttls_use never
  }}
}}
"""
        engine = Engine(tmp_path, conf=conf, controls={"queue.retry.scale": 100})
        with engine:
            for rcpt in ("a@tls.test", "b@must.test", "c@plain.test", "d@never.test"):
                send(engine, rcpt)
            wait_until(lambda: len(engine.records()) == 4, 30, "four attempts")
        tls = {m.recipients[0]: m.tls for m in tls_rx.messages}
        assert tls == {"a@tls.test": True, "b@must.test": True, "d@never.test": False}
        assert plain_rx.messages == []
        record = next(r for r in engine.records() if r["email"] == "c@plain.test")
        assert record["status"] == "deferral" and "TLS" in record["message"]


def test_relay_server_with_smtp_auth(tmp_path):
    """A relay_server VirtualMTA sends everything to its relay_host, logs in with AUTH
    PLAIN, and a refused login is a deferral (a configuration mistake must not bounce
    every message), reported in qmail's words."""
    import base64

    from smtp_receivers import ScriptedServer

    with ScriptedServer(extensions=["PIPELINING", "AUTH PLAIN LOGIN"],
                        replies={"AUTH": "235 2.7.0 authenticated"}) as relay, \
            ScriptedServer(extensions=["AUTH PLAIN"],
                           replies={"AUTH": "535 5.7.8 bad credentials"}) as refusing:
        conf = f"""
relay_server smarthost {{
  relay_host 127.0.0.1:{relay.port}
  smtp_auth_username sender@example.test
  smtp_auth_password "s3cret pass"
  hostname relay-client.example.test
}}
relay_server badauth {{
  relay_host 127.0.0.1:{refusing.port}
  smtp_auth_username u
  smtp_auth_password wrong
}}
"""
        engine = Engine(tmp_path, conf=conf, controls={"queue.retry.scale": 100})
        with engine:
            send(engine, "anyone@anywhere.test", mtaid="smarthost")
            send(engine, "other@anywhere.test", mtaid="badauth")
            wait_until(lambda: len(engine.records()) == 2, 30, "both attempts")
        token = base64.b64encode(b"\0sender@example.test\0s3cret pass").decode()
        assert f"AUTH PLAIN {token}" in relay.commands
        assert any(c.startswith("EHLO relay-client.example.test") for c in relay.commands)
        assert len(relay.raw_messages) == 1
        records = {r["email"]: r for r in engine.records()}
        assert records["anyone@anywhere.test"]["status"] == "success"
        assert records["anyone@anywhere.test"]["outmtaid_name"] == "smarthost"
        refused = records["other@anywhere.test"]
        assert refused["status"] == "deferral"
        assert "authentication was rejected" in refused["message"] and "535" in refused["message"]
