"""One delivery attempt against scripted loopback receivers: every phase, success and failure."""

from __future__ import annotations

import asyncio
import socket

import pytest
from dns_server import DnsServer
from smtp_receivers import Receiver, ScriptedServer, self_signed_context

from greenarrow.lib.deliver.session_pool import SessionPool
from greenarrow.lib.smtp.client import (
    NO_CONNECTION_TEXT,
    Attempt,
    Result,
    Timeouts,
    deliver,
    dot_stuff,
)
from greenarrow.lib.smtp.mx import MxHost, MxResolver

T = Timeouts(cap=10.0)  # every wait bounded, none ever reached by a healthy receiver
MESSAGE = (
    b"From: sender@example.test\r\n"
    b"To: rcpt@example.test\r\n"
    b"Subject: dots\r\n"
    b"\r\n"
    b".leading dot\r\n"
    b"..two dots\r\n"
    b".\r\n"
    b"middle . dot\r\n"
    b"caf\xc3\xa9 8-bit\r\n"
)


def run(coro):
    """Run `coro` with a bound, so a hang fails the test instead of stalling the run."""
    return asyncio.run(asyncio.wait_for(coro, 60))


def attempt(message: bytes = MESSAGE, **kw) -> Attempt:
    fields = {"sender": "sender@example.test", "recipient": "rcpt@example.test", "helo": "out.test"}
    fields.update(kw)
    return Attempt(message=message, **fields)


def send(server, *, message: bytes = MESSAGE, timeouts: Timeouts = T, **kw) -> Result:
    host = MxHost("mx.example.test", 10, [server.host])
    return run(deliver(attempt(message, **kw), [host], port=server.port, timeouts=timeouts))


def unused_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def tls_context(tmp_path_factory):
    return self_signed_context(tmp_path_factory.mktemp("tls"))


# -- dot-stuffing and timeouts ---------------------------------------------------


def test_dot_stuff():
    assert dot_stuff(b"") == b".\r\n"
    assert dot_stuff(b"a\r\n") == b"a\r\n.\r\n"
    assert dot_stuff(b"a") == b"a\r\n.\r\n"
    assert dot_stuff(b".a\r\n.\r\n..b\r\n") == b"..a\r\n..\r\n...b\r\n.\r\n"


def test_timeouts_cap():
    capped = Timeouts(cap=0.5).capped()
    assert capped.greeting == capped.data_term == capped.connect == 0.5
    assert Timeouts(cap=1000).capped().connect == 60.0
    assert Timeouts().capped() == Timeouts()


# -- success -------------------------------------------------------------------


def test_success_message_arrives_byte_identical():
    with Receiver("127.0.0.2") as rx:
        result = send(rx)
    assert result.status == "success"
    assert result.smtp_code == 250
    assert result.text.startswith("127.0.0.2 accepted message./Remote host said: 250 ")
    assert (result.mx_hostname, result.mx_ip) == ("mx.example.test", "127.0.0.2")
    [msg] = rx.messages
    assert msg.content == MESSAGE
    assert msg.sender == "sender@example.test"
    assert msg.recipients == ["rcpt@example.test"]
    assert msg.helo == "out.test"
    assert msg.peer[0] == "127.0.0.1"
    assert not msg.tls
    assert f"SIZE={len(MESSAGE)}" in msg.mail_options
    assert "BODY=8BITMIME" in msg.mail_options


def test_seven_bit_message_has_no_body_parameter():
    with Receiver("127.0.0.2") as rx:
        assert send(rx, message=b"Subject: x\r\n\r\nplain\r\n").status == "success"
    assert not any(o.startswith("BODY=") for o in rx.messages[0].mail_options)


def test_message_starting_with_dot_and_without_final_crlf():
    with Receiver() as rx:
        assert send(rx, message=b".first\r\nlast line").status == "success"
    assert rx.messages[0].content == b".first\r\nlast line\r\n"


def test_large_message_in_blocks():
    body = b"".join(b".%06d " % i + b"x" * 70 + b"\r\n" for i in range(20000))  # ~1.6 MB
    with Receiver() as rx:
        assert send(rx, message=body).status == "success"
    assert rx.messages[0].content == body


def test_null_sender():
    with Receiver() as rx:
        assert send(rx, sender="").status == "success"
    assert rx.messages[0].sender == "<>"  # aiosmtpd keeps the brackets of a null sender


def test_source_ip_binds_the_socket():
    with Receiver("127.0.0.2") as rx:
        assert send(rx, source_ip="127.0.0.5").status == "success"
    assert rx.messages[0].peer[0] == "127.0.0.5"


def test_line_break_in_address_fails_without_connecting():
    with Receiver() as rx:
        result = send(rx, recipient="a@b.test\r\nRCPT TO:<evil@x.test>")
    assert result.status == "failure"
    assert rx.connections == 0


