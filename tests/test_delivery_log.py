"""The processed delivery log: format, rotation and streaming reads."""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import pytest

from greenarrow.lib.core import delivery_log, rotating_log
from greenarrow.lib.core.delivery_log import (
    FIELDS,
    STATUSES,
    DeliveryLogWriter,
    format_line,
    iter_entries,
    iter_records,
    parse_line,
    rotated_files,
)


def record(ts: float, **extra: object) -> dict[str, object]:
    base: dict[str, object] = {
        "timestamp": ts,
        "channel": "remote",
        "status": "success",
        "is_retry": False,
        "msguid": f"m{ts}",
        "sender": "bounce@example.com",
        "email": "user@example.org",
        "sendid": "s1",
        "listid": "l1",
    }
    base.update(extra)
    return base


def test_fields_order_and_count() -> None:
    assert len(FIELDS) == 26
    assert FIELDS[:5] == ("timestamp", "channel", "status", "is_retry", "msguid")
    assert FIELDS[16] == "throttleid" and FIELDS[17] == "email"
    assert FIELDS[-1] == "instanceid"
    assert STATUSES == ("success", "failure", "failure_toolong", "deferral", "connmaxout")


def test_format_parse_round_trip() -> None:
    full = {name: f"v-{name}" for name in FIELDS}
    full["timestamp"] = "1732290000.123"
    line = format_line(full)
    assert line.endswith("\n") and line.count("\t") == 25
    assert parse_line(line) == full
    assert format_line(parse_line(line)) == line


def test_format_canonical_values_and_missing_keys() -> None:
    line = format_line({"timestamp": 1732290000.1234, "is_retry": True, "status": "deferral"})
    columns = line[:-1].split("\t")
    assert len(columns) == 26
    assert columns[0] == "1732290000.123"
    assert columns[2] == "deferral"
    assert columns[3] == "1"
    assert columns[4:] == [""] * 22
    assert format_line({"timestamp": 5, "is_retry": False, "bounce_code": None})[:-1].split("\t")[
        :4
    ] == ["5.000", "", "", "0"]


def test_tab_and_newlines_inside_fields_are_neutralised() -> None:
    line = format_line(record(1.0, message="250 ok\tqueued\r\nas 123\nbye", sender="a\tb"))
    assert line.count("\n") == 1 and line.count("\t") == 25 and "\r" not in line
    parsed = parse_line(line)
    assert parsed["message"] == "250 ok queued  as 123 bye"
    assert parsed["sender"] == "a b"


def test_parse_tolerates_extra_columns() -> None:
    line = format_line(record(1.0)).rstrip("\n") + "\tnew-field\tanother\n"
    parsed = parse_line(line)
    assert list(parsed) == list(FIELDS)
    assert parsed["instanceid"] == ""


def test_parse_short_line_names_what_is_missing() -> None:
    with pytest.raises(
        ValueError, match=r"3 columns, expected 26 \(missing: is_retry, msguid, sender"
    ):
        parse_line("1.0\tremote\tsuccess\n")
    with pytest.raises(ValueError, match="bad timestamp"):
        parse_line("\t".join(["yesterday"] * 26))


def test_writer_appends_and_creates_directory(tmp_path: Path) -> None:
    directory = tmp_path / "log" / "delivery" / "ram"
    with DeliveryLogWriter(directory) as writer:
        writer.write([record(1.0), record(2.0)])
        writer.write([])
        writer.write([record(3.0)])
    text = (directory / "current").read_text()
    assert text.count("\n") == 3
    assert [r["timestamp"] for r in iter_records(directory, None, None)] == [
        "1.000",
        "2.000",
        "3.000",
    ]
    # Reopening appends rather than truncating.
    with DeliveryLogWriter(directory) as writer:
        writer.write([record(4.0)])
    assert len(list(iter_records(directory, None, None))) == 4


def test_writer_terminates_torn_line_left_by_a_crash(tmp_path: Path) -> None:
    (tmp_path / "current").write_text(format_line(record(1.0)) + "1.5\tremote\tsucc")
    with DeliveryLogWriter(tmp_path) as writer:
        writer.write([record(2.0)])
    lines = (tmp_path / "current").read_text().splitlines()
    assert lines[1] == "1.5\tremote\tsucc"
    assert [r["timestamp"] for r in iter_records(tmp_path, None, None)] == ["1.000", "2.000"]


def test_rotation_by_size_keeps_newest_in_order(tmp_path: Path) -> None:
    line_size = len(format_line(record(1000.0)).encode())
    writer = DeliveryLogWriter(tmp_path, max_bytes=line_size * 3, keep=2)
    for i in range(20):
        writer.write([record(1000.0 + i)])
        assert (tmp_path / "current").stat().st_size <= line_size * 3
    writer.close()
    writer.close()  # harmless twice
    rotated = rotated_files(tmp_path)
    assert len(rotated) == 2
    names = [path.name for _, path in rotated]
    assert names == sorted(names)
    assert all(name.startswith("@") and name.endswith(".s") for name in names)
    # 20 records, 3 per file: 6 rotations, 2 kept (records 12-17), current has 18-19.
    stamps = [float(r["timestamp"]) for r in iter_records(tmp_path, None, None)]
    assert stamps == [1000.0 + i for i in range(12, 20)]


