"""greenarrow_config reload and secret_constants (seed 000's commands, as written)."""

from __future__ import annotations

import subprocess

from click.testing import CliRunner
from engine import Engine, route_conf, wait_until
from smtp_receivers import Receiver

from greenarrow.bin.greenarrow_config import main
from greenarrow.lib.config import secret_constants
from greenarrow.lib.core import users
from greenarrow.lib.core.paths import Root
from greenarrow.lib.ops.install_root import init_root


def invoke(root: Root, *args: str, input: str | None = None):
    return CliRunner().invoke(main, list(args), input=input, env={"HVMAIL_ROOT": str(root.path)})


def test_secret_constants_view_set_and_make_new_random(tmp_path):
    root = Root(tmp_path)
    init_root(root)
    first = invoke(root, "secret_constants", "--view")
    assert first.exit_code == 0
    c1, c2 = secret_constants.read(root.control)
    assert first.output == f"Constant 1: {c1}\nConstant 2: {c2}\n"
    a, b = "0123456789abcdef0123456789ABCDEF", "fedcba9876543210fedcba9876543210"
    assert invoke(root, "secret_constants", f"--constant1={a}", f"--constant2={b}").exit_code == 0
    assert invoke(root, "secret_constants", "--view").output == \
        f"Constant 1: {a.lower()}\nConstant 2: {b}\n"
    bad = invoke(root, "secret_constants", "--constant1=xyz", f"--constant2={b}")
    assert bad.exit_code == 1 and "32 hexadecimal digits" in bad.output
    refused = invoke(root, "secret_constants", "--make-new-random", "--no-delay", input="no\n")
    assert refused.exit_code == 1 and secret_constants.read(root.control) == (a.lower(), b)
    done = invoke(root, "secret_constants", "--make-new-random", "--no-delay", input="YES\n")
    assert done.exit_code == 0 and "WARNING" in done.output
    assert f"Old constant 1: {a.lower()}" in done.output
    assert secret_constants.read(root.control) != (a.lower(), b)
    # the engine's group may read it where the services run as the engine's users
    expected = "640" if users.separated() else "600"
    assert oct((root.control / "secret_constants").stat().st_mode)[-3:] == expected


def test_reload_with_errors_changes_nothing_and_a_good_reload_takes_effect(tmp_path):
    """A broken greenarrow.conf is refused with its line number; a good one reroutes
    mail in the running engine without a restart."""
    with Receiver() as old_route, Receiver() as new_route:
        engine = Engine(tmp_path, conf=route_conf({"dest.test": old_route.port}))
        with engine:
            pids = set(engine.all_pids())
            conf_file = engine.root.control / "greenarrow.conf"
            conf_file.write_text("ip_address * {\n  domain dest.test {\n    smtp_route 127.0.0.1:99999\n  }\n}\n")
            bad = engine.program("greenarrow_config", "reload")
            assert bad.returncode == 1 and b"greenarrow.conf:3:" in bad.stderr
            assert engine.sendmail("-f", "s@origin.test", "a@dest.test",
                                   message=b"Subject: 1\n\nx\n").returncode == 0
            wait_until(lambda: old_route.messages, 30, "delivery on the old route")

            conf_file.write_text(route_conf({"dest.test": new_route.port}))
            good = engine.program("greenarrow_config", "reload")
            assert good.returncode == 0, good.stderr
            wait_until(lambda: b"reloaded" in (engine.root.log / "queue-send-ram" / "current").read_bytes(),
                       30, "queue-send to reload")
            assert engine.sendmail("-f", "s@origin.test", "b@dest.test",
                                   message=b"Subject: 2\n\nx\n").returncode == 0
            wait_until(lambda: new_route.messages, 30, "delivery on the new route")
            assert set(engine.all_pids()) == pids  # nothing was restarted
        assert [m.recipients for m in old_route.messages] == [["a@dest.test"]]


def test_check_from_the_command_line(tmp_path):
    root = Root(tmp_path)
    init_root(root)
    (root.control / "greenarrow.conf").write_text("general {\n  bogus_directive 1\n}\n")
    result = subprocess.run(["greenarrow_config", "check"], capture_output=True, text=True,
                            env={"HVMAIL_ROOT": str(root.path), "PATH": "/usr/bin:/bin:" +
                                 __import__("os").environ["PATH"]})
    assert result.returncode == 1
    assert "greenarrow.conf:2:" in result.stderr


def test_reload_under_load_loses_nothing(tmp_path):
    """Messages keep flowing while greenarrow.conf is reloaded five times: every one arrives."""
    import smtplib
    import threading

    with Receiver() as rx:
        engine = Engine(tmp_path, conf=route_conf({"dest.test": rx.port}), workers=2)
        with engine:
            stop = threading.Event()

            def reload_repeatedly() -> None:
                for n in range(5):
                    if stop.wait(0.3):
                        return
                    conf = route_conf({"dest.test": rx.port}) + f"# reload {n}\n"
                    (engine.root.control / "greenarrow.conf").write_text(conf)
                    assert engine.program("greenarrow_config", "reload").returncode == 0

            reloader = threading.Thread(target=reload_repeatedly)
            reloader.start()
            with smtplib.SMTP("127.0.0.1", engine.smtp_port, timeout=30) as smtp:
                for n in range(400):
                    smtp.sendmail("s@origin.test", [f"u{n}@dest.test"], f"Subject: {n}\r\n\r\nx\r\n")
            reloader.join()
            stop.set()
            wait_until(lambda: len({m.recipients[0] for m in rx.messages}) == 400, 120,
                       "every message")
            log_text = (engine.root.log / "queue-send-ram" / "current").read_text()
            assert log_text.count("reloaded configuration") >= 5


def test_check_finds_mistakes_that_parse(tmp_path):
    """A route to an unknown VirtualMTA, a relay without relay_host, an unknown throttle
    program: reported with file and line by check (and so refused by reload)."""
    root = Root(tmp_path)
    init_root(root)
    cases = [
        ("routing_rule mix {\n  route nowhere 1\n}\n", ":2:", "no VirtualMTA named 'nowhere'"),
        ("relay_server r {\n  hostname a.example\n}\n", ":1:", "relay_host is required"),
        ("domain x.test {\n  throttle_program slow\n}\n", ":2:", "no throttle_program named"),
        ("ip_address a {\n  smtp_source 127.0.0.2\n}\nip_address a {\n  hostname a.test\n}\n",
         None, None),  # one VirtualMTA written in two pieces is fine
    ]
    for text, line, words in cases:
        (root.control / "greenarrow.conf").write_text(text)
        result = invoke(root, "check")
        if line is None:
            assert result.exit_code == 0, result.output
            continue
        assert result.exit_code == 1, text
        assert line in result.output and words in result.output, result.output
