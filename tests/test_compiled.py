"""The compiled extension `greenarrow.pyx.queue_scan` and its API.

The module must be the C extension built from pyx/queue_scan.pyx, not a
Python fallback; `scan` lists a queue folder by entry file names
`<entry id>.<attempts>.<due>` and `parse_name` parses one name.
"""

from __future__ import annotations

import importlib.machinery
import os
from array import array
from pathlib import Path

import pytest

from greenarrow.lib.queue import entry as queue_entry
from greenarrow.pyx import queue_scan


def test_is_compiled_extension() -> None:
    """queue_scan is loaded from a shared object by the extension loader, not from .py/.pyx."""
    path = queue_scan.__file__
    assert path.endswith(".so")
    assert not path.endswith((".py", ".pyx", ".pyc"))
    assert isinstance(queue_scan.__loader__, importlib.machinery.ExtensionFileLoader)
    assert isinstance(queue_scan.__spec__.loader, importlib.machinery.ExtensionFileLoader)
    assert any(path.endswith(suffix) for suffix in importlib.machinery.EXTENSION_SUFFIXES)
    assert type(queue_scan.scan).__name__ in ("cython_function_or_method", "builtin_function_or_method")


def touch(folder: Path, *names: str) -> None:
    for name in names:
        (folder / name).write_bytes(b"")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    d = tmp_path / "entries"
    d.mkdir()
    return d


def test_scan_valid_entries(folder: Path) -> None:
    """Valid names come back with their attempts and due, as parallel sequences."""
    names = {
        "1a2b-3c-0-0.0.0": (0, 0),
        "1a2b-3c-0-1.3.1700000000": (3, 1700000000),
        "x.y.z-7.12.99": (12, 99),  # the id may hold dots: the last two fields are parsed
        "m-0.999999999.999999999999999999": (999999999, 999999999999999999),
    }
    touch(folder, *names)
    result = queue_scan.scan(str(folder))
    assert len(result) == len(names)
    got = {n: (a, d) for n, a, d in result}
    assert got == names
    assert isinstance(result.attempts, array) and result.attempts.typecode == "l"
    assert isinstance(result.due, array) and result.due.typecode == "q"
    assert list(zip(result.names, result.attempts, result.due, strict=True)) == list(result)
    assert result.strays == []


@pytest.mark.parametrize(
    "stray",
    [
        "abc",  # no dots
        "abc.1",  # one field only
        "abc.1.",  # empty due
        "abc..5",  # empty attempts
        "abc.x.5",
        "abc.1.5x",
        "abc.-1.5",
        "1.5",  # no id
        "id.12345678901.5",  # attempts over 10 digits
        "id.1.12345678901234567890",  # due over 19 digits
        "tmp.file~",
    ],
)
def test_scan_strays(folder: Path, stray: str) -> None:
    """Names that are not `<id>.<attempts>.<due>` go to strays, not to the entries."""
    touch(folder, "good-0.0.0", stray)
    result = queue_scan.scan(str(folder))
    assert result.names == ["good-0.0.0"]
    assert result.strays == [stray]


def test_scan_skips_dot_files(folder: Path) -> None:
    """Dot-files (editor droppings, `.` and `..`) are neither entries nor strays."""
    touch(folder, ".hidden", ".x.1.2", "e-0.1.2")
    (folder / ".subdir").mkdir()
    result = queue_scan.scan(str(folder))
    assert result.names == ["e-0.1.2"]
    assert result.strays == []


def test_scan_non_utf8_stray(folder: Path) -> None:
    """A name that is not UTF-8 is reported as a stray without failing the scan."""
    (folder / "e-0.0.0").write_bytes(b"")
    open(os.path.join(os.fsencode(folder), b"bad\xff.1.x"), "wb").close()
    result = queue_scan.scan(str(folder))
    assert result.names == ["e-0.0.0"]
    assert len(result.strays) == 1 and result.strays[0].startswith("bad")


def test_scan_empty_and_bytes_path(folder: Path) -> None:
    """An empty folder scans to nothing; the path may be given as bytes."""
    result = queue_scan.scan(str(folder))
    assert (result.names, list(result.attempts), list(result.due), result.strays) == ([], [], [], [])
    touch(folder, "a-0.2.3")
    assert queue_scan.scan(bytes(folder)).names == ["a-0.2.3"]


def test_scan_missing_folder(tmp_path: Path) -> None:
    """A missing folder raises OSError (ENOENT) naming it."""
    missing = tmp_path / "nope"
    with pytest.raises(OSError) as e:
        queue_scan.scan(str(missing))
    assert isinstance(e.value, FileNotFoundError)
    assert str(missing) in str(e.value)


def test_scan_not_a_folder(tmp_path: Path) -> None:
    """A path that is a file, not a folder, raises OSError too."""
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(OSError):
        queue_scan.scan(str(f))


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("abc-0.0.0", ("abc-0", 0, 0)),
        ("66a-1f-2-7.4.1700000123", ("66a-1f-2-7", 4, 1700000123)),
        ("a.b.c.1.2", ("a.b.c", 1, 2)),
        ("abc", None),
        ("abc.1", None),
        ("abc.1.x", None),
        ("abc..2", None),
        ("abc.1.", None),
        (".1.2", None),
        ("", None),
    ],
)
def test_parse_name(name: str, expected: tuple[str, int, int] | None) -> None:
    """parse_name gives (entry id, attempts, due), or None for a name that is not an entry."""
    assert queue_scan.parse_name(name) == expected


def test_parse_name_agrees_with_queue_entry() -> None:
    """parse_name reads the names queue_entry writes, as queue_entry.split_name does."""
    for entry_id, attempts, due in [("66a-1f-2-0", 0, 0), ("66a-1f-2-19", 7, 1900000000)]:
        name = queue_entry.entry_name(entry_id, attempts, due)
        assert queue_scan.parse_name(name) == queue_entry.split_name(name) == (entry_id, attempts, due)


def test_scan_many_entries(folder: Path) -> None:
    """A folder of 20,000 entries (and a few strays) is scanned whole: every name, attempts
    and due comes back exactly once."""
    expected = {}
    for i in range(20_000):
        name = f"66a{i:x}-1f-0-{i % 7}.{i % 13}.{1_700_000_000 + i}"
        expected[name] = (i % 13, 1_700_000_000 + i)
    touch(folder, *expected)
    touch(folder, "stray-one", "stray.two")
    result = queue_scan.scan(str(folder))
    assert len(result) == 20_000
    assert len(set(result.names)) == 20_000
    assert {n: (a, d) for n, a, d in result} == expected
    assert sorted(result.strays) == ["stray-one", "stray.two"]
