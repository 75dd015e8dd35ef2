"""The benchmark harness (bench/) keeps working: its quick mode runs end to end.

Engine only, tiny N, no Postfix install and no timing assertions: what is
checked is that every scenario runs, counts exactly, and reports. Plus the
pure pieces whose bugs would silently corrupt figures (count parsing,
Message-ID matching, statistics, RESULTS.md rewriting).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from engine import reachable_tmp

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import report  # noqa: E402
from bench.loadgen import MessageFactory, message_id  # noqa: E402
from bench.run import main  # noqa: E402
from bench.scenarios import NO_EVENTS, Run, match_latencies  # noqa: E402
from bench.sinks import read_smtp_sink_count, smtp_sink_path, smtp_source_path  # noqa: E402
from bench.stampsink import message_id as header_message_id  # noqa: E402


def test_simplemh_scenario_engine_tracks_and_signs(tmp_path: Path) -> None:
    """The engine as the simplemh scenario configures it turns the scenario's message into
    tracked, DKIM-signed mail with List-Unsubscribe and an encoded bounce address."""
    import random
    import smtplib

    from smtp_receivers import Receiver

    from bench import genmsg
    from bench.peers import EnginePeer

    message = genmsg.message_crlf(genmsg.simplemh(genmsg.make_message(random.Random(1), 0)))
    peer = EnginePeer(reachable_tmp(tmp_path), ramdisk_mb=0)
    with Receiver() as rx:
        peer.configure(rx.port, simplemh=True)
        try:
            peer.start()
            with smtplib.SMTP("127.0.0.1", peer.smtp_port, timeout=30) as client:
                client.sendmail(genmsg.SENDER, [genmsg.RCPT], message)
            deadline = time.monotonic() + 60
            while not rx.messages and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            peer.cleanup()
    got = rx.messages[0]
    assert got.content.startswith(b"DKIM-Signature:") and b"d=bench.test" in got.content
    assert b"https://click.bench.test/" in got.content
    assert b"https://bench.test/article/" not in got.content  # every link tracked
    assert b"\r\nList-Unsubscribe:" in got.content
    assert b"X-GreenArrow-MailClass" not in got.content
    assert got.sender != genmsg.SENDER and got.sender.endswith("@bench.test")


def test_quick_mode_engine_only(tmp_path: Path) -> None:
    """Every scenario once, with the Python load generator and the engine's own sink
    (what a machine without Postfix uses): exit 0 means every count was exact."""
    lines: list[str] = []
    rc = main(
        [
            "--quick", "--peer", "none", "--tools", "python",
            "--n", "50", "--cli-n", "10", "--cli-parallel", "2", "--backlog-n", "50", "--latency-n", "50",
            "--settle", "0.3", "--timeout", "60",
            "--work", str(reachable_tmp(tmp_path) / "work"),
            "--results-dir", str(tmp_path / "results"),
        ],
        say=lines.append,
    )
    output = "\n".join(lines)
    assert rc == 0, output
    results = list((tmp_path / "results").glob("*.json"))
    assert len(results) == 1
    data = json.loads(results[0].read_text())
    runs = data["runs"]
    seen = {(r["scenario"], r["variant"]) for r in runs}
    assert {s for s, _ in seen} == {"smtp", "direct", "cli", "backlog", "latency", "simplemh",
                                    "events"}
    assert ("cli", "2 parallel") in seen
    assert all(r["ok"] for r in runs), output
    assert all(r["mta"] in ("engine", "sink", NO_EVENTS) for r in runs)
    # events: every delivery attempt of the run with events reached the HTTP receiver
    (with_events,) = [r for r in runs if r["scenario"] == "events" and r["mta"] == "engine"]
    assert with_events["metrics"]["events_received"] == with_events["n"]
    latency = next(r for r in runs if r["scenario"] == "latency")
    assert latency["metrics"]["p50_ms"] <= latency["metrics"]["p99_ms"]
    backlog = next(r for r in runs if r["scenario"] == "backlog")
    assert backlog["metrics"]["peak_rss_mb"] > 0
    assert "OpenDKIM milter adds" in output
    # the DKIM probe: the engine's signature verified, with the bench's domain and key
    assert "signed a probe message, dkimpy verified it: a=rsa-sha256; c=relaxed/relaxed; " \
        "d=bench.test; s=default; h=from:" in output
    assert "peer: skipped" in output


@pytest.mark.skipif(not (smtp_sink_path() and smtp_source_path()),
                    reason="smtp-source/smtp-sink (Postfix package) not installed")
def test_direct_with_postfix_tools(tmp_path: Path) -> None:
    """The smtp-source -> smtp-sink path, when the Postfix tools are there."""
    lines: list[str] = []
    rc = main(
        ["--quick", "--peer", "none", "--scenarios", "direct", "--n", "50", "--settle", "0.3",
         "--work", str(reachable_tmp(tmp_path) / "work"),
         "--results-dir", str(tmp_path / "results")],
        say=lines.append,
    )
    assert rc == 0, "\n".join(lines)
    assert "smtp-source -> smtp-sink" in "\n".join(lines)


def test_unknown_scenario_is_a_usage_error(tmp_path: Path) -> None:
    assert main(["--scenarios", "nope", "--work", str(tmp_path)], say=lambda _: None) == 2


def test_message_factory_unique_ids_crlf_dot_stuffed() -> None:
    factory = MessageFactory(b"From: a\nMessage-ID: <old@x>\nTo: b\n\n.leading dot\nend", "tok")
    one, two = factory(1), factory(2)
    assert b"Message-ID: <tok.1@bench.test>\r\n" in one
    assert b"Message-ID: <tok.2@bench.test>\r\n" in two
    assert b"<old@x>" not in one
    assert b"\r\n..leading dot\r\n" in one
    assert one.endswith(b"end\r\n.\r\n")
    assert b"\n" not in one.replace(b"\r\n", b"")
    assert header_message_id(one) == message_id("tok", 1).encode()


def test_smtp_sink_count_reads_last_complete_record(tmp_path: Path) -> None:
    path = tmp_path / "count"
    assert read_smtp_sink_count(path) == 0
    path.write_bytes(b"sess=1 quit=0 mesg=1\rsess=2 quit=1 mesg=2\rsess=2 quit=1 mes")
    assert read_smtp_sink_count(path) == 2


def test_match_latencies_finds_missing_duplicate_and_foreign(tmp_path: Path) -> None:
    acks = tmp_path / "acks"
    acks.write_text("0 1000000\n1 2000000\n2 3000000\n")
    stamps = [
        (4_000_000, "<t.0@bench.test>"),
        (5_000_000, "<t.1@bench.test>"),
        (6_000_000, "<t.1@bench.test>"),
        (7_000_000, "<other.5@bench.test>"),
    ]
    latencies, problem = match_latencies(acks, stamps, "t", 3)
    assert sorted(latencies) == [3.0, 3.0]
    assert "1 acknowledged messages never arrived" in problem
    assert "1 duplicate" in problem and "1 arrivals not from this run" in problem


def test_report_ratio_and_results_md_markers(tmp_path: Path) -> None:
    runs = [
        Run("smtp", "v", "engine", r, 10, True, metrics={"msgs_per_s": v})
        for r, v in enumerate((100.0, 200.0, 300.0))
    ] + [
        Run("smtp", "v", "postfix", r, 10, True, metrics={"msgs_per_s": v})
        for r, v in enumerate((400.0, 400.0, 400.0))
    ] + [Run("smtp", "v", "postfix", 9, 10, False, note="sink counted 9 of 10")]
    lines = "\n".join(report.scenario_tables(runs, "postfix"))
    assert "100 / **200** / 300" in lines
    assert "0.50x" in lines
    assert "postfix 3/4" in lines
    assert report.failures(runs) == ["- smtp/v postfix rep 9: sink counted 9 of 10"]
    md = tmp_path / "RESULTS.md"
    report.update_results_md(md, "first")
    md.write_text(md.read_text() + "\n## Where the time goes\nhand-written\n")
    report.update_results_md(md, "second")
    text = md.read_text()
    assert "second" in text and "first" not in text and "hand-written" in text


def test_dkim_probe_check(tmp_path: Path) -> None:
    """The simplemh probe passes a message signed with the bench key, and names what is
    wrong with an unsigned, a changed or a twice-signed one."""
    from bench.dkim_probe import check
    from bench.peers import dkim_key
    from greenarrow.lib.dkim.signing import DkimKeys, DkimSigner

    dkim_key(tmp_path / "control" / "dkim" / "bench.test" / "default.pem", tmp_path)
    signer = DkimSigner(DkimKeys.from_control(tmp_path / "control"))
    message = (b"From: News <news@bench.test>\r\nTo: <r@example.test>\r\nSubject: probe\r\n\r\n"
               b"body\r\n")
    signed = signer.sign(message).message
    result = check(signed, tmp_path)
    assert result.problem == "" and "d=bench.test; s=default; h=from:to:subject:from:subject" \
        in result.tags
    assert check(message, tmp_path).problem == "0 DKIM-Signature headers, expected 1"
    assert "does not verify" in check(signed.replace(b"body", b"bodY"), tmp_path).problem \
        or "body hash" in check(signed.replace(b"body", b"bodY"), tmp_path).problem
    assert check(signer.sign(signed).message, tmp_path).problem.startswith("2 DKIM-Signature")


def test_opendkim_config_signs_like_the_engine(tmp_path: Path) -> None:
    from bench.peers import OpenDkim
    from greenarrow.lib.dkim.signing import SIGNED_HEADERS

    spool = tmp_path / "spool"
    config = OpenDkim(tmp_path, spool).config()
    assert "Mode s\n" in config and "Canonicalization relaxed/relaxed\n" in config
    assert "Domain bench.test\n" in config and "Selector default\n" in config
    assert "SignHeaders " + ",".join(h.decode() for h in SIGNED_HEADERS) + "\n" in config
    assert "OversignHeaders from,subject,date\n" in config
    assert f"Socket local:{spool}/opendkim/opendkim.sock\n" in config
    key = spool / "opendkim" / "bench-default.private"
    assert key.read_bytes() == (tmp_path / "dkim-rsa2048.pem").read_bytes()
    assert key.stat().st_mode & 0o077 == 0
