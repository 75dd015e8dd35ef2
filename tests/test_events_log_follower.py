"""FolderReader: reading a rotated log folder from a saved position."""

from __future__ import annotations

from greenarrow.lib.events.log_follower import FolderReader, Position, bytes_behind
from greenarrow.lib.rotating_log import RotatingLog, rotated_files


def lines(n: int, start: int = 0) -> bytes:
    return b"".join(b"line %06d\n" % i for i in range(start, start + n))


def test_reads_across_rotations_in_order_and_only_whole_lines(tmp_path):
    log = RotatingLog(tmp_path, max_bytes=120, keep=100)
    for i in range(0, 40, 4):
        log.write_bytes(lines(4, i))
    log.write_bytes(b"torn, no newline yet")
    assert len(rotated_files(tmp_path)) >= 3
    reader = FolderReader(tmp_path, max_bytes=50)
    got, position = [], None
    for _ in range(100):
        chunk = reader.read(position)
        got += chunk.lines
        if chunk.position == position and not chunk.lines:
            break
        position = chunk.position
    assert b"".join(got) == lines(40)
    assert position is not None and position.file_name == "current"
    assert bytes_behind(tmp_path, position) == len(b"torn, no newline yet")
    log.write_bytes(b"\n")
    assert reader.read(position).lines == [b"torn, no newline yet\n"]
    log.close()


def test_a_file_changed_under_the_same_inode_is_not_taken_for_the_saved_one(tmp_path):
    log = RotatingLog(tmp_path)
    log.write_bytes(lines(10))
    log.close()
    reader = FolderReader(tmp_path)
    position = reader.read(None).position
    assert position is not None and position.byte_offset == len(lines(10))
    with open(tmp_path / "current", "r+b") as handle:  # same inode, other content
        handle.write(lines(12, 500))
    chunk = reader.read(position)
    assert chunk.lost and "is gone or changed" in chunk.lost
    assert b"".join(chunk.lines) == lines(12, 500)


def test_a_rotated_name_must_match(tmp_path):
    log = RotatingLog(tmp_path, max_bytes=60, keep=100)
    for i in range(0, 12, 3):
        log.write_bytes(lines(3, i))
    log.close()
    first = rotated_files(tmp_path)[0][1]
    reader = FolderReader(tmp_path)
    position = reader.read(None).position
    assert position is not None
    moved = Position(first.name, position.inode, position.head_sha256, position.byte_offset)
    assert reader.read(moved).lost  # an inode seen under another rotated name is not it
