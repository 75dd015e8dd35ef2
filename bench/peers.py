"""The two MTAs under test, behind one small interface.

`EnginePeer` runs this project's engine the way an operator does: a fresh
install root per run (`init_root`), control files (`smtp.listen` on a free
loopback port, so it never clashes with Postfix's port 25), greenarrow.conf
routing every domain to the sink, `hvmail_init start` / `stop`.

`PostfixPeer` runs the Debian package's Postfix exactly as the shared
baseline harness configured it (the same main.cf settings, see
`POSTFIX_SETTINGS`), relaying everything to the same sink. It can install
the package when missing (only when asked: `make bench` asks, the quick mode
and the tests never do). For the simplemh scenario it signs as a user would
deploy it: Debian's OpenDKIM as its milter on a Unix socket (`OpenDkim`),
with the engine's key, canonicalization and header list.

Both are restarted before every measured run and must start with an empty
queue, so one run's leftovers never count in the next.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.procs import descendants, free_port, pid_alive, read_pid, wait_port

# queue.ram.ramdisk.size when the bench runs as root (--engine-ramdisk overrides).
RAMDISK_MB = 1024

# Connection reuse matches the peer's setup: the Postfix baseline runs with
# smtp_connection_cache_on_demand = yes.
ROUTE_ALL = """# Written by the benchmark: every domain goes to the sink, over reused connections.
ip_address * {{
  domain * {{
    smtp_route 127.0.0.1:{port}
    reuse_connections yes
  }}
}}
"""


# The events scenario: every delivery attempt posted to the bench's receiver.
EVENTS_CONF = """event_delivery_destination bench {{
  event_delivery_url "{url}"
  event_delivery_events delivery_attempt
}}
"""

# The simplemh scenario's Mail Class (its name is in bench.genmsg.SIMPLEMH_CLASS):
# click and open tracking, an encoded bounce address, List-Unsubscribe; and
# a DKIM key for the sender's domain (RSA 2048, made once per work folder).
SIMPLEMH_CONF = """
mail_class bench {
  track_clicks_and_opens yes
  url_domain https://click.bench.test
  bounce_address bounces@bench.test
  list_unsubscribe yes
}
"""
SENDER_DOMAIN = "bench.test"


DKIM_SELECTOR = "default"


def dkim_key(path: Path, work: Path) -> None:
    """Copy the bench's DKIM key to `path`, making it first if needed."""
    made = dkim_key_path(work)
    if not made.exists():
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        made.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(made, path)
    from greenarrow.lib.core import users

    users.restrict(path)  # a key other users may read is refused


def dkim_key_path(work: Path) -> Path:
    """The bench's RSA-2048 key (PKCS#8 PEM), made once per work folder by `dkim_key`."""
    return work / "dkim-rsa2048.pem"


