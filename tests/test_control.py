"""Control files (`greenarrow.lib.config.control`): one setting per file, typed, with defaults.

Each kind is read from a file in a temporary control folder; a missing file
gives the default (some derived from other settings); a bad value is a
ControlError that names the file and the value.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from greenarrow.lib.config import control
from greenarrow.lib.config.control import ControlError, ControlSpec


@pytest.fixture
def cdir(tmp_path: Path) -> Path:
    d = tmp_path / "control"
    d.mkdir()
    return d


def put(cdir: Path, name: str, text: str | bytes) -> Path:
    path = cdir / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


# --------------------------------------------------------------------------- kinds


def test_text(cdir: Path) -> None:
    """A text file gives its first line that is not blank or a comment, stripped."""
    put(cdir, "me", "# this server\n\n  mx1.example.com  \nignored.example\n")
    assert control.read(cdir, "me") == "mx1.example.com"


@pytest.mark.parametrize(("text", "value"), [("7\n", 7), ("  42  ", 42), ("# c\n0\n", 0), ("1000000", 1000000)])
def test_int(cdir: Path, text: str, value: int) -> None:
    """An int file gives a whole number."""
    put(cdir, "concurrencyremote", text)
    assert control.read(cdir, "concurrencyremote") == value


@pytest.mark.parametrize(("text", "value"), [("0.5\n", 0.5), ("2", 2.0), ("1e-3", 0.001)])
def test_float(cdir: Path, text: str, value: float) -> None:
    """A float file gives a number."""
    put(cdir, "queue.retry.scale", text)
    assert control.read(cdir, "queue.retry.scale") == value


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("5120", 5120),
        ("512b", 512),
        ("200k", 200 * 1024),
        ("200KB", 200 * 1024),
        ("16m", 16 * 1024 * 1024),
        ("16M\n", 16 * 1024 * 1024),
        ("3mb", 3 * 1024 * 1024),
        ("1g", 1024**3),
        ("2GB", 2 * 1024**3),
        ("0", 0),
    ],
)
def test_size(cdir: Path, text: str, value: int) -> None:
    """A size file takes bytes or a k/m/g (kb/mb/gb) unit, any case, in powers of 1024."""
    put(cdir, "databytes", text)
    assert control.read(cdir, "databytes") == value


def test_parse_size_direct() -> None:
    """parse_size is the same rule, usable on its own."""
    assert control.parse_size(" 16m ") == 16 * 1024 * 1024
    for bad in ("", "m", "16x", "1.5m", "-1", "16 m", "k16"):
        with pytest.raises(ValueError):
            control.parse_size(bad)


@pytest.fixture
def bool_spec(monkeypatch: pytest.MonkeyPatch) -> str:
    """No shipped control file is a bool yet: register one for the test."""
    name = "test.flag"
    monkeypatch.setitem(control.SPECS, name, ControlSpec(name, "bool", False, True, "a test flag"))
    return name


@pytest.mark.parametrize(
    ("text", "value"),
    [("1", True), ("true", True), ("Yes\n", True), ("0", False), ("FALSE", False), ("no", False)],
)
def test_bool(cdir: Path, bool_spec: str, text: str, value: bool) -> None:
    """A bool file takes 1/true/yes or 0/false/no, any case."""
    put(cdir, bool_spec, text)
    assert control.read(cdir, bool_spec) is value


def test_bool_default_and_bad(cdir: Path, bool_spec: str) -> None:
    """A missing bool is its default; any other word is an error naming file and value."""
    assert control.read(cdir, bool_spec) is False
    path = put(cdir, bool_spec, "maybe\n")
    with pytest.raises(ControlError) as e:
        control.read(cdir, bool_spec)
    assert str(path) in str(e.value) and "'maybe'" in str(e.value)


def test_lines(cdir: Path) -> None:
    """A lines file gives every line that is not blank or a comment, stripped, in order."""
    put(cdir, "dns.servers", "# resolvers\n127.0.0.1:5353\n\n  ::1  \n#192.0.2.1\n10.0.0.1\n")
    assert control.read(cdir, "dns.servers") == ["127.0.0.1:5353", "::1", "10.0.0.1"]


def test_listen(cdir: Path) -> None:
    """A listen file gives (host, port) pairs: ip:port, [ipv6]:port, or a bare port (all addresses)."""
    put(cdir, "smtp.listen", "127.0.0.1:2525\n[::1]:25\n# off\n587\n")
    assert control.read(cdir, "smtp.listen") == [("127.0.0.1", 2525), ("::1", 25), ("0.0.0.0", 587)]


@pytest.mark.parametrize("bad", ["127.0.0.1", "127.0.0.1:0", "127.0.0.1:65536", ":25", "[::1]25", "host:port"])
def test_listen_bad(cdir: Path, bad: str) -> None:
    """A listen line without a usable host and port is an error naming the file and the value."""
    path = put(cdir, "smtp.listen", f"127.0.0.1:25\n{bad}\n")
    with pytest.raises(ControlError) as e:
        control.read(cdir, "smtp.listen")
    message = str(e.value)
    assert message.startswith(f"{path}: bad value")
    assert repr(bad) in message
    assert "'127.0.0.1:25'" not in message  # the good first line is not blamed


def test_raw(cdir: Path) -> None:
    """A raw file is given verbatim: comments, blank lines and spacing included."""
    text = "# rules\n\n127.0.0.1:allow,RELAYCLIENT=\"\"  \n:deny\n"
    put(cdir, "smtp.tcp", text)
    assert control.read(cdir, "smtp.tcp") == text


# --------------------------------------------------------------------------- defaults


def test_defaults_when_missing(cdir: Path) -> None:
    """Every control file with a fixed default gives it when the file is missing."""
    for name, spec in control.SPECS.items():
        if spec.default is not None:
            assert control.read(cdir, name) == spec.default, name
    # 10 MB, Postfix's message_size_limit: a message without a limit could take smtpd's memory
    assert control.read(cdir, "databytes") == 10 * 1024 * 1024
    assert control.read(cdir, "smtp.sessions.max") == 200
    assert control.read(cdir, "smtp.sessions.per_ip") == 50
    assert control.read(cdir, "smtp.listen") == [("127.0.0.1", 25)]
    assert control.read(cdir, "log.delivery.maxbytes") == 16 * 1024 * 1024
    assert control.read(cdir, "smtp.tcp") == ""
    assert control.read(cdir, "dns.servers") == []


def test_defaults_for_empty_files(cdir: Path) -> None:
    """An empty (or comment-only) file means the default too."""
    put(cdir, "concurrencyremote", "# nothing set\n\n")
    put(cdir, "databytes", "")
    put(cdir, "me", "# no name\n")
    assert control.read(cdir, "concurrencyremote") == 20
    assert control.read(cdir, "databytes") == 10 * 1024 * 1024
    put(cdir, "databytes", "0\n")  # said explicitly: no limit
    assert control.read(cdir, "databytes") == 0
    assert control.read(cdir, "me") == (os.uname().nodename or "localhost")


def test_missing_folder_gives_defaults(tmp_path: Path) -> None:
    """A control folder that does not exist at all gives defaults, not an error."""
    assert control.read(tmp_path / "nowhere", "concurrencyremote") == 20


def test_me_defaults_to_host_name(cdir: Path) -> None:
    """`me` without a file is the host name."""
    assert control.read(cdir, "me") == (os.uname().nodename or "localhost")


@pytest.mark.parametrize("queue", ["ram", "bounce", "disk"])
def test_queue_concurrency_falls_back(cdir: Path, queue: str) -> None:
    """queue.<q>.concurrencyremote falls back to concurrencyremote (itself defaulting to 20),
    and wins when set."""
    name = f"queue.{queue}.concurrencyremote"
    assert control.read(cdir, name) == 20
    put(cdir, "concurrencyremote", "35\n")
    assert control.read(cdir, name) == 35
    put(cdir, name, "3\n")
    assert control.read(cdir, name) == 3
    assert control.read(cdir, "concurrencyremote") == 35


def test_queue_concurrency_fallback_reports_the_base_file(cdir: Path) -> None:
    """A bad concurrencyremote is reported even when read through a queue's fallback."""
    path = put(cdir, "concurrencyremote", "many\n")
    with pytest.raises(ControlError) as e:
        control.read(cdir, "queue.ram.concurrencyremote")
    assert str(path) in str(e.value) and "'many'" in str(e.value)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("concurrencyremote", "twenty"),
        ("concurrencyremote", "2.5"),
        ("concurrencyremote", "1e3"),
        ("databytes", "16x"),
        ("databytes", "1.5m"),
        ("queue.retry.scale", "fast"),
        ("queue.retry.scale", "nan"),
        ("queue.retry.scale", "inf"),
        ("log.service.maxbytes", "big"),
    ],
)
def test_bad_value_names_file_and_value(cdir: Path, name: str, bad: str) -> None:
    """A value of the wrong form is a ControlError whose message names the path and the value."""
    path = put(cdir, name, f"# comment\n{bad}\n")
    with pytest.raises(ControlError) as e:
        control.read(cdir, name)
    message = str(e.value)
    assert message.startswith(f"{path}: ")
    assert repr(bad) in message


