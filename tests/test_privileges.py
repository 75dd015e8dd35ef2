"""Privilege separation (issue 10 item 2): a root-started engine runs no service as root.

A real engine started with `hvmail_init start` as root in a temporary root
(tests/engine.py puts it where the engine's users can reach it): each
service runs as its user of greenarrow.lib.core.users (seen with `ps -o
user,cmd` and /proc), smtpd listens on a privileged port through a socket
the supervisor bound, mail goes end to end to a loopback receiver, the files
have their modes, and a secret that other users may read is refused.

The engine tests need root (CI runs as root); the checks of secret files do not.
"""

from __future__ import annotations

import grp
import http.client
import os
import pwd
import smtplib
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from engine import Engine, free_port, reachable_tmp, route_conf, wait_until
from processes import listening_inodes, socket_inodes
from smtp_receivers import Receiver

from greenarrow.lib.config import control, secret_constants
from greenarrow.lib.core import users
from greenarrow.lib.core.paths import Root
from greenarrow.lib.dkim.signing import DkimKeys
from greenarrow.lib.ops import ramdisk, supervisor
from greenarrow.lib.ops.install_root import init_root

needs_root = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="privilege separation needs root: these tests create the engine's users "
           "and start services as them (CI runs as root)")

MESSAGE = b"From: <a@origin.test>\r\nTo: <u@dest.test>\r\nSubject: privsep\r\n\r\nHello.\r\n"


def ps(pids: list[int]) -> dict[int, tuple[str, str]]:
    """`ps -o pid,user,cmd` of the given pids: pid -> (user, command)."""
    out = subprocess.run(["ps", "-o", "pid=,user:32=,cmd=", "-p", ",".join(map(str, pids))],
                         capture_output=True, text=True, timeout=30).stdout
    rows = {}
    for line in out.splitlines():
        pid, user, cmd = line.split(None, 2)
        rows[int(pid)] = (user, cmd)
    return rows