def run_cmd(
    argv: list[str], timeout: float = 120.0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion (bounded); never raises for a non-zero exit."""
    try:
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired as e:
        return subprocess.CompletedProcess(argv, 124, str(e.stdout or ""), f"timed out: {e}")
    except OSError as e:
        return subprocess.CompletedProcess(argv, 127, "", str(e))


class PeerError(RuntimeError):
    """The MTA could not be configured, started or stopped."""


class Peer:
    """What a scenario needs from an MTA."""

    name = "mta"
    smtp_port = 0

    def configure(self, sink_port: int, retry_scale: float | None = None,
                  simplemh: bool = False, events_url: str | None = None) -> None:
        """Make the MTA relay all mail to 127.0.0.1:sink_port (and retry quickly if asked).

        `simplemh`: the engine also runs its SimpleMH Mail Class and DKIM
        (SIMPLEMH_CONF); Postfix has neither and relays the same message as is.
        `events_url`: the engine records delivery_attempt events in its bundled
        PostgreSQL and posts them there (the events scenario; engine only).
        """
        raise NotImplementedError

    def start(self) -> None:
        """Start the MTA; return once its SMTP port listens (PeerError otherwise)."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop the MTA; return once it is down, so the next run starts from nothing."""
        raise NotImplementedError

    def queue_count(self) -> int:
        """Queued messages (files): must be 0 before a run and after it has drained."""
        raise NotImplementedError

    def root_pid(self) -> int | None:
        """The pid at the top of the MTA's process tree (for memory sampling)."""
        raise NotImplementedError

    def cli_argv(self, sender: str, rcpt: str) -> list[str]:
        """The command-line injection command (message on stdin, one process per message)."""
        raise NotImplementedError

    def cpu_roots(self) -> list[int]:
        """The roots of the process trees whose CPU counts as the MTA's."""
        pid = self.root_pid()
        return [pid] if pid else []

    def flush(self) -> None:
        """Ask the MTA to retry its deferred mail now (backlog scenario), if it can."""

    def check_delivered(self, n: int) -> str:
        """Cross-check with the MTA's own records; '' when fine, else what is wrong."""
        return ""

    def cleanup(self) -> None:
        """Remove what `configure` created for one run."""

    def describe(self) -> str:
        return self.name


class EnginePeer(Peer):
    """This project's engine, in a fresh install root under the work folder for each run."""

    name = "engine"

    def __init__(
        self,
        work: Path,
        workers: int | None = None,
        concurrency: int | None = None,
        keep_roots: bool = False,
        ramdisk_mb: int | None = None,
        event_loop: str | None = None,
    ) -> None:
        self.work = work
        self.event_loop = event_loop  # GREENARROW_EVENT_LOOP for the engine's services
        self.workers = workers
        self.concurrency = concurrency
        # The ram-queue on tmpfs, as GreenArrow installs it (hvmail_init mounts it
        # when run as root); a plain folder otherwise.
        if ramdisk_mb is None:
            ramdisk_mb = RAMDISK_MB if os.geteuid() == 0 else 0
        self.ramdisk_mb = ramdisk_mb
        self.keep_roots = keep_roots
        self.root_path = work / "engine-root"
        self.smtp_port = 0
        self.retry_scale: float | None = None
        self.env = dict(os.environ)
        self.started = False
        self._pids: list[int] = []

    def _program(self, name: str, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return run_cmd([sys.executable, "-m", f"greenarrow.bin.{name}", *args], timeout, self.env)

    def configure(self, sink_port: int, retry_scale: float | None = None,
                  simplemh: bool = False, events_url: str | None = None) -> None:
        from greenarrow.lib.config import control
        from greenarrow.lib.core.paths import Root
        from greenarrow.lib.ops.install_root import init_root

        if self.started:
            self.stop()
        self.cleanup()
        root = Root(self.root_path)
        init_root(root, me="engine.bench.test")
        self.smtp_port = free_port()
        control.write(root.control, "smtp.listen", [f"127.0.0.1:{self.smtp_port}"])
        if self.workers:
            control.write(root.control, "remote.workers", self.workers)
        if self.concurrency:
            control.write(root.control, "concurrencyremote", self.concurrency)
        self.retry_scale = retry_scale
        if retry_scale is not None:
            control.write(root.control, "queue.retry.scale", retry_scale)
        if self.ramdisk_mb:
            control.write(root.control, "queue.ram.ramdisk.size", self.ramdisk_mb)
        # The bench measures mail, not events: no database, unless the events scenario
        # asks for the bundled PostgreSQL and a destination.
        conf = ROUTE_ALL.format(port=sink_port)
        if events_url is None:
            conf += "general {\n  events_database_url none\n}\n"
        else:
            conf += EVENTS_CONF.format(url=events_url)
        if simplemh:
            conf += SIMPLEMH_CONF
            dkim_key(root.control / "dkim" / SENDER_DOMAIN / "default.pem", self.work)
        (root.control / "greenarrow.conf").write_text(conf)
        self.env = dict(os.environ, HVMAIL_ROOT=str(self.root_path))
        if self.event_loop:
            self.env["GREENARROW_EVENT_LOOP"] = self.event_loop

    def start(self) -> None:
        if self.queue_count():
            raise PeerError(f"engine queue not empty at start ({self.queue_count()} entries)")
        result = self._program("hvmail_init", "start", timeout=60)
        if result.returncode != 0:
            raise PeerError(f"hvmail_init start failed: {result.stdout}{result.stderr}")
        self.started = True
        if not wait_port(self.smtp_port, True, 20):
            raise PeerError(f"engine smtpd did not listen on {self.smtp_port}")
        pid = self.root_pid()
        self._pids = descendants(pid) if pid else []

    def stop(self) -> None:
        """`hvmail_init stop`, then prove that no process of this root is left."""
        if not self.started:
            return
        pids = set(self._pids)
        pid = self.root_pid()
        if pid:
            pids.update(descendants(pid))
        result = self._program("hvmail_init", "stop", timeout=120)
        self.started = False
        deadline = time.monotonic() + 15
        while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = [p for p in pids if pid_alive(p)]
        if result.returncode != 0 or left:
            raise PeerError(f"hvmail_init stop: rc={result.returncode} left={left} {result.stdout}{result.stderr}")
        wait_port(self.smtp_port, False, 5)

    def queue_count(self) -> int:
        total = 0
        for queue in ("ram", "bounce", "disk"):
            entries = self.root_path / "queue" / queue / "entries"
            if entries.is_dir():
                total += sum(1 for _ in os.scandir(entries))
        return total

    def root_pid(self) -> int | None:
        pid = read_pid(self.root_path / "var" / "supervise.pid")
        return pid if pid and pid_alive(pid) else None

    def cli_argv(self, sender: str, rcpt: str) -> list[str]:
        return [str(self.root_path / "bin" / "sendmail"), "-i", "-f", sender, "--", rcpt]

    def report(self) -> dict[str, object]:
        """`hvmail_report -q all --json`: the engine's own summary of its delivery log."""
        result = self._program("hvmail_report", "-q", "all", "--json", timeout=300)
        if result.returncode != 0:
            return {"error": (result.stderr or result.stdout).strip()[-500:]}
        try:
            return dict(json.loads(result.stdout))
        except ValueError:
            return {"error": "hvmail_report printed no JSON"}

    def check_delivered(self, n: int) -> str:
        """The delivery log must show exactly n successes (a duplicate would show n+1)."""
        report = self.report()
        if "error" in report:
            return f"hvmail_report: {report['error']}"
        by_status = report.get("by_status") or {}
        success = int(by_status.get("success", 0)) if isinstance(by_status, dict) else -1
        if success != n:
            return f"hvmail_report counts {success} successes, expected {n} ({by_status})"
        return ""

    def cleanup(self) -> None:
        if self.started:
            self.stop()
        if self.root_path.exists() and not self.keep_roots:
            for queue in ("ram", "bounce"):  # hvmail_init stop leaves its tmpfs mounted
                path = self.root_path / "queue" / queue
                if os.path.ismount(path):
                    run_cmd(["umount", "-l", str(path)], timeout=30)
            shutil.rmtree(self.root_path, ignore_errors=True)

    def describe(self) -> str:
        from greenarrow.lib.config import control

        workers = self.workers or control.SPECS["remote.workers"].default
        conc = self.concurrency or control.SPECS["concurrencyremote"].default
        queue = (f"ram-queue on a {self.ramdisk_mb} MB tmpfs" if self.ramdisk_mb
                 else "ram-queue in a plain folder")
        loop = f", event loop {self.event_loop}" if self.event_loop else ""
        return f"engine (remote.workers={workers}, concurrencyremote={conc}, {queue}{loop})"


# main.cf settings of the shared baseline (shared/bench/adapters/postfix.sh),
# with relayhost filled in per run.
POSTFIX_SETTINGS = [
    "inet_interfaces = loopback-only",
    "inet_protocols = ipv4",
    "mydestination =",
    "local_recipient_maps =",
    "local_transport = error:local delivery disabled (benchmark relay-only)",
    "default_transport = smtp",
    "relay_transport = relay",
    "mynetworks = 127.0.0.0/8",
    "maillog_file = /var/log/postfix.log",
    "default_destination_concurrency_limit = 50",
    "initial_destination_concurrency = 10",
    "default_destination_recipient_limit = 50",
    "default_process_limit = 100",
    "smtp_connection_cache_on_demand = yes",
    "smtp_destination_rate_delay = 0s",
    "qmgr_message_active_limit = 20000",
    "smtpd_tls_security_level = none",
    "smtp_tls_security_level = none",
    "smtp_dns_support_level = disabled",
    "smtpd_peername_lookup = no",
    "smtpd_client_connection_count_limit = 0",
    "smtpd_client_connection_rate_limit = 0",
]

DEBCONF = [
    "postfix postfix/main_mailer_type select Local only",
    "postfix postfix/mailname string bench.localdomain",
]


class PostfixPeer(Peer):
    """Debian's Postfix on 127.0.0.1:25, relaying everything to the sink."""

    name = "postfix"
    smtp_port = 25

    def __init__(self, work: Path | None = None, port: int = 25) -> None:
        self.smtp_port = port
        self.spool = Path("/var/spool/postfix")
        self.sink_port: int | None = None
        self.signing = False
        self.opendkim = OpenDkim(work or Path("/tmp/greenarrow-bench"), self.spool)

    @staticmethod
    def installed() -> bool:
        return bool(shutil.which("postfix") or os.path.exists("/usr/sbin/postfix")) and bool(
            shutil.which("postconf") or os.path.exists("/usr/sbin/postconf")
        )

    @staticmethod
    def install(log: Path, timeout: float = 900.0) -> str:
        """apt-get install postfix and opendkim (the simplemh peer's milter) with the debconf
        preseed; '' on success, else why not."""
        if os.geteuid() != 0:
            return "not root: cannot apt-get install postfix"
        if not shutil.which("apt-get"):
            return "no apt-get on this machine"
        log.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        steps = []
        preseed = subprocess.run(
            ["debconf-set-selections"],
            input="\n".join(DEBCONF) + "\n",
            capture_output=True,
            text=True,
            timeout=60,
        )
        steps.append(preseed)
        for argv in (["apt-get", "update"], ["apt-get", "install", "-y", "postfix", "opendkim"]):
            steps.append(run_cmd(argv, timeout, env))
            if steps[-1].returncode != 0:
                break
        with open(log, "w") as f:
            for step in steps:
                f.write(f"$ {' '.join(map(str, step.args))}\n{step.stdout}{step.stderr}\nrc={step.returncode}\n")
        if steps[-1].returncode != 0 or not PostfixPeer.installed():
            return f"apt-get install postfix opendkim failed (rc={steps[-1].returncode}, see {log})"
        return ""

    def version(self) -> str:
        return run_cmd(["postconf", "-h", "mail_version"]).stdout.strip() or "?"

    def running(self) -> bool:
        return run_cmd(["postfix", "status"], 30).returncode == 0

    def configure(self, sink_port: int, retry_scale: float | None = None,
                  simplemh: bool = False, events_url: str | None = None) -> None:
        """The shared harness's main.cf settings; relayhost = the sink; with `simplemh`,
        OpenDKIM as the signing milter. Rewritten only when one of them changes."""
        if simplemh and not OpenDkim.installed():
            raise PeerError("opendkim is not installed (apt-get install opendkim): "
                            "the simplemh peer is Postfix with OpenDKIM")
        if self.sink_port == sink_port and self.signing == simplemh:
            return
        main_cf = Path("/etc/postfix/main.cf")
        backup = main_cf.with_name("main.cf.bench-orig")
        if main_cf.exists() and not backup.exists():
            shutil.copy2(main_cf, backup)
        settings = [*POSTFIX_SETTINGS, f"relayhost = [127.0.0.1]:{sink_port}",
                    *(OpenDkim.POSTFIX_SETTINGS if simplemh else OpenDkim.POSTFIX_OFF)]
        result = run_cmd(["postconf", "-e", *settings])
        if result.returncode != 0:
            raise PeerError(f"postconf -e failed: {result.stderr}")
        self._listen_port()
        check = run_cmd(["postfix", "check"])
        if check.returncode != 0:
            raise PeerError(f"postfix check failed: {check.stderr}")
        spool = run_cmd(["postconf", "-h", "queue_directory"]).stdout.strip()
        if spool:
            self.spool = Path(spool)
        if self.running():
            run_cmd(["postfix", "reload"])
        self.sink_port = sink_port
        self.signing = simplemh

    def _listen_port(self) -> None:
        """The SMTP service on `smtp_port`: master.cf's `smtp inet` entry (port 25) kept,
        or replaced by one on the chosen port (the original kept as master.cf.bench-orig)."""
        master_cf = Path("/etc/postfix/master.cf")
        backup = master_cf.with_name("master.cf.bench-orig")
        if master_cf.exists() and not backup.exists():
            shutil.copy2(master_cf, backup)
        if self.smtp_port == 25:
            if backup.exists():
                shutil.copy2(backup, master_cf)
            return
        steps = [["postconf", "-M#", "smtp/inet"],
                 ["postconf", "-Me", f"{self.smtp_port}/inet={self.smtp_port} inet n - y - - smtpd"]]
        if backup.exists():
            shutil.copy2(backup, master_cf)
        for argv in steps:
            result = run_cmd(argv)
            if result.returncode != 0:
                raise PeerError(f"{' '.join(argv)} failed: {result.stderr}")

    def start(self) -> None:
        if self.signing:
            self.opendkim.start()
        else:
            self.opendkim.stop()
        if self.running():
            return
        if self.queue_count():
            raise PeerError(f"postfix queue not empty at start ({self.queue_count()} files)")
        if os.path.exists("/usr/lib/postfix/configure-instance.sh"):
            run_cmd(["/usr/lib/postfix/configure-instance.sh", "-"], 60)
        result = run_cmd(["postfix", "start"], 60)
        if not wait_port(self.smtp_port, True, 20):
            raise PeerError(f"postfix did not open port {self.smtp_port}: {result.stderr}")
        time.sleep(0.5)  # let qmgr and pickup settle, as the shared harness does

    def stop(self) -> None:
        self.opendkim.stop()
        if not self.running():
            return
        run_cmd(["postfix", "stop"], 60)
        deadline = time.monotonic() + 20
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.running():
            raise PeerError("postfix did not stop")
        wait_port(self.smtp_port, False, 5)

    def queue_count(self) -> int:
        total = 0
        for sub in ("maildrop", "incoming", "active", "deferred", "hold"):
            for _, _, files in os.walk(self.spool / sub):
                total += len(files)
        return total

    def clear_queue(self) -> None:
        """`postsuper -d ALL`: only used when a failed run left bench mail behind."""
        run_cmd(["postsuper", "-d", "ALL"], 120)

    def root_pid(self) -> int | None:
        pid = read_pid(self.spool / "pid" / "master.pid")
        return pid if pid and pid_alive(pid) else None

    def cli_argv(self, sender: str, rcpt: str) -> list[str]:
        return ["/usr/sbin/sendmail", "-i", "-f", sender, "--", rcpt]

    def cpu_roots(self) -> list[int]:
        """Postfix's master tree, and OpenDKIM when it signs (it is a peer's cost too)."""
        roots = super().cpu_roots()
        if self.signing and self.opendkim.pid():
            roots.append(self.opendkim.pid() or 0)
        return roots

    def flush(self) -> None:
        run_cmd(["postqueue", "-f"], 60)

    def describe(self) -> str:
        return f"postfix {self.version()}" + (" with OpenDKIM" if self.signing else "")


class OpenDkim:
    """Debian's OpenDKIM as Postfix's signing milter, for the simplemh scenario.

    It signs what the engine signs, as the engine signs it: the bench's
    RSA-2048 key for bench.test (selector `default`), relaxed/relaxed,
    rsa-sha256, the engine's header list (`SIGNED_HEADERS`) with From,
    Subject and Date oversigned. It runs in the foreground as a child of the
    benchmark (`opendkim -f`), so the harness stops it by its pid, on a Unix
    socket in Postfix's spool (`unix:opendkim/opendkim.sock` is relative to
    the spool, which works for a chrooted smtpd too). Its configuration and
    key copy live in that folder as well: OpenDKIM refuses files on a path
    that other users can write (as /tmp). Postfix's
    `milter_default_action = tempfail`: if the milter fails, mail stays
    queued and the run fails, rather than going out unsigned.
    """

    POSTFIX_SETTINGS = [
        "smtpd_milters = unix:opendkim/opendkim.sock",
        "non_smtpd_milters = unix:opendkim/opendkim.sock",
        "milter_default_action = tempfail",
        "milter_protocol = 6",
    ]
    POSTFIX_OFF = ["smtpd_milters =", "non_smtpd_milters ="]

    def __init__(self, work: Path, spool: Path) -> None:
        self.folder = spool / "opendkim"
        self.work = work
        self.socket = self.folder / "opendkim.sock"
        self.process: subprocess.Popen[bytes] | None = None

    @staticmethod
    def binary() -> str | None:
        return shutil.which("opendkim") or (
            "/usr/sbin/opendkim" if os.path.exists("/usr/sbin/opendkim") else None)

    @staticmethod
    def installed() -> bool:
        return OpenDkim.binary() is not None

    @staticmethod
    def version() -> str:
        binary = OpenDkim.binary()
        if not binary:
            return "?"
        out = run_cmd([binary, "-V"], 30)
        return (out.stdout or out.stderr).splitlines()[0].strip() if (out.stdout or out.stderr) else "?"

    def config(self) -> str:
        from greenarrow.lib.dkim.signing import OVERSIGNED_HEADERS, SIGNED_HEADERS

        key = self.folder / f"bench-{DKIM_SELECTOR}.private"
        dkim_key(key, self.work)
        os.chmod(key, 0o600)  # OpenDKIM's copy: its own, as opendkim wants its keys
        return "\n".join([
            "Mode s",
            "Syslog no",
            f"Domain {SENDER_DOMAIN}",
            f"Selector {DKIM_SELECTOR}",
            f"KeyFile {key}",
            "Canonicalization relaxed/relaxed",
            "SignatureAlgorithm rsa-sha256",
            "SignHeaders " + ",".join(h.decode() for h in SIGNED_HEADERS),
            "OversignHeaders " + ",".join(h.decode() for h in OVERSIGNED_HEADERS),
            f"Socket local:{self.socket}",
            "UMask 000",  # Postfix's processes (user postfix) connect to the socket
            "InternalHosts 127.0.0.1",
            "",
        ])

    def pid(self) -> int | None:
        if self.process is not None and self.process.poll() is None:
            return self.process.pid
        return None

    def start(self) -> None:
        """Start it (once) and return when its socket accepts connections."""
        if self.pid():
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        os.chmod(self.folder, 0o755)
        if self.socket.exists():
            self.socket.unlink()
        conf = self.folder / "bench-opendkim.conf"
        conf.write_text(self.config())
        log = open(self.work / "opendkim.log", "ab")
        self.process = subprocess.Popen([OpenDkim.binary() or "opendkim", "-f", "-x", str(conf)],
                                        stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PeerError(f"opendkim exited at start (see {self.work / 'opendkim.log'})")
            if self.socket.exists():
                import socket

                with socket.socket(socket.AF_UNIX) as probe:
                    try:
                        probe.connect(str(self.socket))
                        return
                    except OSError:
                        pass
            time.sleep(0.05)
        self.stop()
        raise PeerError(f"opendkim did not listen on {self.socket} in 20 s")

    def stop(self) -> None:
        """Stop the process this object started (by its pid)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(15)
        self.process = None