@pytest.mark.parametrize(
    ("name", "bad"),
    [("concurrencyremote", "-1"), ("timeoutconnect", "-60"), ("queue.retry.scale", "-0.5")],
)
def test_negative_refused(cdir: Path, name: str, bad: str) -> None:
    """Negative numbers are refused: the error names the path, the value and says why."""
    path = put(cdir, name, bad)
    with pytest.raises(ControlError) as e:
        control.read(cdir, name)
    message = str(e.value)
    assert str(path) in message
    assert bad in message
    assert "negative" in message


def test_not_utf8(cdir: Path) -> None:
    """A file that is not UTF-8 text is a ControlError naming the file."""
    path = put(cdir, "me", b"mx\xff.example\n")
    with pytest.raises(ControlError) as e:
        control.read(cdir, "me")
    assert str(path) in str(e.value) and "UTF-8" in str(e.value)


def test_unknown_names(cdir: Path) -> None:
    """read and write refuse names that are not control files (KeyError), and write creates nothing."""
    with pytest.raises(KeyError):
        control.read(cdir, "no.such.setting")
    with pytest.raises(KeyError):
        control.write(cdir, "no.such.setting", 1)
    assert list(cdir.iterdir()) == []


# --------------------------------------------------------------------------- write


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("me", "mx.example.org"),
        ("concurrencyremote", 17),
        ("databytes", 16 * 1024 * 1024),
        ("queue.retry.scale", 0.25),
        ("dns.servers", ["127.0.0.1:5353", "::1"]),
        ("smtp.listen", [("127.0.0.1", 2525), ("::1", 25), ("0.0.0.0", 587)]),
        ("smtp.tcp", '127.0.0.1:allow,RELAYCLIENT=""\n:deny'),
    ],
)
def test_write_round_trips(cdir: Path, name: str, value: object) -> None:
    """What write writes, read gives back (a listen file included, from its (host, port) pairs)."""
    control.write(cdir, name, value)
    got = control.read(cdir, name)
    if name == "smtp.tcp":
        assert got == value + "\n"
    else:
        assert got == value
    assert [p.name for p in cdir.iterdir()] == [name]  # no temporary file left


