"""hvmail_init: start, status, restart of a crashed service, stop with nothing left."""

from __future__ import annotations

import os

from engine import Engine, wait_until

from greenarrow.lib.ops import supervisor


def test_start_status_crash_restart_and_stop(tmp_path):
    engine = Engine(tmp_path, workers=2)
    with engine:
        status = engine.program("hvmail_init", "status")
        out = status.stdout.decode()
        assert status.returncode == 0, out
        for name in ("remote-0", "remote-1", "queue-send-ram", "smtpd"):
            assert f"{name}: up (pid " in out
        assert "ram-queue: plain folder (no tmpfs mounted)" in out
        # Every process is named for ps.
        pid = engine.service_pid("queue-send-ram")
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            assert f.read().startswith(b"greenarrow queue-send ram")
        # A crashed worker is restarted, with back-off, and counted.
        old = engine.kill_service("remote-1")
        wait_until(lambda: engine.service_pid("remote-1") != old, 30, "remote-1 restarted")
        wait_until(lambda: "remote-1: up" in engine.program("hvmail_init", "status").stdout.decode(),
                   30, "remote-1 up again")
        assert "1 restarts" in engine.program("hvmail_init", "status").stdout.decode()
        again = engine.program("hvmail_init", "start")
        assert b"already running" in again.stdout
        assert again.returncode == 0, again.stderr
        assert (engine.root.log / "remote-1" / "current").exists()
    down = engine.program("hvmail_init", "status")
    assert down.returncode == 1
    assert b"supervise: down" in down.stdout
    assert supervisor.supervisor_pid(engine.root) is None
    assert not any(p.suffix == ".pid" for p in engine.root.var.iterdir())


def test_restart_restarts_every_service(tmp_path):
    engine = Engine(tmp_path)
    with engine:
        before = set(engine.all_pids())
        result = engine.program("hvmail_init", "restart")
        assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
        after = set(engine.all_pids())
        assert before and after and not (before & after)
        assert all(supervisor.pid_alive(p) for p in after)
        assert not any(supervisor.pid_alive(p) for p in before if p != os.getpid())


def test_services_stop_when_the_supervisor_is_killed(tmp_path):
    """kill -9 of the supervisor leaves no service running unsupervised."""
    import signal

    engine = Engine(tmp_path)
    engine.start()
    services = list(supervisor.service_pids(engine.root).values())
    os.kill(supervisor.supervisor_pid(engine.root), signal.SIGKILL)
    wait_until(lambda: not any(supervisor.pid_alive(p) for p in services), 30,
               "every service to exit with its supervisor")
    engine.start()  # and the engine starts again cleanly
    engine.stop()


def test_tracker_lines_repeat_per_tracker_process(tmp_path):
    """`{process}` lines: control/tracker.processes copies, 0 meaning one per CPU; the
    tracker and the unsubscribe processor start only when configured."""
    from greenarrow.lib.config import control
    from greenarrow.lib.core.paths import Root
    from greenarrow.lib.ops.install_root import init_root

    root = Root(tmp_path / "hvmail")
    init_root(root, me="svc.test")
    (root.control / "greenarrow.conf").write_text("general {\n  events_database_url none\n}\n")

    def names() -> list[str]:
        return [s.name for s in supervisor.read_services(root)
                if s.program in ("tracker", "unsubscribe_processor")]

    assert names() == []  # no listen address, no unsubscribe mailbox
    control.write(root.control, "tracker.listen", ["127.0.0.1:8080"])
    control.write(root.control, "tracker.processes", 3)
    services = [s for s in supervisor.read_services(root) if s.program == "tracker"]
    assert [(s.name, s.args) for s in services] == [
        ("tracker-0", ["0"]), ("tracker-1", ["1"]), ("tracker-2", ["2"])]
    control.write(root.control, "tracker.processes", 0)
    assert names() == [f"tracker-{n}" for n in range(os.cpu_count() or 1)]
    with (root.control / "greenarrow.conf").open("a") as conf:
        conf.write("incoming_email_domain b.test {\n  unsubscribe_mailbox unsub\n}\n")
    assert names()[-1] == "unsubscribe-processor"