# -- rejections by phase -------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "status"),
    [("450 4.2.1 mailbox busy", "deferral"), ("550 5.1.1 no such user", "failure")],
)
def test_rcpt_rejected(reply, status):
    with Receiver("127.0.0.2", rcpt_reply=reply) as rx:
        result = send(rx)
    assert result.status == status
    assert result.smtp_code == int(reply[:3])
    assert result.text == f"127.0.0.2 does not like recipient./Remote host said: {reply}"
    assert rx.messages == []


@pytest.mark.parametrize(
    ("reply", "status"),
    [("451 4.3.0 try later", "deferral"), ("554 5.7.1 spam", "failure")],
)
def test_rejected_after_data(reply, status):
    with Receiver("127.0.0.2", data_reply=reply) as rx:
        result = send(rx)
    assert result.status == status
    assert result.text == f"127.0.0.2 failed after I sent the message./Remote host said: {reply}"


def test_sender_rejected():
    with Receiver("127.0.0.2", mail_reply="553 5.7.1 sender denied") as rx:
        result = send(rx)
    assert result.status == "failure"
    assert result.text == (
        "Connected to 127.0.0.2 but sender was rejected./Remote host said: 553 5.7.1 sender denied"
    )


def test_data_command_rejected():
    with ScriptedServer(replies={"DATA": "554 5.5.1 no data for you"}) as srv:
        result = send(srv)
    assert result.status == "failure"
    assert result.text == (
        "127.0.0.1 failed on DATA command./Remote host said: 554 5.5.1 no data for you"
    )


def test_greeting_554_is_failure():
    with ScriptedServer(greeting="554 5.7.1 go away") as srv:
        result = send(srv)
    assert result.status == "failure"
    assert result.smtp_code == 554
    assert result.text == (
        "Connected to 127.0.0.1 but greeting failed./Remote host said: 554 5.7.1 go away"
    )


def test_greeting_421_tries_next_host():
    with ScriptedServer("127.0.0.2", greeting="421 4.3.2 busy") as busy:
        with Receiver("127.0.0.3", busy.port) as rx:
            hosts = [MxHost("mx1", 10, ["127.0.0.2"]), MxHost("mx2", 20, ["127.0.0.3"])]
            result = run(deliver(attempt(), hosts, port=busy.port, timeouts=T))
    assert result.status == "success"
    assert result.mx_hostname == "mx2"
    assert len(rx.messages) == 1


def test_greeting_421_everywhere_reports_first_answer():
    with ScriptedServer(greeting=["421-4.3.2 busy", "421 4.3.2 come back later"]) as srv:
        result = send(srv)
    assert result.status == "deferral"
    assert result.text == (
        "Connected to 127.0.0.1 but greeting failed./"
        "Remote host said: 421-4.3.2 busy/421 4.3.2 come back later"
    )


def test_multiline_reply_joined_with_slashes_without_control_characters():
    reply = ["550-5.1.1 first line", "550 5.1.1 second\tline"]
    with ScriptedServer(replies={"RCPT": reply, "DATA": "503 no valid recipients"}) as srv:
        result = send(srv)
    assert result.status == "failure"
    assert result.text.endswith("Remote host said: 550-5.1.1 first line/550 5.1.1 second line")


def test_ehlo_rejected_falls_back_to_helo():
    with ScriptedServer(replies={"EHLO": "500 5.5.1 what?"}) as srv:
        result = send(srv)
    assert result.status == "success"
    assert "HELO out.test" in srv.commands
    # No extensions after HELO: no pipelining, no SIZE.
    assert (
        srv.commands[srv.commands.index("HELO out.test") + 1] == "MAIL FROM:<sender@example.test>"
    )


def test_name_rejected():
    with ScriptedServer(replies={"EHLO": "550 5.7.1 no", "HELO": "550 5.7.1 bad name"}) as srv:
        result = send(srv)
    assert result.status == "failure"
    assert result.text == (
        "Connected to 127.0.0.1 but my name was rejected./Remote host said: 550 5.7.1 bad name"
    )


# -- connection failures -------------------------------------------------------


def test_refused_first_mx_then_next():
    with Receiver("127.0.0.3") as rx:  # nothing listens on 127.0.0.2 at that port
        hosts = [MxHost("mx1", 10, ["127.0.0.2"]), MxHost("mx2", 20, ["127.0.0.3"])]
        result = run(deliver(attempt(), hosts, port=rx.port, timeouts=T))
    assert result.status == "success"
    assert (result.mx_hostname, result.mx_ip) == ("mx2", "127.0.0.3")
    assert rx.messages[0].content == MESSAGE