def test_write_listen_strings(cdir: Path) -> None:
    """A listen file can also be written from its text lines."""
    control.write(cdir, "smtp.listen", ["127.0.0.1:2525", "[::1]:26"])
    assert control.read(cdir, "smtp.listen") == [("127.0.0.1", 2525), ("::1", 26)]


def test_write_bool_round_trips(cdir: Path, bool_spec: str) -> None:
    """A bool written as True/False reads back as the same bool."""
    for value in (True, False):
        control.write(cdir, bool_spec, value)
        assert control.read(cdir, bool_spec) is value


def test_write_is_atomic(cdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """write puts the whole new text in a temporary file and renames it over the old one:
    until the rename the old value is intact, and a failed rename leaves it intact."""
    control.write(cdir, "concurrencyremote", 5)
    target = cdir / "concurrencyremote"
    seen = []
    real_replace = os.replace

    def checking_replace(src, dst):
        seen.append((Path(src).read_text(), Path(dst).read_text()))
        assert Path(dst) == target and Path(src).parent == cdir and Path(src) != target
        return real_replace(src, dst)

    monkeypatch.setattr(control.os, "replace", checking_replace)
    control.write(cdir, "concurrencyremote", 123)
    assert seen == [("123\n", "5\n")]
    assert control.read(cdir, "concurrencyremote") == 123

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(control.os, "replace", failing_replace)
    with pytest.raises(OSError):
        control.write(cdir, "concurrencyremote", 9)
    assert control.read(cdir, "concurrencyremote") == 123


def test_write_replaces_not_appends(cdir: Path) -> None:
    """Writing again replaces the whole file."""
    control.write(cdir, "dns.servers", ["10.0.0.1", "10.0.0.2", "10.0.0.3"])
    control.write(cdir, "dns.servers", ["10.0.0.9"])
    assert (cdir / "dns.servers").read_text() == "10.0.0.9\n"


def test_specs_are_complete() -> None:
    """Every spec has a known kind, a doc, and a default of its kind (or None: derived)."""
    kinds = {"text", "int", "float", "size", "bool", "lines", "listen", "raw"}
    for name, spec in control.SPECS.items():
        assert spec.name == name
        assert spec.kind in kinds
        assert spec.doc
        if spec.default is None:
            assert name in ("me", "defaulthost", "defaultdomain", "plusdomain") \
                or name.endswith(".concurrencyremote")
        elif spec.kind in ("int", "size"):
            assert isinstance(spec.default, int) and spec.default >= 0
        elif spec.kind == "float":
            assert isinstance(spec.default, float)
        elif spec.kind in ("lines", "listen"):
            assert isinstance(spec.default, list)


def test_typed_getters_refuse_a_file_of_another_type(tmp_path) -> None:
    (tmp_path / "databytes").write_text("2048\n")
    assert control.read_int(tmp_path, "databytes") == 2048
    assert control.read_text(tmp_path, "me")
    with pytest.raises(TypeError, match="holds size"):
        control.read_text(tmp_path, "databytes")
    with pytest.raises(TypeError, match="holds text"):
        control.read_int(tmp_path, "me")