def proc_ids(pid: int) -> tuple[list[int], list[int], list[int]]:
    """Real/effective/saved/fs uids, gids and supplementary groups of a process."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "Groups"):
            fields[key] = [int(v) for v in value.split()]
    return fields["Uid"], fields["Gid"], fields["Groups"]


def free_privileged_port() -> int:
    """A port below 1024 free on 127.0.0.1 (binding it needs root: we are)."""
    for port in range(700, 1000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free port below 1024 on 127.0.0.1")


@needs_root
def test_services_run_as_their_users_and_smtpd_listens_on_a_socket_it_was_given(tmp_path):
    """ps shows every service as its own user and the supervisor as root; smtpd has
    dropped every id and group but the engine's, and serves a privileged port it could
    not bind itself through the socket the supervisor bound; mail injected over SMTP
    and with bin/sendmail (injectd) is delivered to a loopback receiver."""
    port = free_privileged_port()
    with Receiver("127.0.0.1") as rx:
        engine = Engine(tmp_path, conf=route_conf({"dest.test": rx.port}), workers=2,
                        controls={"smtp.listen": [f"127.0.0.1:{port}"]})
        with engine:
            pids = supervisor.service_pids(engine.root)
            sup = supervisor.supervisor_pid(engine.root)
            rows = ps([*pids.values(), sup])
            expected = {"remote-0": "garemote", "remote-1": "garemote",
                        "queue-send-ram": "gaqueue", "queue-send-bounce": "gaqueue",
                        "queue-send-disk": "gaqueue", "injectd": "gaqueue", "smtpd": "gasmtpd"}
            for name, user in expected.items():
                assert rows[pids[name]][0] == user, (name, rows[pids[name]])
            assert rows[sup] == ("root", "greenarrow supervise")
            assert rows[pids["smtpd"]][1] == "greenarrow smtpd"

            smtpd = users.account("gasmtpd")
            uids, gids, groups = proc_ids(pids["smtpd"])
            assert uids == [smtpd.uid] * 4 and gids == [smtpd.gid] * 4
            assert groups == [smtpd.gid]  # root's groups are gone

            # the listening socket on the privileged port is smtpd's, inherited
            assert listening_inodes(port) & socket_inodes(pids["smtpd"])
            log = (engine.root.service_log("smtpd") / "current").read_text()
            assert f"listening on 127.0.0.1:{port} (socket from the supervisor)" in log

            with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
                smtp.sendmail("a@origin.test", ["u1@dest.test"], MESSAGE)
            result = engine.sendmail("-f", "a@origin.test", "u2@dest.test", message=MESSAGE)
            assert result.returncode == 0, result.stderr
            wait_until(lambda: len(rx.messages) >= 2, 60, "two messages at the receiver")
            assert sorted(m.recipients[0] for m in rx.messages) == ["u1@dest.test",
                                                                    "u2@dest.test"]
            wait_until(lambda: len(engine.records()) >= 2, 30, "two delivery log lines")
            assert {r["status"] for r in engine.records()} == {"success"}


@needs_root
def test_the_tracker_serves_a_privileged_port_through_a_socket_it_was_given(tmp_path):
    """The tracker runs as the queue owner, yet answers on a port below 1024 (80 in a
    real deployment) through the socket the supervisor bound for tracker.listen: both
    tracker processes accept on that one socket."""
    port = free_privileged_port()
    engine = Engine(tmp_path, controls={"tracker.listen": [f"127.0.0.1:{port}"],
                                        "tracker.processes": 2})
    with engine:
        pids = supervisor.service_pids(engine.root)
        trackers = [pids["tracker-0"], pids["tracker-1"]]
        assert {row[0] for row in ps(trackers).values()} == {users.QUEUE_USER}
        for name in ("tracker-0", "tracker-1"):
            log_file = engine.root.service_log(name) / "current"
            wait_until(lambda f=log_file: f.exists() and "listening for HTTP" in f.read_text(),
                       30, f"{name} listening")
            assert (f"listening for HTTP on 127.0.0.1:{port} (socket from the supervisor)"
                    in log_file.read_text())
        listening = listening_inodes(port)
        assert len(listening) == 1  # one socket, shared
        assert all(listening & socket_inodes(pid) for pid in trackers)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            conn.request("GET", "/t/click?qs=not-a-tracking-link")
            assert conn.getresponse().status == 404  # served, and no open redirect
        finally:
            conn.close()


@needs_root
def test_supervisor_retries_a_listen_address_in_use(tmp_path):
    """The supervisor binds smtpd's port: while another process holds it, smtpd's log
    says so and the supervisor tries again; once it is free smtpd comes up on it."""
    port = free_privileged_port()
    squatter = socket.create_server(("127.0.0.1", port))
    engine = Engine(tmp_path, controls={"smtp.listen": [f"127.0.0.1:{port}"]})
    log = engine.root.service_log("smtpd") / "current"
    try:
        result = engine.program("hvmail_init", "start", "--wait", "3")
        engine.started = True
        assert result.returncode == 1 and b"smtpd: down" in result.stdout
        wait_until(lambda: log.exists() and "cannot listen on" in log.read_text(), 30,
                   "the supervisor's complaint in smtpd's log")
        assert f"supervise: cannot listen on 127.0.0.1:{port}: " in log.read_text()
        squatter.close()
        wait_until(lambda: "socket from the supervisor" in log.read_text(), 60,
                   "smtpd listening once the port is free")
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
            assert smtp.ehlo()[0] == 250
    finally:
        squatter.close()
        engine.stop()


@needs_root
def test_file_owners_and_modes(tmp_path):
    """What each user may read and write (docs/operations.md section 4b): the queues are
    gaqueue's with the engine group, the ram-queue's commit folders group-writable; an
    entry smtpd wrote is group-readable only; greenarrow.conf, secret_constants and the
    delivery logs are not readable by other users; var/ lets everyone reach the sockets."""
    closed = free_port()  # nothing listens: the attempt is deferred to the disk-queue
    engine = Engine(tmp_path, conf=route_conf({"dest.test": closed}))
    queue_owner = users.account(users.QUEUE_USER)
    gid = grp.getgrnam(users.GROUP).gr_gid
    with engine:
        with smtplib.SMTP("127.0.0.1", engine.smtp_port, timeout=30) as smtp:
            smtp.sendmail("a@origin.test", ["u@dest.test"], MESSAGE)
        wait_until(lambda: engine.queued("disk"), 60, "the deferred entry in the disk-queue")
        (name,) = engine.queued("disk")
        entry = (engine.root.queue("disk") / "entries" / name).stat()
        assert pwd.getpwuid(entry.st_uid).pw_name == "gaqueue"  # queue-send moved it here
        assert entry.st_gid == gid and stat.S_IMODE(entry.st_mode) == 0o640

        def mode_owner(path: Path) -> tuple[int, str, str]:
            st = path.stat()
            return (stat.S_IMODE(st.st_mode), pwd.getpwuid(st.st_uid).pw_name,
                    grp.getgrgid(st.st_gid).gr_name)

        root = engine.root
        assert mode_owner(root.queue("ram")) == (0o2750, "gaqueue", "greenarrow")
        assert mode_owner(root.queue("ram") / "tmp") == (0o2770, "gaqueue", "greenarrow")
        assert mode_owner(root.queue("ram") / "entries") == (0o2770, "gaqueue", "greenarrow")
        assert mode_owner(root.queue("disk") / "entries") == (0o2750, "gaqueue", "greenarrow")
        assert mode_owner(root.var) == (0o3771, "gaqueue", "greenarrow")
        assert mode_owner(root.trigger("ram")) == (0o620, "gaqueue", "greenarrow")
        assert mode_owner(root.control / "greenarrow.conf")[0] == 0o640
        assert mode_owner(root.control / "greenarrow.conf")[2] == "greenarrow"
        assert mode_owner(root.control / "secret_constants") == (0o640, "root", "greenarrow")
        log = root.delivery_log("ram") / "current"
        wait_until(log.exists, 30, "the ram-queue's delivery log")
        assert mode_owner(log)[1] == "gaqueue" and not mode_owner(log)[0] & 0o007
        for service in ("smtpd", "supervise"):
            assert not mode_owner(root.service_log(service) / "current")[0] & 0o007
        sock = root.remote_socket(0)
        assert mode_owner(sock)[1:] == ("garemote", "greenarrow")
        assert not mode_owner(sock)[0] & 0o007  # only the engine may talk to a worker
        count = root.var / "queue.ram.count"
        assert mode_owner(count) == (0o640, "gaqueue", "greenarrow")  # smtpd reads it

        # as smtpd's user: the count and the entries are read-only, and var/ is sticky,
        # so smtpd cannot put a socket of its own in place of another service's
        smtpd = users.account(users.SMTPD_USER)
        probe = ("import os, sys\n"
                 "def denied(f):\n"
                 "    try:\n"
                 "        f()\n"
                 "    except PermissionError:\n"
                 "        return True\n"
                 "    return False\n"
                 "var = sys.argv[1]\n"
                 "print(open(os.path.join(var, 'queue.ram.count')).read().strip(),\n"
                 "      denied(lambda: open(os.path.join(var, 'queue.ram.count'), 'w')),\n"
                 "      denied(lambda: os.unlink(os.path.join(var, 'inject.sock'))),\n"
                 "      denied(lambda: os.unlink(os.path.join(var, 'remote.0.sock'))),\n"
                 "      denied(lambda: open(sys.argv[2]).read()))\n")
        result = subprocess.run(
            [sys.executable, "-c", probe, str(root.var), str(root.control / "greenarrow.conf")],
            user=smtpd.uid, group=smtpd.gid, extra_groups=[smtpd.gid], capture_output=True,
            text=True, timeout=60, env=dict(os.environ, HOME="/"))
        assert result.stdout.split() == ["0", "True", "True", "True", "False"], result.stderr
        assert queue_owner.gid == gid


@needs_root
def test_a_world_readable_dkim_key_stops_the_workers_with_the_fix(tmp_path):
    """A DKIM key every local user may read: the remote workers refuse to start, and
    their log names the file and the command that fixes it."""
    engine = Engine(tmp_path)
    key = engine.root.control / "dkim" / "origin.test" / "default.pem"
    key.parent.mkdir(parents=True)
    key.write_bytes(ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    key.chmod(0o644)
    engine.program("hvmail_init", "start", "--wait", "5")  # may see the workers up a moment
    engine.started = True
    try:
        log = engine.root.service_log("remote-0") / "current"
        wait_until(lambda: log.exists() and "readable by every local user" in log.read_text(),
                   30, "the refusal in the worker's log")
        assert f"{key}: readable by every local user (mode 0644)" in log.read_text()
        assert f"chgrp greenarrow {key} && chmod 640 {key}" in log.read_text()

        def restarts() -> int:
            status = supervisor.read_status(engine.root)["services"]
            return next(s["restarts"] for s in status if s["name"] == "remote-0")

        wait_until(lambda: restarts() >= 1, 30, "the worker exiting on the refused key")
    finally:
        engine.stop()


@needs_root
def test_hvmail_init_refuses_a_root_its_users_cannot_reach(tmp_path):
    """An install root under a 0700 folder: the services could not run there as the
    engine's users, so hvmail_init says which folder and starts nothing."""
    hidden = tmp_path / "hidden"
    hidden.mkdir(mode=0o700)
    root = Root(hidden / "hvmail")
    init_root(root, me="engine.test")
    env = dict(os.environ, HVMAIL_ROOT=str(root.path))
    result = subprocess.run([sys.executable, "-m", "greenarrow.bin.hvmail_init", "start"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1
    assert "keeps user gaqueue from reaching" in result.stderr
    assert "chmod o+x" in result.stderr
    assert supervisor.supervisor_pid(root) is None


@needs_root
def test_init_creates_the_users_once(tmp_path):
    """`greenarrow init` as root: the group and users exist afterwards (system accounts,
    no login shell, no home), and a second run creates nothing and changes nothing."""
    root = Root(tmp_path / "hvmail")
    init_root(root, me="engine.test")
    assert users.ensure_accounts() == []
    for name in users.USERS:
        entry = pwd.getpwnam(name)
        assert entry.pw_gid == grp.getgrnam(users.GROUP).gr_gid
        assert entry.pw_shell.endswith(("nologin", "false"))
        assert not os.path.exists(entry.pw_dir) or entry.pw_dir == "/nonexistent"
        assert entry.pw_uid < 1000  # a system account
    created = init_root(root, me="engine.test")
    assert not [c for c in created if c.startswith(("user ", "group "))]

    # a file only root may read in control/ (a TLS key, umask 027) becomes the group's
    secret = root.control / "tls" / "key.pem"
    secret.parent.mkdir()
    secret.write_bytes(b"key\n")
    secret.chmod(0o600)
    init_root(root, me="engine.test")
    st = secret.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o640, grp.getgrnam(users.GROUP).gr_gid)


@needs_root
def test_an_engine_started_by_another_user_runs_as_that_user(tmp_path):
    """Not root (here: nobody): init changes no owner, every service runs as that
    user, smtpd binds its own (unprivileged) port, as before privilege separation."""
    nobody = pwd.getpwnam("nobody")
    home = reachable_tmp(tmp_path)
    os.chown(home, nobody.pw_uid, nobody.pw_gid)
    port = free_port()
    env = dict(os.environ, HVMAIL_ROOT=str(home / "hvmail"), HOME="/", USER="nobody")
    as_nobody = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": [],
                 "env": env, "capture_output": True, "text": True, "timeout": 120}
    code = (f"from greenarrow.lib.config import control; from greenarrow.lib.core.paths import Root;"
            f"from greenarrow.lib.ops.install_root import init_root; r = Root({str(home / 'hvmail')!r});"
            f"init_root(r, me='engine.test');"
            f"control.write(r.control, 'smtp.listen', ['127.0.0.1:{port}']);"
            f"control.write(r.control, 'dns.servers', ['127.0.0.1:9'])")
    made = subprocess.run([sys.executable, "-c", code], **as_nobody)
    assert made.returncode == 0, made.stderr
    root = Root(home / "hvmail")
    for path in (root.var, root.queue("ram") / "entries", root.control / "secret_constants"):
        assert path.stat().st_uid == nobody.pw_uid
    assert stat.S_IMODE((root.control / "secret_constants").stat().st_mode) == 0o600
    hvmail_init = [sys.executable, "-m", "greenarrow.bin.hvmail_init"]
    started = subprocess.run([*hvmail_init, "start"], **as_nobody)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        pids = [*supervisor.service_pids(root).values(), supervisor.supervisor_pid(root)]
        assert {user for user, _ in ps(pids).values()} == {"nobody"}
        log = (root.service_log("smtpd") / "current").read_text()
        assert f"listening on 127.0.0.1:{port}" in log and "from the supervisor" not in log
    finally:
        stopped = subprocess.run([*hvmail_init, "stop"], **as_nobody)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr


# -- secrets readable by others are refused (any user) ------------------------


def test_world_readable_secret_constants_are_refused_with_the_fix(tmp_path):
    control_dir = tmp_path
    secret_constants.write(control_dir, "0" * 32, "1" * 32)
    path = secret_constants.path(control_dir)
    assert not path.stat().st_mode & 0o007  # written tight
    assert secret_constants.read(control_dir) == ("0" * 32, "1" * 32)
    path.chmod(0o644)
    with pytest.raises(secret_constants.SecretConstantsError) as e:
        secret_constants.read(control_dir)
    assert str(e.value).startswith(f"{path}: readable by every local user (mode 0644)")
    assert "chmod 6" in str(e.value) and str(e.value).endswith(str(path))


@needs_root
def test_secrets_readable_by_another_group_are_refused(tmp_path):
    """Group-readable is fine for the engine's group, refused for any other group."""
    init_root(Root(tmp_path / "hvmail"))  # the engine group exists
    other = next(g.gr_gid for g in grp.getgrall() if g.gr_name not in (users.GROUP, "root"))
    secret_constants.write(tmp_path, "0" * 32, "1" * 32)
    path = secret_constants.path(tmp_path)
    assert (stat.S_IMODE(path.stat().st_mode), path.stat().st_gid) == (
        0o640, grp.getgrnam(users.GROUP).gr_gid)
    assert secret_constants.read(tmp_path) == ("0" * 32, "1" * 32)
    os.chown(path, -1, other)
    with pytest.raises(secret_constants.SecretConstantsError, match="readable by group"):
        secret_constants.read(tmp_path)

    key = tmp_path / "dkim" / "origin.test" / "default.pem"
    key.parent.mkdir(parents=True)
    key.write_bytes(ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    users.restrict(key)
    assert DkimKeys.from_control(tmp_path).pairs() == [("origin.test", "default")]
    os.chown(key, -1, other)
    with pytest.raises(control.ControlError, match=f"{key}: readable by group"):
        DkimKeys.from_control(tmp_path)
    key.chmod(0o604)
    with pytest.raises(control.ControlError, match="readable by every local user"):
        DkimKeys.from_control(tmp_path)


@needs_root
def test_a_tmpfs_ram_queue_belongs_to_the_queue_owner(tmp_path):
    """A fresh tmpfs is root's with mode 1777 (sticky: queue-send could not remove what
    smtpd wrote): once mounted it is given the queue's owner and modes, and mail
    committed into it by smtpd is delivered."""
    with Receiver("127.0.0.1") as rx:
        engine = Engine(tmp_path, conf=route_conf({"dest.test": rx.port}),
                        controls={"queue.ram.ramdisk.size": 16})
        ram = engine.root.queue("ram")
        try:
            # what `hvmail_init run` does after init (systemd's way): mount, then nothing
            assert ramdisk.setup(engine.root) == ["ram-queue: tmpfs size=16m,noexec,nosuid"]
            assert os.path.ismount(ram)
            st = ram.stat()
            assert (pwd.getpwuid(st.st_uid).pw_name, stat.S_IMODE(st.st_mode)) == (
                "gaqueue", 0o2750)
            assert stat.S_IMODE((ram / "entries").stat().st_mode) == 0o2770
            with engine:
                with smtplib.SMTP("127.0.0.1", engine.smtp_port, timeout=30) as smtp:
                    smtp.sendmail("a@origin.test", ["u@dest.test"], MESSAGE)
                wait_until(lambda: rx.messages, 60, "the message at the receiver")
                wait_until(lambda: not engine.queued("ram"), 30, "an empty ram-queue")
        finally:
            if os.path.ismount(ram):
                subprocess.run(["umount", str(ram)], check=False)


def test_listening_sockets_are_inherited_by_number():
    """What the supervisor does for smtpd, in miniature: bind, pass the descriptors to
    a child named in GREENARROW_LISTEN_FDS; the child accepts on them without binding."""
    from greenarrow.lib.core import listen_sockets

    socks = listen_sockets.bind([("127.0.0.1", 0)])
    port = socks[0].getsockname()[1]
    child = ("import socket; from greenarrow.lib.core import listen_sockets as l;"
             "(s,) = l.inherited(); s.setblocking(True); c, _ = s.accept();"
             "c.sendall(str(s.getsockname()[1]).encode()); c.close()")
    env = dict(os.environ, **{listen_sockets.ENV: listen_sockets.env_value(socks)})
    proc = subprocess.Popen([sys.executable, "-c", child], env=env,
                            pass_fds=[s.fileno() for s in socks])
    try:
        for sock in socks:
            sock.close()  # the child's copy stays open
        with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
            c.settimeout(30)
            assert c.recv(100) == str(port).encode()
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    busy = socket.create_server(("127.0.0.1", 0))
    port = busy.getsockname()[1]
    with busy, pytest.raises(OSError) as e:
        listen_sockets.bind([("127.0.0.1", port)])
    assert e.value.strerror == f"cannot listen on 127.0.0.1:{port}: Address already in use"


SIMPLEMH_CLASS = """
mail_class news {
    track_clicks_and_opens yes
    url_domain https://links.example.com
    bounce_address bounce@bounces.example.com
}
"""


@needs_root
def test_smtpd_refuses_world_readable_secret_constants_and_uses_tight_ones(tmp_path):
    """SimpleMH in smtpd (as gasmtpd) reads the constants through the engine group;
    made readable by every user they are refused with a 451 naming the file and the
    fix, and taken once tight again."""
    with Receiver("127.0.0.1") as rx:
        engine = Engine(tmp_path, conf=route_conf({"dest.test": rx.port}) + SIMPLEMH_CLASS)
        path = secret_constants.path(engine.root.control)
        message = MESSAGE.replace(b"Subject:", b"X-GreenArrow-MailClass: news\r\nSubject:")
        with engine, smtplib.SMTP("127.0.0.1", engine.smtp_port, timeout=30) as smtp:
            path.chmod(0o644)  # after start: `hvmail_init start` (init) would tighten it
            with pytest.raises(smtplib.SMTPDataError) as e:
                smtp.sendmail("a@origin.test", ["u1@dest.test"], message)
            assert e.value.smtp_code == 451
            assert f"{path}: readable by every local user (mode 0644)" in e.value.smtp_error.decode()
            assert b"chmod 640" in e.value.smtp_error
            smtp.rset()
            users.restrict(path)  # root:greenarrow 0640, what greenarrow init makes
            smtp.sendmail("a@origin.test", ["u2@dest.test"], message)
            wait_until(lambda: rx.messages, 60, "the SimpleMH message at the receiver")
            assert rx.messages[0].sender.endswith("@bounces.example.com")


@needs_root
def test_init_converts_a_root_made_before_privilege_separation(tmp_path):
    """A root whose queues, delivery logs and var/ are root's (an engine run as root
    before): the next init as root hands them and their files to gaqueue."""
    root = Root(tmp_path / "hvmail")
    init_root(root, me="engine.test")
    entry = root.queue("disk") / "entries" / "old-0.1.0"
    log = root.delivery_log("disk") / "current"
    count = root.var / "queue.disk.count"
    for folder in (root.queue("disk"), root.queue("disk") / "entries", root.delivery_log("disk"),
                   root.var):
        os.chown(folder, 0, 0)
        folder.chmod(0o755)
    for path in (entry, log, count):
        path.write_bytes(b"x\n")
        os.chown(path, 0, 0)
        path.chmod(0o600)
    init_root(root, me="engine.test")
    owner = users.account(users.QUEUE_USER)
    for path in (entry, log, count):
        st = path.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (owner.uid, owner.gid, 0o640)
    assert stat.S_IMODE(root.queue("disk").stat().st_mode) == 0o2750