def test_all_hosts_refused():
    port = unused_port()
    hosts = [MxHost("mx1", 10, ["127.0.0.1", "127.0.0.2"]), MxHost("mx2", 20, ["127.0.0.4"])]
    result = run(deliver(attempt(), hosts, port=port, timeouts=T))
    assert result.status == "deferral"
    assert result.text == NO_CONNECTION_TEXT
    assert result.text == "Sorry, I wasn't able to establish an SMTP connection. (#4.4.1)"
    assert result.smtp_code is None


def test_no_hosts():
    result = run(deliver(attempt(), [], timeouts=T))
    assert (result.status, result.text) == ("deferral", NO_CONNECTION_TEXT)


def test_temporary_sender_rejection_tries_next_host():
    with Receiver("127.0.0.2", mail_reply="451 4.7.1 greylisted") as grey:
        with Receiver("127.0.0.3", grey.port) as rx:
            hosts = [MxHost("mx1", 10, ["127.0.0.2"]), MxHost("mx2", 20, ["127.0.0.3"])]
            result = run(deliver(attempt(), hosts, port=grey.port, timeouts=T))
    assert result.status == "success"
    assert len(rx.messages) == 1


@pytest.mark.parametrize("phase", ["rcpt", "data"])
def test_slow_receiver_times_out(phase):
    with Receiver("127.0.0.2", delay=5.0, delay_at=phase) as rx:
        result = send(rx, timeouts=Timeouts(cap=0.5))
    assert result.status == "deferral"
    assert result.text == "Connected to 127.0.0.2 but connection died. (#4.4.2)"
    assert result.smtp_code is None


@pytest.mark.parametrize("phase", ["rcpt", "data"])
def test_connection_dropped(phase):
    with Receiver("127.0.0.2", drop_at=phase) as rx:
        result = send(rx)
    assert result.status == "deferral"
    assert result.text == "Connected to 127.0.0.2 but connection died. (#4.4.2)"


def test_drop_before_mail_accepted_tries_next_host():
    with Receiver("127.0.0.2", drop_at="mail") as dropper:
        with Receiver("127.0.0.3", dropper.port):
            hosts = [MxHost("mx1", 10, ["127.0.0.2"]), MxHost("mx2", 20, ["127.0.0.3"])]
            result = run(deliver(attempt(), hosts, port=dropper.port, timeouts=T))
    assert result.status == "success"
    assert result.mx_ip == "127.0.0.3"


def test_dead_mx_from_dns_is_skipped():
    with Receiver("127.0.0.3") as rx:
        zone = {
            "example.test": ["MX 10 dead.example.test", "MX 20 live.example.test"],
            "dead.example.test": "A 127.0.0.2",
            "live.example.test": "A 127.0.0.3",
        }
        with DnsServer(zone) as dns:

            async def lookup_and_deliver():
                hosts = await MxResolver(dns.nameservers, timeout=5).hosts("example.test")
                return await deliver(attempt(), hosts, port=rx.port, timeouts=T)

            result = run(lookup_and_deliver())
    assert result.status == "success"
    assert result.mx_hostname == "live.example.test"
    assert len(rx.messages) == 1


# -- pipelining ----------------------------------------------------------------


def test_pipelining_sends_mail_rcpt_data_together():
    with ScriptedServer(hold_after_mail=5.0) as srv:
        result = send(srv)
    assert result.status == "success"
    assert srv.pipelined == [True]
    assert srv.raw_messages == [dot_stuff(MESSAGE)[: -len(b".\r\n")]]
    assert srv.commands[-1] == "QUIT"


def test_no_pipelining_waits_for_each_reply():
    with ScriptedServer(extensions=["8BITMIME"], hold_after_mail=0.3) as srv:
        result = send(srv)
    assert result.status == "success"
    assert srv.pipelined == [False]
    assert srv.commands[1] == "MAIL FROM:<sender@example.test> BODY=8BITMIME"


def test_pipelined_rcpt_rejection_reads_every_reply():
    replies = {"RCPT": "550 5.1.1 unknown", "DATA": "554 5.5.1 no valid recipients"}
    with ScriptedServer(replies=replies) as srv:
        result = send(srv)
    assert result.status == "failure"
    assert result.text == "127.0.0.1 does not like recipient./Remote host said: 550 5.1.1 unknown"
    assert srv.commands[-1] == "QUIT"  # in sync to the end: QUIT was answered


def test_pipelined_data_accepted_despite_rejected_rcpt():
    replies = {"RCPT": "550 5.1.1 unknown"}  # a broken server that still says 354
    with ScriptedServer(replies=replies) as srv:
        result = send(srv)
    assert result.status == "failure"
    assert srv.raw_messages == [b""]  # an empty message, never the real one


