"""`greenarrow init` (`greenarrow.lib.ops.install_root.init_root`): the install root layout.

init_root creates the folders, queues, trigger FIFOs, default control files,
control/me and the injection scripts; it is idempotent and never changes a
control file an operator edited.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from greenarrow.bin.greenarrow import main as greenarrow_main
from greenarrow.lib.core.paths import QUEUES, Root
from greenarrow.lib.ops import install_root
from greenarrow.lib.ops.install_root import data_dir, init_root


@pytest.fixture
def root(tmp_path: Path) -> Root:
    return Root(tmp_path / "hvmail")


def snapshot(path: Path) -> dict[str, tuple[int, bytes | None]]:
    """Every file and folder under `path`: its mode and, for regular files, its bytes."""
    out = {}
    for p in sorted(path.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(path))] = (st.st_mode, p.read_bytes() if stat.S_ISREG(st.st_mode) else None)
    return out


def test_layout(root: Root) -> None:
    """init_root creates control, bin, var, log/delivery/<q>, queue/<q>/{entries,tmp,hold}
    and a trigger FIFO per queue in var/."""
    init_root(root, "mx.example.test")
    for folder in (root.control, root.bin, root.var, root.log, root.maildata, root.log / "delivery"):
        assert folder.is_dir(), folder
    for q in QUEUES:
        assert root.delivery_log(q).is_dir()
        assert root.delivery_log(q) == root.path / "log" / "delivery" / q
        for sub in ("entries", "tmp", "hold"):
            assert (root.path / "queue" / q / sub).is_dir()
        trigger = root.var / f"trigger.{q}"
        assert trigger == root.trigger(q)
        assert stat.S_ISFIFO(trigger.lstat().st_mode)
    assert sorted(p.name for p in (root.path / "queue").iterdir()) == sorted(QUEUES)


def test_default_control_files_copied(root: Root) -> None:
    """The shipped control files (smtp.tcp, greenarrow.conf) are copied byte for byte."""
    init_root(root, "mx.example.test")
    shipped = data_dir("control")
    names = sorted(p.name for p in shipped.iterdir() if p.is_file())
    assert {"smtp.tcp", "greenarrow.conf"} <= set(names)
    for name in names:
        assert (root.control / name).read_bytes() == (shipped / name).read_bytes(), name
    assert '127.0.0.1:allow,RELAYCLIENT=""' in (root.control / "smtp.tcp").read_text()


def test_me_written(root: Root) -> None:
    """control/me holds the name given, on one line."""
    init_root(root, "mx.example.test")
    assert (root.control / "me").read_text() == "mx.example.test\n"


def test_me_defaults_to_fqdn(root: Root, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a name, control/me is the host's fully qualified name."""
    monkeypatch.setattr(install_root.socket, "getfqdn", lambda: "fqdn.example.test")
    init_root(root)
    assert (root.control / "me").read_text() == "fqdn.example.test\n"


@pytest.mark.parametrize(("name", "function"), [("sendmail", "sendmail_main"), ("qmail-inject", "qmail_inject_main")])
def test_scripts(root: Root, name: str, function: str) -> None:
    """bin/sendmail.py and bin/qmail-inject.py are executable, start `#!<python> -S`, point
    at this root and at the installed package, and call their entry point; bin/sendmail and
    bin/qmail-inject are the compiled client (a C compiler is on every machine that builds
    the package)."""
    init_root(root, "mx.example.test")
    client = root.bin / name
    assert client.read_bytes()[:4] == b"\x7fELF" and os.access(client, os.X_OK)
    script = root.bin / f"{name}.py"
    mode = script.stat().st_mode
    assert stat.S_ISREG(mode) and os.access(script, os.X_OK)
    assert mode & 0o111 == 0o111
    lines = script.read_text().splitlines()
    assert lines[0] == f"#!{sys.executable} -S"
    text = script.read_text()
    assert f'os.environ["HVMAIL_ROOT"] = {str(root.path)!r}' in text
    assert f"sys.path.insert(0, {install_root.package_parent()!r})" in text
    assert lines[-1] == f"{function}()"
    compile(text, str(script), "exec")


