"""`hvmail_report`: time ranges, filters and the three output forms."""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from greenarrow.bin.hvmail_report import main
from greenarrow.lib.core.delivery_log import DeliveryLogWriter, format_line
from greenarrow.lib.core.paths import Root
from greenarrow.lib.ops.delivery_report import (
    Filter,
    Summary,
    parse_period,
    parse_time,
    resolve_range,
)

NOW = time.time()


def rec(ts: float, **fields: object) -> dict[str, object]:
    base: dict[str, object] = {
        "timestamp": ts,
        "channel": "remote",
        "status": "success",
        "is_retry": 0,
        "msguid": f"m{ts}",
        "sender": "bounces@news.example.com",
        "email": "alice@example.org",
        "sendid": "send1",
        "listid": "list1",
        "message": "1.2.3.4 accepted message. Remote host said: 250 ok",
    }
    base.update(fields)
    return base


RAM = [
    rec(NOW - 7200, status="success", sendid="send1"),
    rec(NOW - 3000, status="deferral", is_retry=1, sendid="send1", email="bob@Example.NET"),
    rec(NOW - 1800, status="failure", sendid="SEND2", listid="List2", email="carol@example.org"),
    rec(NOW - 600, status="success", sendid="send2", sender="other@corp.example"),
    rec(NOW - 60, status="connmaxout", sendid="", email="dave@example.com"),
]
DISK = [
    rec(NOW - 5000, status="failure_toolong", sendid="send3", email="erin@example.org"),
    rec(NOW - 100, status="success", sendid="send1", email="frank@example.org"),
]


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Root:
    monkeypatch.setenv("HVMAIL_ROOT", str(tmp_path))
    root = Root(tmp_path)
    for queue, records in (("ram", RAM), ("disk", DISK)):
        with DeliveryLogWriter(root.delivery_log(queue)) as writer:
            writer.write(records)
    return root


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def report(*args: str) -> dict:
    result = run("--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def msguids(*args: str) -> list[str]:
    result = run("--processed-logfile", *args)
    assert result.exit_code == 0, result.output
    return [line.split("\t")[4] for line in result.output.splitlines()]


def ids(records: list[dict[str, object]]) -> list[str]:
    return [str(r["msguid"]) for r in records]


# --- time arguments ---------------------------------------------------------


def test_parse_time_forms() -> None:
    now = 1_700_000_000.0
    assert parse_time("1700000123", now) == 1700000123.0
    assert parse_time("1700000123.5", now) == 1700000123.5
    assert parse_time("-2h", now) == now - 7200
    assert parse_time("-30m", now) == now - 1800
    assert parse_time("now", now) == now
    assert parse_time("2024-11-22", now) == datetime(2024, 11, 22).timestamp()
    assert parse_time("2024-11-22 15:04", now) == datetime(2024, 11, 22, 15, 4).timestamp()
    assert parse_time("2024-11-22 15:04:05", now) == datetime(2024, 11, 22, 15, 4, 5).timestamp()
    for bad in ("yesterday", "2024-13-01", "-2", "2h"):
        with pytest.raises(ValueError, match="invalid time"):
            parse_time(bad, now)


def test_parse_period_forms() -> None:
    assert parse_period("90s") == 90
    assert parse_period("30m") == 1800
    assert parse_period("2h") == 7200
    assert parse_period("1d") == 86400
    for bad in ("90", "-2h", "2x", ""):
        with pytest.raises(ValueError, match="invalid period"):
            parse_period(bad)


def test_resolve_range() -> None:
    assert resolve_range(None, None, None, now=1000.0) == (None, None)
    assert resolve_range(None, None, "90s", now=1000.0) == (910.0, 1000.0)
    assert resolve_range("100", None, None, now=1000.0) == (100.0, None)
    assert resolve_range(None, "-10s", None, now=1000.0) == (None, 990.0)
    with pytest.raises(ValueError, match="cannot be combined"):
        resolve_range("100", None, "1h", now=1000.0)
    with pytest.raises(ValueError, match="start time is after the end time"):
        resolve_range("200", "100", None, now=1000.0)


# --- command line: ranges and errors -----------------------------------------


def test_queue_is_required(root: Root) -> None:
    result = CliRunner().invoke(main, [])
    assert result.exit_code == 2
    assert "--queue" in result.output


def test_last_conflicts_with_start_and_end(root: Root) -> None:
    for args in (["-l", "1h", "-s", "-2h"], ["-l", "1h", "-e", "now"]):
        result = CliRunner().invoke(main, ["-q", "ram", *args])
        assert result.exit_code == 2
        assert "-l/--last cannot be combined with -s/--start or -e/--end" in result.output


def test_bad_time_and_status_are_usage_errors(root: Root) -> None:
    result = CliRunner().invoke(main, ["-q", "ram", "-s", "last tuesday"])
    assert result.exit_code == 2 and "invalid time" in result.output
    result = CliRunner().invoke(main, ["-q", "ram", "-l", "5"])
    assert result.exit_code == 2 and "invalid period" in result.output
    result = CliRunner().invoke(main, ["-q", "ram", "--status", "bounced"])
    assert result.exit_code == 2
    result = CliRunner().invoke(main, ["-q", "nowhere"])
    assert result.exit_code == 2


def test_time_range_options(root: Root, monkeypatch: pytest.MonkeyPatch) -> None:
    # Relative times count from "now": pin it to when the records were made, so a
    # long test run does not move the boundaries under the records.
    from greenarrow.lib.ops import delivery_report

    monkeypatch.setattr(delivery_report.time, "time", lambda: NOW + 1)
    assert msguids("-q", "ram") == ids(RAM)
    assert msguids("-q", "ram", "-l", "20m") == ids(RAM[3:])
    assert msguids("-q", "ram", "-s", "-1h", "-e", "-5m") == ids(RAM[1:4])
    assert msguids("-q", "ram", "-e", str(NOW - 2999)) == ids(RAM[:2])
    assert msguids("-q", "ram", "-s", "2000-01-01", "-e", "2000-01-02 12:00") == []


def test_queue_all_merges_by_time(root: Root) -> None:
    both = sorted(RAM + DISK, key=lambda r: float(r["timestamp"]))  # type: ignore[arg-type]
    assert msguids("-q", "all") == ids(both)
    assert msguids("-q", "disk") == ids(DISK)
    assert msguids("-q", "bounce") == []


# --- filters -----------------------------------------------------------------


def test_sender_wildcards_case_insensitive(root: Root) -> None:
    assert msguids("-q", "ram", "-f", "*@NEWS.example.com") == ids(RAM[:3] + RAM[4:])
    assert msguids("-q", "ram", "-S", "other@corp.example") == ids(RAM[3:4])
    assert msguids("-q", "ram", "--sender", "o?her@*") == ids(RAM[3:4])
    assert msguids("-q", "ram", "-f", "other@") == []  # no implicit prefix match


def test_recipient_wildcards_and_or_within_option(root: Root) -> None:
    assert msguids("-q", "ram", "-r", "*@example.net") == ids(RAM[1:2])
    assert msguids("-q", "ram", "-r", "BOB@*", "-r", "carol@example.org") == ids(RAM[1:3])
    assert msguids("-q", "ram", "-r", "?a*@example.*") == ids(RAM[2:3] + RAM[4:5])


def test_sendid_listid_case_insensitive(root: Root) -> None:
    assert msguids("-q", "ram", "--sendid", "send2") == ids(RAM[2:4])
    assert msguids("-q", "ram", "--sendid", "SEND1", "--sendid", "send2") == ids(RAM[:4])
    assert msguids("-q", "ram", "--listid", "LIST2") == ids(RAM[2:3])
    assert msguids("-q", "ram", "--sendid", "send") == []


def test_status_filter_or(root: Root) -> None:
    assert msguids("-q", "ram", "--status", "failure") == ids(RAM[2:3])
    assert msguids("-q", "ram", "--status", "success", "--status", "connmaxout") == ids(
        [RAM[0], RAM[3], RAM[4]]
    )


def test_different_options_and_together(root: Root) -> None:
    assert msguids("-q", "ram", "--sendid", "send2", "--status", "success") == ids(RAM[3:4])
    assert msguids("-q", "ram", "--sendid", "send1", "-r", "alice@*") == ids(RAM[0:1])
    assert msguids("-q", "ram", "--sendid", "send1", "-r", "carol@*") == []
    assert msguids("-q", "all", "--sendid", "send1", "-l", "1h") == ids([RAM[1], DISK[1]])


def test_filter_treats_brackets_literally() -> None:
    record = {"status": "success", "sendid": "", "listid": "", "sender": "[x]@a", "email": "b"}
    assert Filter(senders=["[x]@*"])(record)
    assert not Filter(senders=["x@*"])(record)


# --- outputs -----------------------------------------------------------------


def test_processed_logfile_prints_raw_lines(root: Root) -> None:
    current = Path(root.delivery_log("ram")) / "current"
    extra = format_line(rec(NOW - 30, msguid="newer")).rstrip("\n") + "\tfuture-column\n"
    with current.open("a") as handle:
        handle.write(extra)
    result = run("-q", "ram", "--processed-logfile")
    assert result.exit_code == 0
    assert result.output == current.read_text()
    assert result.output.endswith("\tfuture-column\n")


def test_json_shape(root: Root) -> None:
    data = report("-q", "ram")
    assert data["attempts"] == 5
    assert data["by_status"] == {
        "success": 2,
        "failure": 1,
        "failure_toolong": 0,
        "deferral": 1,
        "connmaxout": 1,
    }
    # SendIDs group case-insensitively, first spelling kept, most attempts first.
    assert list(data["by_sendid"]) == ["SEND2", "send1", ""]
    assert data["by_sendid"]["send1"] == {
        "success": 1,
        "failure": 0,
        "failure_toolong": 0,
        "deferral": 1,
        "connmaxout": 0,
    }
    assert data["by_sendid"]["SEND2"]["failure"] == 1
    assert data["start"] is None and data["end"] is None
    assert data["first"] == pytest.approx(NOW - 7200, abs=0.001)
    assert data["last"] == pytest.approx(NOW - 60, abs=0.001)

    ranged = report("-q", "ram", "-s", "1000", "-e", "2000")
    assert ranged["start"] == 1000.0 and ranged["end"] == 2000.0
    assert ranged["attempts"] == 0 and ranged["by_sendid"] == {}


def test_human_summary(root: Root) -> None:
    result = run("-q", "all", "-l", "3h")
    assert result.exit_code == 0
    out = result.output
    assert "Time range: " in out and "Total attempts: 7" in out
    lines = out.splitlines()
    status_header = lines.index(next(line for line in lines if line.startswith("Status")))
    assert lines[status_header + 2].split() == ["success", "3"]
    sendid_header = next(i for i, line in enumerate(lines) if line.startswith("SendID"))
    assert lines[sendid_header].split() == [
        "SendID",
        "Attempts",
        "success",
        "failure",
        "deferral",
        "connmaxout",
        "failure_toolong",
    ]
    rows = [line.split() for line in lines[sendid_header + 2 :]]
    assert rows == [
        ["send1", "3", "2", "0", "1", "0", "0"],
        ["SEND2", "2", "1", "1", "0", "0", "0"],
        ["(none)", "1", "0", "0", "0", "1", "0"],
        ["send3", "1", "0", "0", "0", "0", "1"],
    ]


def test_nothing_matches_is_a_zero_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HVMAIL_ROOT", str(tmp_path))  # no logs at all
    result = run("-q", "all")
    assert result.exit_code == 0
    assert "Total attempts: 0" in result.output
    assert report("-q", "ram")["attempts"] == 0
    assert run("-q", "ram", "--processed-logfile").output == ""


def test_summary_memory_grows_only_with_sendids() -> None:
    summary = Summary(None, None, ["ram"])
    for i in range(10_000):
        summary.add({"timestamp": str(i), "status": "success", "sendid": f"s{i % 3}"})
    assert summary.attempts == 10_000
    assert len(summary.by_sendid()) == 3