def test_pipelining_against_aiosmtpd():
    with Receiver(pipelining=True) as rx:
        assert send(rx).status == "success"
    assert rx.messages[0].content == MESSAGE


# -- kept sessions (reuse_connections) ------------------------------------------


def pool_send_twice(srv, *, keep_first: bool = True) -> tuple[Result, Result, SessionPool]:
    """Two messages for one pool key: the first opens and keeps a session, the second
    goes on the kept session when it can, else on a new connection."""
    host = MxHost("mx.example.test", 10, [srv.host])
    pool = SessionPool()
    key = ("example.test",)

    async def go():
        first = await deliver(attempt(), [host], port=srv.port, timeouts=T,
                              keep=pool.keeper(key, {"max_messages": 10, "idle_timeout": 30}))
        second = await pool.send(key, attempt())
        if second is None:
            second = await deliver(attempt(), [host], port=srv.port, timeouts=T)
        await pool.close_all()
        return first, second

    first, second = run(go())
    return first, second, pool


def test_kept_session_pipelines_rset_with_the_next_transaction():
    with ScriptedServer(hold_after_rset=5.0) as srv:
        first, second, pool = pool_send_twice(srv)
    assert (first.status, second.status) == ("success", "success")
    assert srv.connections == 1 and pool.opened == 1
    assert srv.rset_pipelined == [True]  # RSET, MAIL, RCPT and DATA in one write
    assert len(srv.raw_messages) == 2


def test_kept_session_without_pipelining_waits_for_the_rset_reply():
    with ScriptedServer(extensions=["8BITMIME"], hold_after_rset=0.3) as srv:
        first, second, _ = pool_send_twice(srv)
    assert (first.status, second.status) == ("success", "success")
    assert srv.connections == 1
    assert srv.rset_pipelined == [False]
    assert len(srv.raw_messages) == 2


def test_refused_rset_sends_on_a_new_connection_and_delivers_once():
    with ScriptedServer(replies={"RSET": "421 4.3.0 closing"}) as srv:
        first, second, _ = pool_send_twice(srv)
    assert (first.status, second.status) == ("success", "success")
    assert srv.connections == 2
    assert len(srv.raw_messages) == 2  # the transaction behind the refused RSET never ended


# -- STARTTLS ------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["opportunistic", "required"])
def test_starttls(tls_context, mode):
    with Receiver("127.0.0.2", tls_context=tls_context) as rx:
        result = send(rx, starttls=mode)
    assert result.status == "success"
    assert rx.messages[0].tls
    assert rx.messages[0].content == MESSAGE


def test_starttls_never(tls_context):
    with Receiver(tls_context=tls_context) as rx:
        assert send(rx, starttls="never").status == "success"
    assert not rx.messages[0].tls


def test_opportunistic_without_starttls_goes_plain():
    with Receiver() as rx:
        assert send(rx, starttls="opportunistic").status == "success"
    assert not rx.messages[0].tls


def test_required_tls_not_offered():
    with Receiver("127.0.0.2") as rx:
        result = send(rx, starttls="required")
    assert result.status == "deferral"
    assert result.text == "Connected to 127.0.0.2 but TLS is required and not available. (#4.7.4)"
    assert rx.messages == []


def test_required_tls_moves_on_to_a_host_that_has_it(tls_context):
    with Receiver("127.0.0.2") as plain:
        with Receiver("127.0.0.3", plain.port, tls_context=tls_context) as rx:
            hosts = [MxHost("mx1", 10, ["127.0.0.2"]), MxHost("mx2", 20, ["127.0.0.3"])]
            result = run(deliver(attempt(starttls="required"), hosts, port=plain.port, timeouts=T))
    assert result.status == "success"
    assert plain.messages == []
    assert rx.messages[0].tls


def test_failed_handshake_retries_in_plain_text():
    extensions = ["PIPELINING", "8BITMIME", "STARTTLS"]
    with ScriptedServer(extensions=extensions) as srv:
        result = send(srv, starttls="opportunistic")
        assert result.status == "success"
        assert srv.connections == 2
        assert len(srv.raw_messages) == 1
        assert srv.commands.count("STARTTLS") == 1


def test_failed_handshake_with_required_tls():
    with ScriptedServer(extensions=["STARTTLS"]) as srv:
        result = send(srv, starttls="required")
    assert result.status == "deferral"
    assert "TLS handshake failed" in result.text
    assert srv.raw_messages == []


def test_refused_starttls_with_required_tls():
    with ScriptedServer(extensions=["STARTTLS"], replies={"STARTTLS": "454 4.7.0 no TLS"}) as srv:
        result = send(srv, starttls="required")
    assert result.status == "deferral"
    assert result.text == (
        "Connected to 127.0.0.1 but TLS is required and STARTTLS was refused./"
        "Remote host said: 454 4.7.0 no TLS"
    )