def test_returns_what_it_created(root: Root) -> None:
    """The first run lists the folders, control files, me and scripts it made."""
    created = init_root(root, "mx.example.test")
    for path in (
        root.control,
        root.bin,
        root.var,
        root.control / "smtp.tcp",
        root.control / "greenarrow.conf",
        root.control / "me",
        root.bin / "sendmail",
        root.bin / "qmail-inject",
    ):
        assert str(path) in created, path


def test_idempotent(root: Root) -> None:
    """A second run creates nothing, reports nothing, and leaves every file as it was."""
    init_root(root, "mx.example.test")
    before = snapshot(root.path)
    assert init_root(root, "mx.example.test") == []
    assert snapshot(root.path) == before


def test_never_overwrites_operator_changes(root: Root) -> None:
    """Control files the operator changed (or added) survive a re-run, even with another --me;
    a removed default is restored."""
    init_root(root, "mx.example.test")
    (root.control / "smtp.tcp").write_text(":deny\n")
    (root.control / "me").write_text("operator.example\n")
    (root.control / "databytes").write_text("1m\n")
    (root.control / "greenarrow.conf").unlink()
    created = init_root(root, "other.example")
    assert created == [str(root.control / "greenarrow.conf")]
    assert (root.control / "smtp.tcp").read_text() == ":deny\n"
    assert (root.control / "me").read_text() == "operator.example\n"
    assert (root.control / "databytes").read_text() == "1m\n"
    assert (root.control / "greenarrow.conf").read_bytes() == (data_dir("control") / "greenarrow.conf").read_bytes()


def test_completes_a_partial_root(root: Root) -> None:
    """Missing pieces are recreated: a queue folder, a FIFO replaced by a plain file, a script."""
    init_root(root, "mx.example.test")
    (root.path / "queue" / "disk" / "hold").rmdir()
    (root.var / "trigger.ram").unlink()
    (root.var / "trigger.ram").write_text("not a fifo")
    (root.bin / "sendmail.py").unlink()
    created = init_root(root, "mx.example.test")
    assert (root.path / "queue" / "disk" / "hold").is_dir()
    assert stat.S_ISFIFO((root.var / "trigger.ram").lstat().st_mode)
    assert created == [str(root.bin / "sendmail.py")]
    assert (root.bin / "sendmail.py").read_text().startswith(f"#!{sys.executable} -S\n")


def test_existing_queue_entries_untouched(root: Root) -> None:
    """Re-running on a live root leaves queued entries alone."""
    init_root(root, "mx.example.test")
    entry = root.path / "queue" / "ram" / "entries" / "abc-0.0.0"
    entry.write_bytes(b'{"sender":""}\nmessage\r\n')
    init_root(root, "mx.example.test")
    assert entry.read_bytes() == b'{"sender":""}\nmessage\r\n'


def test_greenarrow_init_command(root: Root) -> None:
    """`greenarrow init` (click, through CliRunner) prints each path it created and that the
    root is ready; run again, it prints only that the root is ready."""
    runner = CliRunner()
    result = runner.invoke(greenarrow_main, ["init", "--me", "cli.example.test"], env={"HVMAIL_ROOT": str(root.path)})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert f"created {root.control}" in lines
    assert f"created {root.control / 'smtp.tcp'}" in lines
    assert f"created {root.control / 'me'}" in lines
    assert f"created {root.bin / 'sendmail'}" in lines
    assert lines[-1] == f"install root {root.path} is ready"
    assert (root.control / "me").read_text() == "cli.example.test\n"

    again = runner.invoke(greenarrow_main, ["init"], env={"HVMAIL_ROOT": str(root.path)})
    assert again.exit_code == 0, again.output
    assert again.output.splitlines() == [f"install root {root.path} is ready"]