def test_rotated_names_are_end_times(tmp_path: Path) -> None:
    before = time.time_ns()
    with DeliveryLogWriter(tmp_path, max_bytes=10, keep=5) as writer:
        writer.write([record(1.0)])
        writer.write([record(2.0)])
        writer.write([record(3.0)])
    after = time.time_ns()
    stamps = [ns for ns, _ in rotated_files(tmp_path)]
    assert len(stamps) == 2 and stamps[0] < stamps[1]
    assert all(before <= ns <= after for ns in stamps)


def test_a_batch_bigger_than_max_bytes_goes_in_whole(tmp_path: Path) -> None:
    with DeliveryLogWriter(tmp_path, max_bytes=50, keep=5) as writer:
        writer.write([record(float(i)) for i in range(5)])
    assert rotated_files(tmp_path) == []
    assert len(list(iter_records(tmp_path, None, None))) == 5


def write_rotated(directory: Path, name_ns: int, stamps: list[float]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / rotating_log.rotated_name(name_ns)
    path.write_text("".join(format_line(record(ts)) for ts in stamps))


def test_iter_records_across_rotated_files_with_range(tmp_path: Path) -> None:
    write_rotated(tmp_path, 20 * 10**9, [10.0, 15.0, 20.0])
    write_rotated(tmp_path, 40 * 10**9, [25.0, 30.0, 40.0])
    (tmp_path / "current").write_text("".join(format_line(record(ts)) for ts in [45.0, 50.0]))

    def stamps(start: float | None, end: float | None) -> list[float]:
        return [float(r["timestamp"]) for r in iter_records(tmp_path, start, end)]

    assert stamps(None, None) == [10, 15, 20, 25, 30, 40, 45, 50]
    assert stamps(15, 30) == [15, 20, 25, 30]  # bounds inclusive
    assert stamps(41, None) == [45, 50]
    assert stamps(None, 12) == [10]
    assert stamps(100, None) == []
    assert list(iter_records(tmp_path / "missing", None, None)) == []


def test_iter_skips_rotated_files_that_end_before_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_rotated(tmp_path, 20 * 10**9, [10.0])
    write_rotated(tmp_path, 40 * 10**9, [30.0])
    opened: list[str] = []
    real_open = open

    def spy(path, *args, **kwargs):  # noqa: ANN001, ANN202
        opened.append(Path(path).name)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(delivery_log, "open", spy, raising=False)
    assert [r["timestamp"] for r in iter_records(tmp_path, 25, None)] == ["30.000"]
    assert rotating_log.rotated_name(20 * 10**9) not in opened
    assert rotating_log.rotated_name(40 * 10**9) in opened


def test_iter_stops_at_files_begun_long_after_end(tmp_path: Path) -> None:
    delay = delivery_log.MAX_WRITE_DELAY
    write_rotated(tmp_path, 20 * 10**9, [10.0])
    # Everything after this file was written more than MAX_WRITE_DELAY after
    # end=15, so even a (bogus) old timestamp there is not read.
    write_rotated(tmp_path, int((16 + delay) * 10**9), [12.0])
    write_rotated(tmp_path, int((17 + delay) * 10**9), [13.0])
    (tmp_path / "current").write_text(format_line(record(14.0)))
    assert [r["timestamp"] for r in iter_records(tmp_path, None, 15)] == ["10.000", "12.000"]


def test_iter_skips_bad_lines_and_unterminated_tail_of_current(tmp_path: Path) -> None:
    good = format_line(record(1.0))
    (tmp_path / "current").write_text(
        good
        + "garbage\n"
        + "\n"
        + "2.0\tshort\n"
        + good.replace("1.000", "3.000")
        + format_line(record(4.0))[:-5]
    )
    assert [r["timestamp"] for r in iter_records(tmp_path, None, None)] == ["1.000", "3.000"]


def test_iter_entries_yields_raw_lines_as_stored(tmp_path: Path) -> None:
    raw = format_line(record(1.0)).rstrip("\n") + "\textra\n"
    (tmp_path / "current").write_bytes(raw.encode())
    [(line, parsed)] = list(iter_entries(tmp_path, None, None))
    assert line == raw.encode()
    assert parsed["timestamp"] == "1.000"


def test_rotation_during_a_read_neither_loses_nor_repeats(tmp_path: Path) -> None:
    line_size = len(format_line(record(1000.0)).encode())
    writer = DeliveryLogWriter(tmp_path, max_bytes=line_size * 2, keep=10)
    for i in range(4):
        writer.write([record(1000.0 + i)])
    reader = iter_records(tmp_path, None, None)
    first = next(reader)  # `current` is now held open
    writer.write([record(1004.0)])  # rotates: the held `current` becomes @...s
    rest = list(reader)
    writer.close()
    stamps = [float(r["timestamp"]) for r in [first, *rest]]
    assert stamps == [1000.0, 1001.0, 1002.0, 1003.0]


def test_iter_records_memory_is_flat(tmp_path: Path) -> None:
    """200k lines (~40 MB over several files) read with a small, bounded peak."""
    with DeliveryLogWriter(tmp_path, max_bytes=4 * 1024 * 1024, keep=100) as writer:
        batch = []
        for i in range(200_000):
            batch.append(record(1_700_000_000.0 + i, message="250 2.0.0 Ok: queued as " + "x" * 80))
            if len(batch) == 5000:
                writer.write(batch)
                batch = []
    assert len(rotated_files(tmp_path)) >= 5
    tracemalloc.start()
    try:
        count = 0
        for _ in iter_records(tmp_path, None, None):
            count += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 200_000
    assert peak < 2 * 1024 * 1024
